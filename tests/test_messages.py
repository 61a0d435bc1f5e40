"""Every message at the engine's seams survives msgpack encoding unchanged, as the processes exchange it."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastswitch.messages import (
    Abort,
    AddRequest,
    Copy,
    CoreOutputs,
    EngineCoreOutput,
    Failed,
    FromCore,
    Limits,
    ModelOutput,
    NewRequest,
    Ready,
    ScheduledRequest,
    SchedulerOutput,
    Shutdown,
    Snapshot,
    ToCore,
)
from fastswitch.request import RequestMetrics
from fastswitch.sampling import SamplingParams
from fastswitch.stats import EngineStats

ids = st.text(min_size=1, max_size=12)
tokens = st.lists(st.integers(0, 2**31 - 1), max_size=20)
floats = st.floats(allow_nan=False, allow_infinity=False)
counts = st.integers(0, 2**40)
logprobs = st.dictionaries(st.integers(0, 10**6), st.floats(max_value=0, allow_nan=False), max_size=4)
params = st.builds(SamplingParams, temperature=st.floats(0, 2), top_p=st.floats(0.01, 1), top_k=st.integers(-1, 50),
                   max_tokens=st.none() | st.integers(1, 10**6), stop=st.lists(st.text(min_size=1, max_size=4), max_size=2),
                   stop_token_ids=tokens, seed=st.none() | st.integers(0, 2**32), logprobs=st.none() | st.integers(0, 20))
metrics = st.builds(RequestMetrics, floats, st.none() | floats, st.none() | floats, st.lists(floats, max_size=4),
                    st.none() | floats, counts, floats, floats)
stats = st.builds(EngineStats, **{f: counts for f in ("iterations", "computed_tokens", "generated_tokens", "copies")},
                  stall_s=floats)
snapshot = st.builds(Snapshot, stats, counts, counts, counts, floats, floats,
                     st.none() | st.dictionaries(st.text(max_size=8), floats, max_size=3))
core_output = st.builds(EngineCoreOutput, ids, tokens, st.none() | st.lists(st.none() | logprobs, max_size=2),
                        st.sampled_from([None, "stop", "length"]), st.none() | st.integers(0, 10**6) | st.text(max_size=5),
                        counts, st.none() | metrics)
to_core = st.one_of(
    st.builds(AddRequest, ids, tokens, params, floats, st.integers(-10, 10), st.text(max_size=8)),
    st.builds(Abort, st.lists(ids, max_size=4)),
    st.just(Shutdown()))
from_core = st.one_of(
    st.builds(Ready, st.builds(Limits, counts, counts, counts, counts), st.text(max_size=30)),
    st.builds(Failed, st.text(max_size=30), st.none() | st.lists(ids, max_size=3)),
    st.builds(CoreOutputs, floats, st.lists(core_output, max_size=4), st.none() | snapshot))
step = st.builds(
    SchedulerOutput, counts,
    st.lists(st.builds(ScheduledRequest, ids, counts, counts, tokens), max_size=4),
    st.lists(st.builds(NewRequest, ids, tokens, counts, params), max_size=3),
    st.lists(ids, max_size=3),
    st.lists(st.builds(Copy, counts, st.sampled_from(["out", "in", "writeback"]),
                       st.lists(st.tuples(counts, counts, counts), max_size=3), st.booleans()), max_size=3),
    st.lists(ids, max_size=3))
model_output = st.builds(ModelOutput, st.lists(ids, max_size=3), tokens, st.lists(st.none() | logprobs, max_size=3))


@settings(max_examples=200)
@given(message=to_core | from_core | step | model_output)
def test_every_message_round_trips(message):
    kind = ToCore if isinstance(message, ToCore) else FromCore if isinstance(message, FromCore) else type(message)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=kind)
    assert decoded == message and type(decoded) is type(message)


def test_a_message_of_the_wrong_direction_is_refused_not_misread():
    with pytest.raises(msgspec.ValidationError, match="Abort"):
        msgspec.msgpack.decode(msgspec.msgpack.encode(Abort(["a"])), type=FromCore)
