"""The OpenAI wire format: request bodies (with vLLM's extra fields), and the responses built from outputs."""

import time

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from fastswitch.engine.outputs import RequestOutput
from fastswitch.sampling import SamplingParams


class APIError(Exception):
    """An error the client caused (or a limit it hit), answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM's extra fields
    priority: StrictInt = 0
    ignore_eos: bool = False
    min_tokens: int = 0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        try:
            return SamplingParams(
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens,
                min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, stop=self.stop or [],
                stop_token_ids=self.stop_token_ids or [], logprobs=logprobs)
        except ValueError as error:
            raise APIError(400, str(error), param=str(error).split("=")[0].split()[-1]) from None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = None
    max_tokens: int | None = 16  # OpenAI's default for completions

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: only text ones are understood here
            if any(part.get("type") != "text" for part in self.content):
                raise APIError(400, "only text content parts are supported", param="messages")
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}


def completion_choice(index: int, out: RequestOutput, tokenizer, return_token_ids: bool, stream: bool) -> dict:
    token_ids = out.new_token_ids if stream else out.token_ids
    choice = {"index": index, "text": out.new_text if stream else out.text,
              "logprobs": _completion_logprobs(out, token_ids, tokenizer) if out.logprobs is not None else None,
              "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
    if return_token_ids:
        choice["token_ids"] = token_ids
    return choice


def chat_choice(index: int, out: RequestOutput, tokenizer, return_token_ids: bool, stream: bool) -> dict:
    token_ids = out.new_token_ids if stream else out.token_ids
    content = out.new_text if stream else out.text
    choice = {"index": index, ("delta" if stream else "message"): {"role": "assistant", "content": content},
              "logprobs": _chat_logprobs(out, token_ids, tokenizer) if out.logprobs is not None else None,
              "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
    if return_token_ids:
        choice["token_ids"] = token_ids
    return choice


def envelope(kind: str, request_id: str, model: str, choices: list[dict], created: int | None = None) -> dict:
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model, "choices": choices}


def _recent(out: RequestOutput, token_ids: list[int]) -> list[dict]:
    return out.logprobs[len(out.logprobs) - len(token_ids):] if token_ids else []


def _completion_logprobs(out: RequestOutput, token_ids: list[int], tokenizer) -> dict:
    entries = _recent(out, token_ids)
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
    return {"tokens": tokens, "token_logprobs": [e[t] for e, t in zip(entries, token_ids)],
            "top_logprobs": [{tokenizer.decode([k], skip_special_tokens=False): v for k, v in e.items()} for e in entries],
            "text_offset": []}


def _chat_logprobs(out: RequestOutput, token_ids: list[int], tokenizer) -> dict:
    def item(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(t, e[t]), "top_logprobs": [item(k, v) for k, v in sorted(e.items(), key=lambda kv: -kv[1])]}
                        for e, t in zip(_recent(out, token_ids), token_ids)]}
