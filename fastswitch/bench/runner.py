"""Runs a conversation workload and records when every token arrived.

- `run_offline` drives an `Engine` in this process, on the engine's clock (real time, or the
  simulator's): a turn is added when its conversation arrives, or its think time after the previous
  reply has passed.
- `run_http` is an asyncio client for any OpenAI-compatible server (FastSwitch or vLLM): streaming
  /v1/completions with token-id prompts, and `return_token_ids` for each reply's exact tokens, from
  which the next turn's history is built.

Priorities: offline, `random` and `markov` re-draw them every iteration through the `trace` policy;
over HTTP a request carries one, drawn when it is sent (`random`: any level; `markov`: one level up
or down from the conversation's previous turn).

A request the server refuses with HTTP 429 is sent again once its `Retry-After` has passed, at most
`max_retries` times, as the OpenAI Python SDK does (offline, a shed request is not retried); one
refused after that, or not finished within the client's timeout, is recorded as not served, and its
conversation ends there: the user gives up, since later turns need its reply. Every request carries
its conversation's id (or, with `routing_key="user"`, its user) as `X-SMG-Routing-Key`, the key a
router's consistent hashing or sticky sessions keep on one replica (SMG's; FastSwitch and vLLM
ignore it when the body names the user, as it does here).
"""

import asyncio
import contextlib
import heapq
import json
import logging
import random
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from fastswitch.bench.workload import Conversation, history_prompt
from fastswitch.config import EngineConfig
from fastswitch.engine.engine import Engine
from fastswitch.engine.outputs import RequestOutput
from fastswitch.model.tokenizer import Tokenizer
from fastswitch.sampling import SamplingParams
from fastswitch.stats import EngineStats

log = logging.getLogger(__name__)

PRESETS = {  # engine options each preset sets; every other option is the user's
    "baseline": dict(swap_mode="baseline", block_groups=False, async_swap=False, kv_reuse=False,
                     enable_prefix_caching=False),  # vLLM V0: per-block, per-layer synchronous swaps, no reuse
    "fastswitch": dict(swap_mode="fastswitch", block_groups=True, async_swap=True, kv_reuse=True),
    "fastswitch-groups": dict(swap_mode="fastswitch", block_groups=False, async_swap=True, kv_reuse=True),
    "fastswitch-async": dict(swap_mode="fastswitch", block_groups=True, async_swap=False, kv_reuse=True),
    "fastswitch-reuse": dict(swap_mode="fastswitch", block_groups=True, async_swap=True, kv_reuse=False,
                             enable_prefix_caching=False),
    "recompute": dict(preemption_mode="recompute"),  # preempt by recomputation, FastSwitch's host tier otherwise
    # What users run today (docs/baselines.md): recompute, prefix caching, a host tier written through with prompts
    "vllm-v1": dict(preemption_mode="recompute", host_write_through="prompt", host_write_back=False),
    "sglang": dict(preemption_mode="recompute", host_write_through="prompt", host_write_back=True),
}
STRONGEST = ("recompute", "vllm-v1", "sglang")  # the presets a headline figure is compared against
PRIORITY_PATTERNS = ("none", "random", "markov")
ROUTING_KEYS = ("conversation", "user")  # what a request's X-SMG-Routing-Key names
COUNTERS = {  # summary key -> EngineStats field, and the Prometheus samples FastSwitch and vLLM expose it as
    "preemptions": ("preemptions", ("fastswitch:preemptions_total", "vllm:num_preemptions_total")),
    "recompute_preemptions": ("recompute_preemptions", ('fastswitch:preemptions_total{mode="recompute"}',)),
    "swap_out_blocks": ("swap_out_blocks", ("fastswitch:swap_out_blocks_total",)),
    "swap_out_bytes": ("swap_out_bytes", ("fastswitch:swap_out_bytes_total",)),
    "swap_in_blocks": ("swap_in_blocks", ("fastswitch:swap_in_blocks_total",)),
    "swap_in_bytes": ("swap_in_bytes", ("fastswitch:swap_in_bytes_total",)),
    "swap_copies": ("copies", ("fastswitch:swap_copies_total",)),
    "reuse_saved_blocks": ("reuse_saved_blocks", ("fastswitch:reuse_saved_blocks_total",)),
    "resume_device_blocks": ("resume_device_blocks", ("fastswitch:resume_device_blocks_total",)),
    "resume_recomputed_tokens": ("resume_recomputed_tokens", ("fastswitch:resume_recomputed_tokens_total",)),
    "prefix_host_hit_blocks": ("prefix_host_hit_blocks", ("fastswitch:prefix_host_hit_blocks_total",)),
    "writeback_blocks": ("writeback_blocks", ("fastswitch:writeback_blocks_total",)),
    "computed_tokens": ("computed_tokens", ("fastswitch:tokens_computed_total",)),
    "recompute_fallbacks": ("recompute_fallbacks", ("fastswitch:recompute_fallbacks_total",)),
    "stall_s": ("stall_s", ("fastswitch:stall_seconds_total",)),
    "iterations": ("iterations", ()),  # offline and simulated runs only
}


@dataclass
class RequestRecord:
    id: str
    conversation: str
    turn: int
    user: str
    priority: int | None  # at arrival
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int | None
    arrival_s: float  # since the run started
    ttft_s: float | None  # None when not served
    tbt_s: list[float]  # gaps between consecutive tokens
    preemptions: int | None = None
    paused_s: float | None = None  # time preempted (offline and simulated runs)
    outcome: str = "ok"  # "ok" (served), "rejected" (429 after the client's retries; shed offline), "timeout"
    rejections: int = 0  # 429s it got, retries included


def run_offline(engine: Engine, conversations: list[Conversation], progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Every turn of every conversation through `engine`, on its clock (real or simulated); returns the
    records and the run's duration."""
    clock = engine.core.clock
    start = clock.now()
    due = [(c.arrival_s, n, 0) for n, c in enumerate(conversations)]  # (seconds since start, conversation, turn)
    heapq.heapify(due)
    replies: list[list[list[int]]] = [[] for _ in conversations]
    live: dict[str, tuple[int, int, int]] = {}  # request id -> (conversation, turn, priority at arrival)
    records = []
    with tqdm(total=sum(len(c.turns) for c in conversations), unit="req", disable=not progress) as bar:
        while due or engine.has_unfinished_requests():
            now = clock.now() - start
            while due and due[0][0] <= now:
                at, n, k = heapq.heappop(due)
                c = conversations[n]
                request_id = engine.add_request(history_prompt(c, k, replies[n]), _params(c, k), f"{c.id}:{k}",
                                                arrival_time=start + at, user=c.user)
                live[request_id] = (n, k, engine.core.scheduler.requests[request_id].priority)
            if not engine.has_unfinished_requests():
                clock.sleep(due[0][0] - now)  # idle until the next arrival
                continue
            for out in engine.step():
                if not out.finished:
                    continue
                n, k, priority = live.pop(out.request_id)
                c = conversations[n]
                records.append(_offline_record(out, c, k, priority, start))
                if out.finish_reason == "rejected":
                    bar.update(len(c.turns) - k)  # this turn and the later ones, which need its reply
                    continue
                replies[n].append(out.token_ids)
                if k + 1 < len(c.turns):
                    heapq.heappush(due, (out.metrics.finish_time - start + c.turns[k + 1].think_s, n, k + 1))
                bar.update()
    return records, clock.now() - start


def engine_counters(stats: EngineStats) -> dict[str, float]:
    return {key: getattr(stats, field) for key, (field, _) in COUNTERS.items()}


def _params(c: Conversation, turn: int) -> SamplingParams:
    return SamplingParams(max_tokens=c.turns[turn].reply_len, ignore_eos=True, temperature=0.0)


def _offline_record(out: RequestOutput, c: Conversation, turn: int, priority: int, start: float) -> RequestRecord:
    m, rejected = out.metrics, out.finish_reason == "rejected"
    return RequestRecord(out.request_id, c.id, turn, c.user, priority, len(out.prompt_token_ids), len(out.token_ids),
                         out.num_cached_tokens, m.arrival_time - start,
                         None if rejected else m.first_token_time - m.arrival_time, _gaps(m.token_times),
                         m.num_preemptions, m.paused_s, "rejected" if rejected else "ok", int(rejected))


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# -- over HTTP ------------------------------------------------------------------------------------------


async def run_http(url: str, conversations: list[Conversation], priorities: str = "none", levels: int = 4,
                   seed: int = 0, progress: bool = True, request_timeout_s: float | None = None,
                   max_retries: int = 2, text: Tokenizer | None = None,
                   routing_key: str = "conversation") -> tuple[list[RequestRecord], float]:
    """Every turn of every conversation against the server at `url` (its /v1 base). A turn refused with 429 is
    sent again up to `max_retries` times; one not streamed in full within `request_timeout_s` of its first send
    is abandoned. With `text`, a tokenizer, prompts go as the text it decodes the history to. `routing_key`
    ("conversation" or "user") is what the X-SMG-Routing-Key header names."""
    if routing_key not in ROUTING_KEYS:
        raise ValueError(f"invalid routing key {routing_key!r}; choose from {', '.join(ROUTING_KEYS)}")
    # Idle connections are dropped before the server's keep-alive timeout (uvicorn's: 5 s) can close one
    # just as a request goes out on it, which fails that request with a ReadError.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=1.0)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=None, limits=limits) as client:
        model = (await _get_json(client, "/models"))["data"][0]["id"]
        records: list[RequestRecord] = []
        with tqdm(total=sum(len(c.turns) for c in conversations), unit="req", disable=not progress) as bar:
            start = time.monotonic()
            await asyncio.gather(*(_converse(client, model, c, _priorities(priorities, levels, seed, n, len(c.turns)),
                                             start, records, bar, max_retries, request_timeout_s, text,
                                             c.user if routing_key == "user" else c.id)
                                   for n, c in enumerate(conversations)))
        return records, time.monotonic() - start


def _priorities(pattern: str, levels: int, seed: int, n: int, turns: int) -> list[int | None]:
    """Each turn's priority, drawn from the conversation's own seeded stream (so it does not depend on timing)."""
    if pattern not in PRIORITY_PATTERNS:
        raise ValueError(f"invalid priority pattern {pattern!r}; choose from {', '.join(PRIORITY_PATTERNS)}")
    if pattern == "none":
        return [None] * turns
    rng = random.Random(seed * 1_000_003 + n)
    drawn = [rng.randrange(levels)]
    for _ in range(turns - 1):
        drawn.append(rng.randrange(levels) if pattern == "random"
                     else min(levels - 1, max(0, drawn[-1] + rng.choice((-1, 1)))))
    return drawn


async def _converse(client: httpx.AsyncClient, model: str, c: Conversation, priorities: list[int | None], start: float,
                    records: list[RequestRecord], bar: tqdm, max_retries: int, timeout_s: float | None,
                    text: Tokenizer | None, key: str) -> None:
    """One conversation's turns in order; `key` is its requests' X-SMG-Routing-Key."""
    await asyncio.sleep(max(0.0, start + c.arrival_s - time.monotonic()))
    replies: list[list[int]] = []
    for k, turn in enumerate(c.turns):
        if k:
            await asyncio.sleep(turn.think_s)
        prompt = history_prompt(c, k, replies)
        body = {"model": model, "prompt": text.decode(prompt) if text else prompt, "max_tokens": turn.reply_len, "ignore_eos": True,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                "return_token_ids": True, "user": c.user}
        if priorities[k] is not None:
            body["priority"] = priorities[k]
        sent = time.monotonic()
        outcome, rejections, (tokens, times, cached) = await _reply(client, body, {"x-smg-routing-key": key},
                                                                    max_retries, timeout_s)
        if outcome == "ok" and len(tokens) != turn.reply_len:
            raise RuntimeError(f"{c.id} turn {k}: asked for {turn.reply_len} tokens, got {len(tokens)} "
                               "(does the server return token ids with return_token_ids?)")
        records.append(RequestRecord(f"{c.id}:{k}", c.id, k, c.user, priorities[k], len(prompt), len(tokens), cached,
                                     sent - start, times[0] - sent if times else None, _gaps(times), outcome=outcome,
                                     rejections=rejections))
        if outcome != "ok":
            bar.update(len(c.turns) - k)  # this turn and the later ones, which need its reply
            return
        replies.append(tokens)
        bar.update()


class _Rejected(Exception):  # HTTP 429
    def __init__(self, retry_after_s: float):
        self.retry_after_s = retry_after_s


async def _reply(client: httpx.AsyncClient, body: dict, headers: dict[str, str], max_retries: int,
                 timeout_s: float | None) -> tuple[str, int, tuple[list[int], list[float], int | None]]:
    """The outcome, the 429s received and the streamed reply (what had arrived, if it timed out). The timeout
    runs from the first send, so waiting out a Retry-After counts; on it the stream is closed, which aborts the
    request."""
    rejections, tokens, times = 0, [], []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    return "ok", rejections, (tokens, times, await _stream(client, body, headers, tokens, times))
                except _Rejected as rejected:
                    rejections += 1
                    if rejections > max_retries:
                        return "rejected", rejections, ([], [], None)
                    await asyncio.sleep(rejected.retry_after_s)
    except TimeoutError:
        return "timeout", rejections, (tokens, times, None)


def _retry_after_s(response: httpx.Response) -> float:
    """The seconds a 429's Retry-After asks for, at most 60; 1 when absent or not a number (an HTTP date)."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return 1.0
    return min(seconds, 60.0) if seconds >= 0 else 1.0  # NaN and negatives as unparsable


async def _stream(client: httpx.AsyncClient, body: dict, headers: dict[str, str], tokens: list[int],
                  times: list[float]) -> int | None:
    """Append the streamed reply's token ids and the time each arrived, as they come; the cached prompt tokens if
    reported. Raises `_Rejected` on a 429."""
    cached = None
    async with client.stream("POST", "/completions", json=body, headers=headers) as response:
        if response.status_code == 429:
            await response.aread()  # the whole body read, the connection goes back to the pool
            raise _Rejected(_retry_after_s(response))
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk, now = json.loads(line[6:]), time.monotonic()
            for choice in chunk.get("choices") or []:
                ids = choice.get("token_ids") or []
                tokens += ids
                times += [now] * len(ids)  # a chunk with several tokens: they arrived together
            details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens", cached)
    return cached


async def _get_json(client: httpx.AsyncClient, path: str) -> dict:
    response = await client.get(path)
    response.raise_for_status()
    return response.json()


def server_counters(url: str) -> dict[str, float | None]:
    """The counters a server's Prometheus /metrics exposes (None for those it does not, all None without /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(url.rstrip("/").removesuffix("/v1") + "/metrics", timeout=30)
    if response.status_code == 404:  # a router in front of the servers (SMG serves its metrics elsewhere)
        return {key: None for key in COUNTERS}
    response.raise_for_status()
    values: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[sample.name] += sample.value  # summed over labels (preemptions by mode), and by each label
            for label, value in sample.labels.items():
                values[f'{sample.name}{{{label}="{value}"}}'] += sample.value
    return {key: next((values[n] for n in names if n in values), None) for key, (_, names) in COUNTERS.items()}


@contextlib.contextmanager
def fastswitch_server(config: EngineConfig, startup_timeout_s: float = 600.0):
    """`fastswitch serve` with this configuration in a child process; yields its /v1 URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "fastswitch", "serve", "--port", str(port), *config.to_cli_args()]
    log.info("starting %s", " ".join(argv))
    server = subprocess.Popen(argv)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fastswitch serve did not start (exit code {server.poll()})")
            time.sleep(0.2)  # polling a child process's readiness
        yield url + "/v1"
    finally:
        server.terminate()
        server.wait(timeout=60)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
