"""Admission control past capacity (`engine/admission.py`): what is shed, when, and what it leaves behind."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastswitch.config import EngineConfig
from fastswitch.engine.admission import Admission
from fastswitch.engine.scheduler import Scheduler
from fastswitch.slo import SLO, parse_shed_bounds
from tests.model_free import StepClock, policy_named
from tests.test_policies import make_scheduler, request, step

TTFT = "0=1,1=2,2=4,3=8"  # seconds of the StepClock
STEP_S = 0.1


def slo_scheduler(clock: StepClock, shed: str = "auto", num_blocks: int = 64, max_num_seqs: int = 4) -> Scheduler:
    config = EngineConfig(policy="slo", device="cpu", slo_ttft=TTFT, slo_tbt="10", shed=shed)
    bounds = config.shed_bounds()
    return Scheduler(make_scheduler(num_blocks=num_blocks).kv, max_num_seqs, 64, "swap",
                     policy_named("slo", clock, slo_ttft=TTFT, slo_tbt="10"), clock=clock,
                     admission=Admission(config.slo(), bounds) if bounds else None)


def run(s: Scheduler, clock: StepClock, arrivals, steps: int, retry=None, until: int | None = None):
    """`arrivals(n)`: the requests arriving before step n. A refused request is handed to `retry(output, n)`.
    Stops after `steps`, or once nothing is left after step `until`. Every request seen by id, and every
    refusal with its step."""
    seen, refused = {}, []
    for n in range(steps):
        for r in arrivals(n):
            seen[r.request_id] = r
            s.add(r)
        if until is not None and n > until and not s.has_unfinished():
            break
        step(s)
        for out in s.take_refused():
            refused.append((n, out))
            if retry is not None:
                retry(out, n)
        clock.t += STEP_S
    return seen, refused


def test_bounds_parse_and_apply_to_a_level_and_the_worse_ones():
    assert parse_shed_bounds("2=2, 3=1") == {2: 2.0, 3: 1.0} and parse_shed_bounds("off") == {}
    admission = Admission(SLO.parse(TTFT, "1"), {2: 2.0})
    assert [admission.bound_s(p) for p in (0, 1, 2, 3, 7)] == [None, None, 8.0, 16.0, 16.0]
    assert EngineConfig(policy="slo", device="cpu").shed_bounds() == {2: 2.0}
    assert EngineConfig(policy="priority", device="cpu").shed_bounds() == {}  # off unless asked for
    for bad in ("2=x", "2=0", "=1"):
        with pytest.raises(ValueError, match="invalid shed entry"):
            parse_shed_bounds(bad)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), load=st.floats(0.1, 0.5), max_tokens=st.integers(1, 8))
def test_under_capacity_nothing_is_shed(seed, load, max_tokens):
    """Four seats, a request holding one for 1 + max_tokens steps: arrivals at `load` of that never wait
    long enough to be shed, whatever their level."""
    rng, clock = random.Random(seed), StepClock()
    s = slo_scheduler(clock)
    per_step = load * 4 / (1 + max_tokens)

    def arrivals(n):
        return [request(f"r{n}.{k}", priority=rng.randrange(4), arrival=clock.t, max_tokens=max_tokens)
                for k in range(int(per_step) + (rng.random() < per_step % 1))]

    _, refused = run(s, clock, arrivals, 300)
    assert refused == []


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), overload=st.floats(2, 4), mode=st.sampled_from(["swap", "recompute"]))
def test_past_capacity_lower_levels_are_shed_within_their_bound_and_nothing_leaks(seed, overload, mode):
    rng, clock = random.Random(seed), StepClock()
    s = slo_scheduler(clock, num_blocks=24)
    s.preemption_mode = mode
    per_step = overload * 4 / 6  # six steps a request

    def arrivals(n):
        if n >= 150:  # then the load stops and everything drains
            return []
        return [request(f"r{n}.{k}", prompt_len=rng.randrange(1, 20), priority=rng.randrange(4), arrival=clock.t,
                        max_tokens=5) for k in range(int(per_step) + (rng.random() < per_step % 1))]

    seen, refused = run(s, clock, arrivals, 2000, until=150)
    assert not s.has_unfinished()
    shed = {out.request_id: n for n, out in refused}
    assert shed and all(seen[i].priority >= 2 for i in shed)  # levels 0 and 1 are never shed
    admission = s.admission
    for request_id, n in shed.items():
        r = seen[request_id]
        assert r.first_token_time is None and r.finish_reason == "rejected"
        assert n * STEP_S <= r.metrics.arrival_time + admission.bound_s(r.priority) + STEP_S + 1e-9
    for r in seen.values():  # a shed level starts within its bound, or is shed
        if r.priority >= 2 and r.request_id not in shed:
            assert r.first_token_time - r.metrics.arrival_time <= admission.bound_s(r.priority) + 2 * STEP_S + 1e-9
    for request_id, n in shed.items():  # the lowest level first: nothing worse was left waiting behind it
        r = seen[request_id]
        assert all(o.first_token_time is None or o.first_token_time > n * STEP_S + 1e-9 for o in seen.values()
                   if o.priority > r.priority and o.metrics.arrival_time <= n * STEP_S and o.request_id not in shed
                   and o.seq > r.seq)
    kv = s.kv
    kv.drain()
    assert kv.device.num_available == kv.num_blocks and kv.host.num_available == kv.host.allocator.num_blocks


def test_a_flood_of_retries_does_not_starve_level_0_and_a_retry_is_served_once_load_falls():
    """Level 0 within capacity, and level 3 ten times what is left, every refused request sent again
    when its Retry-After says: level 0 keeps meeting its target, and once the flood stops, the retries
    are served."""
    clock = StepClock()
    s = slo_scheduler(clock, num_blocks=32)
    due: list[tuple[float, object]] = []
    count = iter(range(10**9))

    def arrivals(n):
        fresh = [request(f"high{n}", priority=0, arrival=clock.t, max_tokens=5)] if n % 3 == 0 and n < 2900 else []
        if n < 60:
            fresh += [request(f"flood{next(count)}", priority=3, arrival=clock.t, max_tokens=5) for _ in range(6)]
        ready = [r for at, r in due if at <= clock.t]
        due[:] = [(at, r) for at, r in due if at > clock.t]
        return fresh + [request(f"{r.request_id}.again", priority=3, arrival=clock.t, max_tokens=5) for r in ready]

    def retry(out, n):
        due.append((clock.t + out.retry_after_s, out))

    seen, refused = run(s, clock, arrivals, 3000, retry)
    assert refused and not due and not s.has_unfinished()
    high = [r for r in seen.values() if r.priority == 0]
    assert all(r.first_token_time - r.metrics.arrival_time <= 1.0 for r in high)  # level 0's target
    assert all(1 <= out.retry_after_s <= 60 for _, out in refused)
    retried = [r for i, r in seen.items() if i.endswith(".again")]
    assert any(r.first_token_time is not None for r in retried)  # served once the load fell
