"""Ranking policies: who is served first. Each gives every request a sort key; lower keys run first.

- `fcfs`: arrival order.
- `priority`: the request's integer priority, lower first (vLLM's convention), ties by arrival; with
  aging, a request rises one level per `aging_s` seconds since its arrival (see PriorityPolicy).
- `vtc`: per-user fair share with virtual token counters (Sheng et al., OSDI'24): a user's counter
  grows by `input_weight` per prompt token computed and `output_weight` per token generated, divided
  by the user's weight; a user who becomes active again is lifted to the smallest counter among
  active users; the user with the smallest counter goes first. Unlike the original (admission only),
  it may preempt, but only a user behind by more than VTC_PREEMPT_MARGIN. Inside a user's share, the
  request's priority orders (and may preempt) that user's own requests.
- `slo`: levels in order, then earliest deadline first against per-level latency targets, with bounded
  pauses (see SLOPolicy); past capacity, admission control sheds the lower levels (`admission.py`).
- `trace`: FastSwitch's evaluation: each request's priority is re-drawn every iteration with
  probability `update_freq`, from a seeded generator: `random` draws a new level uniformly, `markov`
  moves one level up or down.
"""

import random
from collections import defaultdict

from fastswitch.config import EngineConfig
from fastswitch.engine.costs import CostModel
from fastswitch.interfaces import Clock
from fastswitch.request import Request
from fastswitch.slo import SLO

POLICIES = ("fcfs", "priority", "vtc", "slo", "trace")
PAUSE_LIMIT = 1.0  # slo: the longest pause in a stream, in TTFT targets of its level
VTC_PREEMPT_MARGIN = 64.0  # service units (32 output tokens at weight 2) a user must be behind to preempt
TRACE_PATTERNS = ("random", "markov")


class Policy:
    name = "fcfs"

    def key(self, request: Request) -> tuple:
        return (request.metrics.arrival_time, request.seq)

    def on_arrival(self, request: Request, active: list[Request]) -> None:
        """A new request joins; `active` are the unfinished requests already there."""

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """The request had prompt tokens computed and/or generated tokens this iteration."""

    def on_iteration(self, requests: list[Request]) -> None:
        """Called once per scheduling iteration, before ranking."""

    def preempts(self, request: Request, victim: Request) -> bool:
        """Whether `request`, ranked above `victim`, may take its place."""
        return True

    def guarded(self, request: Request, by: Request) -> bool:
        """Whether a running request is safe for now from being preempted by `by`, which outranks it."""
        return False


class PriorityPolicy(Policy):
    """Lower `priority` first, ties by arrival. With `aging_s` > 0 a request rises one level for every
    `aging_s` seconds since it arrived, continuously: it ranks as a request of priority 0 arriving
    `priority * aging_s` seconds after it did. That rank never changes while it waits, runs or is
    paused, so aging cannot make two requests displace each other back and forth. A request of
    priority p arriving at t is outranked, for a seat or for memory, only by requests that arrived
    before t + (p - p_min) * aging_s, where p_min is the best priority clients send: its wait is
    bounded by the time to serve those, a finite set however long an overload of better levels lasts."""

    name = "priority"

    def __init__(self, aging_s: float = 0.0):
        if not aging_s >= 0:
            raise ValueError(f"invalid priority_aging={aging_s!r}: seconds, >= 0 (0: strict priority)")
        self.aging_s = aging_s

    def key(self, request: Request) -> tuple:
        arrival = request.metrics.arrival_time
        if self.aging_s:
            return (arrival + request.priority * self.aging_s, arrival, request.seq)
        return (request.priority, arrival, request.seq)


class VTCPolicy(Policy):
    name = "vtc"

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0, user_weights: dict[str, float] | None = None):
        self.input_weight, self.output_weight = input_weight, output_weight
        self.user_weights = user_weights or {}
        self.counters: dict[str, float] = defaultdict(float)

    def key(self, request: Request) -> tuple:
        """The user's share first; inside it, the request's priority (lower first), then arrival."""
        return (self.counters[request.user], request.priority, request.metrics.arrival_time, request.seq)

    def on_arrival(self, request: Request, active: list[Request]) -> None:
        active_users = {r.user for r in active}
        if request.user not in active_users and active_users:
            floor = min(self.counters[u] for u in active_users)
            self.counters[request.user] = max(self.counters[request.user], floor)

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        cost = self.input_weight * prompt_tokens + self.output_weight * output_tokens
        self.counters[request.user] += cost / self.user_weights.get(request.user, 1.0)

    def preempts(self, request: Request, victim: Request) -> bool:
        """Only a user clearly behind takes another's place: counters move with every token served, and
        preempting over a few tokens' difference would swap requests back and forth every iteration.
        Inside one user's share, a better priority takes the place of a worse one."""
        if request.user == victim.user:
            return request.priority < victim.priority
        return self.counters[victim.user] - self.counters[request.user] > VTC_PREEMPT_MARGIN


class SLOPolicy(Policy):
    """Levels in order, then deadlines, against per-level latency targets. Every unfinished request has a
    deadline for its next token. The first is due at arrival + its level's TTFT target (T). Token k
    after it is due on the schedule that keeps the mean time between tokens within the level's TBT
    target (first token + k TBT targets), but never later than the last token + PAUSE_LIMIT T: a stream
    ahead of schedule has slack to yield, and a pause in it is bounded.

    It ranks by level (lower first), so a request that can still meet its target is never delayed for a
    lower level's; inside a level, by the latest time it can start and still meet its deadline (the
    deadline less the estimated time to its next token: copy-in, compute, a step; `CostModel`), earliest
    first. Preemption takes the lowest-ranked first: the worst level, and in it the most slack. Inside a
    level, a stream whose next token is late goes first (its pause is over), and a first token that can
    no longer be on time goes after those that can, oldest deadline first (goodput). A lower level gets
    what the higher ones leave; past capacity, admission control (`engine/admission.py`) sheds what of
    it cannot start in time, which bounds its wait.

    A request takes the place of running ones ranked below it when it finds no room otherwise, but a
    stream that has begun yields only to a higher level's request, or to a first token of its own level
    when the stream is at least PAUSE_LIMIT T ahead of its schedule (its pause then costs it no mean-TBT
    target, and it is back within PAUSE_LIMIT T of its last token); it never yields to a stream of its
    level. A paused stream is thus back within PAUSE_LIMIT T (plus its copy-in and a step) of its last
    token as long as its level and the higher ones leave it room; each such pause uses up its lead, so a
    stream yields to its own level only a bounded number of times. A request resumed less than 1 /
    `max_preemptions_per_s` seconds ago is not preempted again by its own level or a lower one (the
    thrash guard); a higher level cannot be displaced back, so it needs no guard."""

    name = "slo"

    def __init__(self, slo: SLO, clock: Clock, costs: CostModel, max_preemptions_per_s: float = 4.0):
        self.slo, self.clock, self.costs = slo, clock, costs
        self.min_resident_s = 1 / max_preemptions_per_s
        self.now = clock.now()

    def on_iteration(self, requests: list[Request]) -> None:
        self.now = self.clock.now()

    def deadline(self, request: Request) -> float:
        """When its next token is due."""
        ttft = self.slo.ttft(request.priority)
        if request.first_token_time is None:
            return request.metrics.arrival_time + ttft
        return min(self.on_schedule(request), request.last_token_time + PAUSE_LIMIT * ttft)

    def on_schedule(self, stream: Request) -> float:
        """When a begun stream's next token is due to keep its mean time between tokens on target."""
        return stream.first_token_time + stream.num_output_tokens * self.slo.tbt(stream.priority)

    def key(self, request: Request) -> tuple:
        deadline = self.deadline(request)
        latest_start = deadline - self.costs.next_token_s(request)
        late = self.now > latest_start
        if request.first_token_time is not None:  # a stream late for its next token goes first in its level
            return (request.priority, -1 if late else 0, latest_start, request.seq)
        if late:  # a first token that cannot be on time: behind its level's that can, oldest first
            return (request.priority, 1, deadline, request.seq)
        return (request.priority, 0, latest_start, request.seq)

    def preempts(self, request: Request, victim: Request) -> bool:
        """A stream that has begun yields to a higher level, or to its level's first token if far enough ahead."""
        if victim.first_token_time is None or victim.priority > request.priority:
            return True
        lead = self.on_schedule(victim) - self.now
        return request.first_token_time is None and lead >= PAUSE_LIMIT * self.slo.ttft(victim.priority)

    def guarded(self, request: Request, by: Request) -> bool:
        return by.priority >= request.priority and self.now - request.resumed_at < self.min_resident_s


class TracePolicy(PriorityPolicy):
    name = "trace"

    def __init__(self, pattern: str = "random", update_freq: float = 0.04, levels: int = 4, seed: int = 0):
        if pattern not in TRACE_PATTERNS:
            raise ValueError(f"invalid trace_pattern {pattern!r}; choose from {', '.join(TRACE_PATTERNS)}")
        if not 0 <= update_freq <= 1:
            raise ValueError(f"invalid trace_update_freq={update_freq!r}: a probability per iteration, in [0, 1]")
        super().__init__()
        self.pattern, self.update_freq, self.levels = pattern, update_freq, levels
        self.rng = random.Random(seed)
        self.changes: list[tuple[int, str, int]] = []  # (iteration, request id, new priority)
        self.iteration = 0

    def on_arrival(self, request: Request, active: list[Request]) -> None:
        request.priority = self.rng.randrange(self.levels)

    def on_iteration(self, requests: list[Request]) -> None:
        self.iteration += 1
        for request in sorted(requests, key=lambda r: r.seq):
            if self.rng.random() >= self.update_freq:
                continue
            if self.pattern == "random":
                request.priority = self.rng.randrange(self.levels)
            else:
                request.priority = min(self.levels - 1, max(0, request.priority + self.rng.choice((-1, 1))))
            self.changes.append((self.iteration, request.request_id, request.priority))


def make_policy(config: EngineConfig, clock: Clock, costs: CostModel) -> Policy:
    name = config.policy
    if name == "fcfs":
        return Policy()
    if name == "priority":
        return PriorityPolicy(config.priority_aging)
    if name == "vtc":
        return VTCPolicy(config.vtc_input_weight, config.vtc_output_weight, config.user_weights())
    if name == "slo":
        return SLOPolicy(config.slo(), clock, costs)
    if name == "trace":
        return TracePolicy(config.trace_pattern, config.trace_update_freq, config.trace_levels, config.seed)
    raise ValueError(f"invalid policy {name!r}; choose from {', '.join(POLICIES)}")
