"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, and operations
endpoints (/health, /version, /metrics, /get_load).

Every client error is answered with OpenAI's error body and never disturbs other requests: bad
input 400, missing or wrong API key 401, oversized body 413, full queue or a request shed past
capacity (admission control, `--shed`) 429 with `Retry-After`. A client that goes
away mid-request has its request aborted, which frees its KV at once. The engine core runs in its
own process (`core_client.py`); if it dies, streams in flight end with an error event, and until
the server exits every request and /health get 503.
"""

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers as StarletteHeaders

import fastswitch
from fastswitch.engine.outputs import RequestOutput
from fastswitch.server.core_client import EngineCoreClient, EngineDeadError
from fastswitch.server.metrics import Metrics
from fastswitch.server.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    chat_choice,
    completion_choice,
    envelope,
    usage,
)

log = logging.getLogger("fastswitch.server")
# The fairness key when the body has no `user`, in this order: ours, then what routers forward or key
# sessions on (SMG forwards x-smg-routing-key but not custom headers; vllm-router keys on the last two).
USER_HEADERS = ("x-fastswitch-user", "x-smg-routing-key", "x-session-id", "x-user-id")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int = 1024  # requests accepted but not started, beyond which new ones get 429
    max_request_bytes: int = 1 << 20  # request bodies larger than this get 413


class LimitsAndAuth:
    """API key and body size checks on /v1, as plain ASGI: streamed responses pass through untouched."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            error = self._refusal(StarletteHeaders(scope=scope))
            if error is not None:
                return await _error(error)(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, headers) -> APIError | None:
        key, limit = self.config.api_key, self.config.max_request_bytes
        if key and not secrets.compare_digest(headers.get("authorization", ""), f"Bearer {key}"):
            return APIError(401, "missing or wrong API key", code="invalid_api_key", type="authentication_error")
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            return APIError(413, f"request body over {limit} bytes", code="request_too_large")
        return None


def build_app(engine: EngineCoreClient, config: ServerConfig, on_core_death=lambda: None) -> FastAPI:
    """`on_core_death` runs on the event loop if the engine core's process dies."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        engine.start(asyncio.get_running_loop(), on_core_death)
        yield

    app = FastAPI(title="FastSwitch", version=fastswitch.__version__, lifespan=lifespan)
    app.add_middleware(LimitsAndAuth, config=config)
    metrics = Metrics(lambda: engine.snapshot, engine.config.slo(), config.model_name)
    app.state.engine, app.state.metrics = engine, metrics


    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return _error(error)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_, error: EngineDeadError):
        return _error(APIError(503, str(error), code="engine_dead", type="server_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}"))
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param))

    @app.get("/health")
    async def health():
        return Response(status_code=503 if engine.dead else 200)

    @app.get("/version")
    async def version():
        return {"version": fastswitch.__version__}

    @app.get("/get_load")
    async def load():
        """Requests accepted and not finished, as vllm-router's power-of-two policy reads it."""
        return {"load": engine.num_in_flight}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "fastswitch", "max_model_len": engine.limits.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        params = body.sampling_params(body.max_tokens, body.logprobs)
        return await _serve(request, body, body.prompts(), params, "text_completion", completion_choice)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        params = body.sampling_params(body.max_completion_tokens or body.max_tokens, body.logprob_count())
        return await _serve(request, body, [body.chat()], params, "chat.completion", chat_choice)

    async def _serve(request: Request, body: SamplingRequest, prompts: list, params, kind: str, make_choice):
        if body.model is not None and body.model != config.model_name:
            raise APIError(400, f"model {body.model!r} is not served here; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")
        if engine.num_queued + len(prompts) > config.max_queue:
            metrics.rejected.labels(str(body.priority), "queue_full").inc()
            raise APIError(429, "the server's queue is full; retry later", code="queue_full", type="rate_limit_error",
                           headers={"Retry-After": "1"})
        request_id = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{secrets.token_hex(12)}"
        user = body.user or next((request.headers[h] for h in USER_HEADERS if request.headers.get(h)), None)
        streams = [engine.generate(p, params, f"{request_id}-{i}", body.priority, user) for i, p in enumerate(prompts)]
        firsts = await _start(streams)  # refused requests raise here, before anything is sent
        shed = [out for out in firsts if out is not None and out.finish_reason == "rejected"]
        if shed:
            for stream in streams:
                await stream.aclose()
            metrics.rejected.labels(str(body.priority), "overloaded").inc()
            retry = max(int(out.retry_after_s or 1) for out in shed)
            raise APIError(429, f"the server is past capacity and this request (priority {body.priority}) cannot "
                           f"start within its bound; retry after {retry} s", code="overloaded",
                           type="rate_limit_error", headers={"Retry-After": str(retry)})
        tokenizer = engine.tokenizer
        if body.stream:
            chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
            return StreamingResponse(_sse(streams, firsts, request_id, chunk_kind, make_choice, body, tokenizer),
                                     media_type="text/event-stream")
        finals = await _collect(request, streams, firsts)
        for out in finals:
            metrics.observe(out, body.priority)
        _log_finished(request_id, finals, body)
        choices = [make_choice(i, out, tokenizer, body.return_token_ids, stream=False) for i, out in enumerate(finals)]
        if body.return_token_ids:
            for choice, out in zip(choices, finals):
                choice["prompt_token_ids"] = out.prompt_token_ids
        return {**envelope(kind, request_id, config.model_name, choices), "usage": usage(finals)}

    async def _sse(streams, firsts, request_id, kind, make_choice, body, tokenizer) -> AsyncIterator[str]:
        created, finals = int(time.time()), {}
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(_pump(i, stream, first, queue)) for i, (stream, first) in enumerate(zip(streams, firsts))]
        try:
            sent_prompt = set()
            for _ in range(len(streams)):
                while True:
                    index, out = await queue.get()
                    if out is None:
                        break
                    if isinstance(out, Exception):
                        yield _sse_line({"error": {"message": str(out), "type": "server_error", "param": None, "code": None}})
                        break
                    choice = make_choice(index, out, tokenizer, body.return_token_ids, stream=True)
                    if body.return_token_ids and index not in sent_prompt:
                        choice["prompt_token_ids"] = out.prompt_token_ids
                        sent_prompt.add(index)
                    yield _sse_line(envelope(kind, request_id, config.model_name, [choice], created))
                    if out.finished:
                        finals[index] = out
                        metrics.observe(out, body.priority)
            _log_finished(request_id, list(finals.values()), body)
            if body.stream_options and body.stream_options.include_usage:
                yield _sse_line({**envelope(kind, request_id, config.model_name, [], created),
                                 "usage": usage(list(finals.values()))})
            yield b"data: [DONE]\n\n"
        finally:  # a client that went away cancels us here: abort whatever is still running
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each stream's own cleanup aborts it
            for stream in streams:
                with contextlib.suppress(RuntimeError):
                    await stream.aclose()

    return app


async def _start(streams) -> list[RequestOutput | None]:
    """Wait until the engine accepted (or refused) every request; abort them all if one is refused."""
    firsts = []
    try:
        for stream in streams:
            firsts.append(await anext(stream, None))
    except ValueError as error:
        for stream in streams:
            await stream.aclose()
        raise APIError(400, str(error), param="prompt" if "prompt" in str(error) else None) from None
    return firsts


async def _pump(index: int, stream, first: RequestOutput | None, queue: asyncio.Queue) -> None:
    try:
        if first is not None:
            await queue.put((index, first))
            if not first.finished:
                async for out in stream:
                    await queue.put((index, out))
    except Exception as error:
        await queue.put((index, error))
    await queue.put((index, None))


async def _collect(request: Request, streams, firsts) -> list[RequestOutput]:
    """Run non-streaming requests to the end, aborting them if the client disconnects meanwhile."""

    async def last(stream, first):
        out = first
        if out is not None and not out.finished:
            async for out in stream:
                pass
        return out

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)

    work = asyncio.gather(*(last(s, f) for s, f in zip(streams, firsts)))
    watcher = asyncio.create_task(watch())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            raise APIError(499, "client closed the request")
        return work.result()
    finally:
        watcher.cancel()
        for stream in streams:
            with contextlib.suppress(RuntimeError):
                await stream.aclose()


def _log_finished(request_id: str, outputs: list[RequestOutput], body: SamplingRequest) -> None:
    log.info("request_id=%s user=%s priority=%d finished=%s prompt_tokens=%d completion_tokens=%d cached_tokens=%d "
             "preemptions=%d", request_id, body.user or "-", body.priority, ",".join(str(o.finish_reason) for o in outputs),
             sum(len(o.prompt_token_ids) for o in outputs), sum(len(o.token_ids) for o in outputs),
             sum(o.num_cached_tokens for o in outputs), sum(o.metrics.num_preemptions for o in outputs))


def _sse_line(payload: dict) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
