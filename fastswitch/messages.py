"""The plain-data messages at the engine's seams: msgspec structs, cheap to encode and typed on decode.

- scheduler -> executor, once per step: `SchedulerOutput` (what to compute, block-table changes, the
  KV copies to make); executor -> scheduler: `ModelOutput` (the sampled tokens, the copies done).
  This is what every tensor-parallel rank, or a simulated executor, receives and returns.
- frontend -> engine core: `AddRequest`, `Abort`, `Shutdown`; core -> frontend: `Ready` (or
  `Failed`) once, then one `CoreOutputs` per step: per-request deltas (new token ids, finish),
  never cumulative text or token lists, and now and then a `Snapshot` of counters for /metrics.
"""

import msgspec

from fastswitch.request import RequestMetrics
from fastswitch.sampling import SamplingParams
from fastswitch.stats import EngineStats

Run = tuple[int, int, int]  # (source start block, destination start block, number of blocks)


# -- one step: scheduler <-> executor --------------------------------------------------------------


class NewRequest(msgspec.Struct, array_like=True):
    """A request the executor has not seen: every token it has so far (a prompt, at first)."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams


class ScheduledRequest(msgspec.Struct, array_like=True):
    request_id: str
    num_computed_tokens: int  # KV already in the pool; this step computes the next num_new_tokens
    num_new_tokens: int
    block_ids: list[int]  # its device block table's blocks added since the executor last saw it, in token order
    new_table: bool  # the table starts over with block_ids (first run, resumed, trimmed) rather than growing


class Copy(msgspec.Struct, array_like=True):
    """KV blocks to move: runs of (source, destination, count) blocks, all layers, K and V."""

    copy_id: int
    kind: str  # "out" (pausing a request), "in" (resuming one, or a host-cached prefix), "writeback"
    runs: list[Run]
    fenced: bool  # must be complete before the step's later copies and its forward (else: asynchronous)

    @property
    def num_blocks(self) -> int:
        return sum(n for _, _, n in self.runs)

    def operations(self, mode: str, num_layers: int) -> int:
        """Copy operations it takes: one per run (`fastswitch`), one per block, layer and K/V (`baseline`)."""
        return self.num_blocks * num_layers * 2 if mode == "baseline" else len(self.runs)


class SchedulerOutput(msgspec.Struct):
    iteration: int
    scheduled: list[ScheduledRequest]
    new_requests: list[NewRequest]
    finished_ids: list[str]  # requests the executor may forget (finished, aborted)
    copies: list[Copy]  # in the order they must be issued, before the forward
    preempted_ids: list[str]

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class ModelOutput(msgspec.Struct, array_like=True):
    """One sampled token per request whose chunk reached its last token, and the asynchronous copies seen
    done since the last step (as vLLM V1 reports finished KV transfers in its step output)."""

    request_ids: list[str]
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    finished_copies: list[int] = []
    failed_copies: list[int] = []  # ended without their data (an exception in the copy thread, a CUDA error)


# -- frontend <-> engine core ----------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    user: str = ""


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True):
    pass


class Limits(msgspec.Struct):
    """What the frontend needs to validate a request without asking the core."""

    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int


class ExecutorSpec(msgspec.Struct):
    """What the executor serves, once its KV pools exist: what the engine core is built around."""

    limits: Limits
    num_host_blocks: int
    block_bytes: int  # one device block (one rank's shard of it, with tensor parallelism)
    eos_token_ids: list[int]
    description: str  # for the log: model, dtype, device, attention, KV blocks


class Ready(msgspec.Struct, tag=True):
    limits: Limits
    description: str  # for the log: model, dtype, device, attention, KV blocks


class Failed(msgspec.Struct, tag=True):
    """The core could not start (request_ids None), or a step failed and these requests were aborted."""

    message: str
    request_ids: list[str] | None = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None  # "stop", "length", or "rejected" (shed by admission control, no token)
    stop_reason: int | str | None = None  # the stop token id that ended it
    num_cached_tokens: int = 0  # prompt tokens served from cached KV instead of prefill
    metrics: RequestMetrics | None = None  # the core's scheduling figures so far (no token times)
    retry_after_s: float | None = None  # rejected: when a retry may find room


class Snapshot(msgspec.Struct):
    """The core's state for /metrics, published after steps that finish a request, at least every
    SNAPSHOT_INTERVAL_S while busy, and when it goes idle."""

    stats: EngineStats
    running: int
    waiting: int
    paused: int
    kv_usage: float
    host_kv_usage: float
    user_service: dict[str, float] | None  # vtc's per-user counters


class CoreOutputs(msgspec.Struct, tag=True):
    timestamp: float  # the core's clock when the step's tokens were appended
    outputs: list[EngineCoreOutput]
    snapshot: Snapshot | None = None


ToCore = AddRequest | Abort | Shutdown
FromCore = Ready | Failed | CoreOutputs
