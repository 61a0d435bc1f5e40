"""A request as the engine core keeps it: its tokens, where its KV is, and its scheduling state.

Torch-free and below every package: the scheduler, the KV manager and the policies share it. What a
caller sees (text, deltas) is built from the core's outputs by `engine/outputs.py`.
"""

import enum

import msgspec

from fastswitch.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not yet admitted, or preempted by recomputation: holds no device blocks
    RUNNING = "running"
    SWAPPED = "swapped"  # paused: its KV is on the host
    FINISHED = "finished"


class RequestMetrics(msgspec.Struct):
    """Timestamps (of the engine's clock, time.monotonic by default) and counters of a request's life.

    The core fills the scheduling fields and sends them when the request finishes; token times are
    stamped, step by step, where the outputs are turned into text."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = msgspec.field(default_factory=list)
    finish_time: float | None = None
    num_preemptions: int = 0
    paused_s: float = 0.0  # time spent preempted (paused on the host, or waiting to be recomputed)
    swap_s: float = 0.0  # time its KV spent being copied out or in

    @property
    def queueing_delay_s(self) -> float | None:
        """From arrival to the first iteration that computed any of it."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
                 priority: int = 0, user: str = ""):
        self.request_id, self.params = request_id, params
        self.priority, self.user = priority, user  # lower priority values are served first
        self.seq = 0  # arrival order, set by the scheduler
        self.paused_at: float | None = None  # when it was last preempted, while it is
        self.resumed_iteration = -(1 << 30)  # scheduler iteration of its last resumption (thrash guard)
        self.resumed_at = float("-inf")  # and its time
        self.first_token_time: float | None = None  # when the core sampled its first token
        self.last_token_time: float | None = None  # and its latest
        self.preempted_iteration = -(1 << 30)  # and of its last preemption
        self.prompt_tokens_served = 0  # prompt tokens charged to its user's share (vtc), recomputation excluded
        self.token_ids = list(prompt_token_ids)  # prompt, then every generated token
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the device pool (written by the scheduler only)
        self.cached_at_arrival = 0  # prompt tokens the prefix cache held when it arrived: an estimate of its reuse
        self.block_ids: list[int] = []  # device blocks, in token order
        self.host_block_ids: list[int] = []  # host copy, in token order: valid for the first host_tokens tokens
        self.host_tokens = 0
        self.swap: int | None = None  # id of the copy in flight for this request's KV, if any
        self.block_names: list[bytes] = []  # prefix hashes of its full blocks, computed as needed
        self.num_named_blocks = 0  # device blocks published in the prefix cache
        self.computed_at_pause = 0  # tokens it had KV for when last preempted by recomputation, until resumed
        self.num_written_through = 0  # blocks write-through has copied (or found) on the host
        self.num_cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.metrics = RequestMetrics(arrival_time)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
