"""The core's per-step deltas -> what a caller sees: text, stop strings, streaming deltas.

It runs where the tokenizer is (the API server's process, or beside an in-process core) and keeps
what the core does not: the detokenizer, the text, the logprobs, and the token timestamps. Stop
strings are found here; the caller then aborts the request in the core.
"""

from dataclasses import dataclass

from fastswitch.messages import AddRequest, CoreOutputs, EngineCoreOutput
from fastswitch.model.tokenizer import IncrementalDetokenizer, Tokenizer
from fastswitch.request import RequestMetrics


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
    finish_reason: str | None  # "stop", "length", "abort", or "rejected" (shed past capacity: no token)
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    num_cached_tokens: int  # prompt tokens served from cached KV instead of prefill
    metrics: RequestMetrics
    retry_after_s: float | None = None  # rejected: seconds after which a retry may find room


class _RequestState:
    def __init__(self, add: AddRequest, prompt: str | None, detokenizer: IncrementalDetokenizer):
        self.request_id, self.prompt, self.params = add.request_id, prompt, add.params
        self.prompt_token_ids, self.detokenizer = add.prompt_token_ids, detokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[dict[int, float]] | None = [] if add.params.logprobs is not None else None
        self.metrics = RequestMetrics(add.arrival_time)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0
        self.retry_after_s: float | None = None
        self.holdback = max(map(len, add.params.stop), default=1) - 1  # characters that might begin a stop string
        self.sent_text_len = 0  # text already reported, so streamed deltas never repeat or retract
        self.sent_token_count = 0

    def output(self) -> RequestOutput:
        finished = self.finish_reason is not None
        visible = len(self.text) if finished else max(self.sent_text_len, len(self.text) - self.holdback)
        new_text, new_tokens = self.text[self.sent_text_len : visible], self.token_ids[self.sent_token_count :]
        self.sent_text_len, self.sent_token_count = visible, len(self.token_ids)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.text[:visible],
                             list(self.token_ids), new_text, new_tokens,
                             list(self.logprobs) if self.logprobs is not None else None, finished,
                             self.finish_reason, self.stop_reason, self.num_cached_tokens, self.metrics,
                             self.retry_after_s)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}

    def add(self, add: AddRequest, prompt: str | None) -> None:
        if add.request_id in self.states:
            raise ValueError(f"request id {add.request_id!r} is already in use")
        detokenizer = IncrementalDetokenizer(self.tokenizer, add.prompt_token_ids, add.params.skip_special_tokens)
        self.states[add.request_id] = _RequestState(add, prompt, detokenizer)

    def abort(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def process(self, step: CoreOutputs) -> tuple[list[RequestOutput], list[str]]:
        """This step's outputs, and the requests a stop string ended (to abort in the core)."""
        results, stopped = [], []
        for out in step.outputs:
            state = self.states.get(out.request_id)
            if state is None:  # aborted since the core produced this
                continue
            if self._append(state, out, step.timestamp) and out.finish_reason is None:
                stopped.append(out.request_id)
            results.append(state.output())
            if state.finish_reason is not None:
                del self.states[out.request_id]
        return results, stopped

    def _append(self, state: _RequestState, out: EngineCoreOutput, now: float) -> bool:
        """Add the delta's tokens; True if a stop string ended the request."""
        metrics, core = state.metrics, out.metrics
        if core is not None:
            metrics.first_scheduled_time, metrics.num_preemptions = core.first_scheduled_time, core.num_preemptions
            metrics.paused_s, metrics.swap_s = core.paused_s, core.swap_s
        state.num_cached_tokens = out.num_cached_tokens
        for i, token in enumerate(out.new_token_ids):
            state.token_ids.append(token)
            metrics.first_token_time = metrics.first_token_time or now
            metrics.token_times.append(now)
            if state.logprobs is not None:
                state.logprobs.append(out.new_logprobs[i] if out.new_logprobs else None)
            previous_len = len(state.text)
            state.text += state.detokenizer.step(token)
            stop = None if out.finish_reason == "stop" else self._stop_string(state, previous_len)  # tokens first
            if stop is not None:
                state.finish_reason, state.stop_reason, metrics.finish_time = "stop", stop, now
                return True
        if out.finish_reason is not None:
            state.finish_reason, state.stop_reason = out.finish_reason, out.stop_reason
            state.retry_after_s = out.retry_after_s
            metrics.finish_time = core.finish_time if core is not None and core.finish_time is not None else now
        return False

    def _stop_string(self, state: _RequestState, previous_len: int) -> str | None:
        p = state.params
        if len(state.token_ids) < p.min_tokens:
            return None
        for stop in p.stop:
            at = state.text.find(stop, max(0, previous_len - len(stop) + 1))
            if at != -1:
                state.text = state.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                return stop
        return None
