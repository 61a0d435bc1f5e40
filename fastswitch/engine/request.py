"""A request's state inside the engine, and the output the engine reports for it."""

import enum
from dataclasses import dataclass, field

from fastswitch.model.tokenizer import IncrementalDetokenizer
from fastswitch.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not yet admitted, or preempted by recomputation: holds no device blocks
    RUNNING = "running"
    SWAPPED = "swapped"  # paused: its KV is on the host
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Monotonic timestamps (time.monotonic) of the request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    num_preemptions: int = 0
    paused_s: float = 0.0  # time spent preempted (paused on the host, or waiting to be recomputed)
    swap_s: float = 0.0  # time its KV spent being copied out or in

    @property
    def queueing_delay_s(self) -> float | None:
        """From arrival to the first iteration that computed any of it."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    """What a request has produced so far; `new_*` is what this step added (for streaming)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]  # the request's own list, not a copy: do not modify it
    text: str
    token_ids: list[int]
    new_text: str
    new_token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    num_cached_tokens: int  # prompt tokens served from cached KV instead of prefill
    metrics: RequestMetrics


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, detokenizer: IncrementalDetokenizer, priority: int = 0, user: str = ""):
        self.request_id, self.prompt, self.params = request_id, prompt, params
        self.priority, self.user = priority, user  # lower priority values are served first
        self.seq = 0  # arrival order, set by the scheduler
        self.paused_at: float | None = None  # when it was last preempted, while it is
        self.resumed_iteration = -(1 << 30)  # scheduler iteration of its last resumption (thrash guard)
        self.preempted_iteration = -(1 << 30)  # and of its last preemption
        self.prompt_tokens_served = 0  # prompt tokens charged to its user's share (vtc), recomputation excluded
        self.token_ids = list(prompt_token_ids)  # prompt, then every generated token
        self.prompt_token_ids = list(prompt_token_ids)  # shared by every output of this request (read-only)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the device pool
        self.block_ids: list[int] = []  # device blocks, in token order
        self.host_block_ids: list[int] = []  # host copy, in token order: valid for the first host_tokens tokens
        self.host_tokens = 0
        self.swap = None  # the copy in flight for this request's KV (a SwapHandle), if any
        self.block_names: list[bytes] = []  # prefix hashes of its full blocks, computed as needed
        self.num_named_blocks = 0  # device blocks published in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.metrics = RequestMetrics(arrival_time)
        self.detokenizer = detokenizer
        self.text = ""
        self.sent_text_len = 0  # text already reported, so streamed deltas never repeat or retract
        self.sent_token_count = 0

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

    def output(self, holdback: int = 0) -> RequestOutput:
        """Snapshot for the caller. `holdback` characters stay unsent while they might begin a stop string."""
        visible = len(self.text) if self.finished else max(self.sent_text_len, len(self.text) - holdback)
        new_text, new_tokens = self.text[self.sent_text_len : visible], self.token_ids[self.num_prompt_tokens + self.sent_token_count :]
        self.sent_text_len, self.sent_token_count = visible, self.num_output_tokens
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            text=self.text[:visible],
            token_ids=self.output_token_ids,
            new_text=new_text,
            new_token_ids=new_tokens,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics,
        )
