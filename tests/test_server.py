"""The real server on a loopback port, driven by the official `openai` client and raw HTTP."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastswitch import LLM, SamplingParams
from fastswitch.model.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.serving import Server, gone


@pytest.fixture(scope="module")
def server(llama_dir):
    # Level 1 cannot make its targets; level 5 (and worse) is shed at once, as past capacity.
    s = Server(llama_dir, "--slo-ttft", "0=60,1=1e-9", "--slo-tbt", "0=60,1=1e-9", "--shed", "5=1")
    yield s
    assert s.stop() == 0, "SIGTERM should end the server cleanly"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


GREEDY = dict(temperature=0.0, max_tokens=12, extra_body={"ignore_eos": True})


def offline(llama_dir, prompt, max_tokens=12):
    llm = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64)
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)[0]


def test_completions_match_the_offline_api(client, llama_dir, prompts):
    expected = offline(llama_dir, "Return the number of items")
    out = client.completions.create(model="tiny", prompt="Return the number of items", **GREEDY)
    assert out.choices[0].text == expected.text and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids) and out.usage.completion_tokens == 12
    by_ids = client.completions.create(model="tiny", prompt=prompts[3], temperature=0.0, max_tokens=12,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    assert by_ids.choices[0].model_extra["token_ids"] == offline(llama_dir, prompts[3]).token_ids
    assert by_ids.choices[0].model_extra["prompt_token_ids"] == prompts[3]


def test_streaming_completion_with_usage_and_token_ids(client, llama_dir, prompts):
    expected = offline(llama_dir, prompts[4])
    chunks = list(client.completions.create(model="tiny", prompt=prompts[4], stream=True,
                                            stream_options={"include_usage": True}, temperature=0.0, max_tokens=12,
                                            extra_body={"ignore_eos": True, "return_token_ids": True}))
    deltas = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in deltas) == expected.text
    assert sum((c.choices[0].model_extra["token_ids"] for c in deltas), []) == expected.token_ids
    assert deltas[0].choices[0].model_extra["prompt_token_ids"] == prompts[4]
    assert deltas[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(prompts[4])


def test_chat_streaming_and_not(client, llama_dir):
    messages = [{"role": "user", "content": "What does a context switch cost?"}]
    expected = offline(llama_dir, messages)
    out = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert out.choices[0].message.content == expected.text and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text


def test_priority_user_and_cached_tokens(client, server, prompts):
    history = prompts[7]  # 300 tokens: 18 full blocks, cached after the first request
    first = client.completions.create(model="tiny", prompt=history, max_tokens=2, extra_body={"priority": 3}, user="alice")
    again = client.completions.create(model="tiny", prompt=history + [5, 6], max_tokens=2, extra_body={"priority": -1},
                                      extra_headers={"x-fastswitch-user": "bob"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 18 * 16
    metrics = server.metrics()
    assert metrics["fastswitch:time_to_first_token_seconds_count[('priority', '3')]"] >= 1
    assert metrics["fastswitch:time_to_first_token_seconds_count[('priority', '-1')]"] >= 1


def test_what_routers_read_load_and_the_fairness_key_from_their_headers(llama_dir):
    """vLLM's gauge names and /get_load for a router's load; the body's `user`, then our header, then the ones
    SMG and vllm-router forward or key sessions on, as the fairness key (vtc's per-user service shows it)."""
    s = Server(llama_dir, "--policy", "vtc")
    try:
        ask = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused").completions.create
        ask(model="tiny", prompt="hi", max_tokens=2, user="body", extra_headers={"x-session-id": "ignored"})
        order = ("x-fastswitch-user", "x-smg-routing-key", "x-session-id", "x-user-id")
        for i in range(len(order)):  # each header with every later one: the first wins
            ask(model="tiny", prompt="hi", max_tokens=2, extra_headers={h: f"{h}-{i}" for h in order[i:]})
        metrics = s.metrics()
        users = {k.split("'user', '")[1].removesuffix("')]") for k in metrics
                 if k.startswith("fastswitch:vtc_user_service")}
        assert users == {"body", *(f"{h}-{i}" for i, h in enumerate(order))}
        assert httpx.get(f"{s.url}/get_load").json() == {"load": 0}
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            assert metrics[f"vllm:{name}[('model_name', 'tiny')]"] == metrics[f"fastswitch:{name}"]
    finally:
        assert s.stop() == 0


def test_cpu_cores_pin_the_server_and_its_engine_core(llama_dir):
    core = min(os.sched_getaffinity(0))
    s = Server(llama_dir, "--cpu-cores", str(core))
    try:
        for pid in (s.proc.pid, s.core_pid()):
            status = Path(f"/proc/{pid}/status").read_text()
            assert next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list")).split()[1] == str(core)
        ok = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused")
        assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        assert s.stop() == 0


def test_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                         top_logprobs=2, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 12 and all(len(c.top_logprobs) >= 2 and c.logprob <= 0 for c in content)
    done = client.completions.create(model="tiny", prompt="hi", logprobs=1, **GREEDY)
    assert len(done.choices[0].logprobs.token_logprobs) == 12


def wait_until_idle(server: Server) -> dict:
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        if (m["fastswitch:num_requests_running"] == 0 and m["fastswitch:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_a_client_closing_its_stream_aborts_the_request(server):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.metrics()["fastswitch:num_requests_running"] == 1
    m = wait_until_idle(server)  # the request was aborted and its KV released
    assert m["fastswitch:num_requests_running"] == 0 and m["fastswitch:kv_cache_usage_perc"] == 0


def test_64_concurrent_streaming_clients(server):
    async def one(client, i):
        stream = await client.completions.create(model="tiny", prompt=f"request {i}", max_tokens=8 + i % 5, stream=True,
                                                 extra_body={"ignore_eos": True, "return_token_ids": True})
        tokens = []
        async for chunk in stream:
            tokens += chunk.choices[0].model_extra["token_ids"] if chunk.choices else []
        return len(tokens) == 8 + i % 5

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert all(asyncio.run(main()))
    assert wait_until_idle(server)["fastswitch:kv_cache_usage_perc"] == 0


BAD = [
    ("malformed JSON", "{not json", "body"),
    ("wrong type", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("unknown model", {"model": "gpt-9", "prompt": "hi"}, "model"),
    ("prompt over the context limit", {"prompt": [5] * 5000}, "prompt"),
    ("max_tokens < 1", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("n > 1", {"prompt": "hi", "n": 2}, "n"),
    ("priority not an int", {"prompt": "hi", "priority": "high"}, "priority"),
    ("priority a float", {"prompt": "hi", "priority": 1.5}, "priority"),
    ("empty prompt", {"prompt": ""}, None),
    ("no prompt", {"max_tokens": 3}, "prompt"),
    ("token id out of range", {"prompt": [1, 999999]}, "prompt"),
    ("negative temperature", {"prompt": "hi", "temperature": -1}, "temperature"),
]


@pytest.mark.parametrize("case, body, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_400_and_the_server_keeps_serving(server, client, case, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server.url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert error["param"] == param or param in error["message"]
    assert client.completions.create(model="tiny", prompt="still there", max_tokens=2).choices[0].finish_reason


def test_chat_bad_input(server):
    for body in ({"messages": []}, {"messages": [{"content": "no role"}]},
                 {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}):
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert r.status_code == 400 and "error" in r.json()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(
    st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "priority", "seed",
                     "min_tokens", "logprobs", "stream", "user", "repetition_penalty", "stop_token_ids", "messages"]),
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=20),
              st.lists(st.integers(-5, 5000), max_size=5), st.lists(st.text(max_size=5), max_size=3)),
    max_size=6))
def test_fuzzed_bodies_never_get_a_5xx(server, body):
    body.setdefault("max_tokens", 2)
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(f"{server.url}{path}", content=json.dumps(body, allow_nan=True),
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code < 500, (path, body, r.text)


def test_metrics_parse_and_move(server, client):
    before = server.metrics()
    client.completions.create(model="tiny", prompt="count me", max_tokens=3, extra_body={"ignore_eos": True})
    after = server.metrics()
    assert after["fastswitch:generation_tokens_total"] == before["fastswitch:generation_tokens_total"] + 3
    assert after["fastswitch:prompt_tokens_total"] > before["fastswitch:prompt_tokens_total"]
    assert "fastswitch:num_requests_waiting" in after and "fastswitch:swap_out_bytes_total" in after
    assert after["fastswitch:request_paused_seconds_count[('priority', '0')]"] >= 1
    assert "fastswitch:request_preemptions_total[('priority', '0')]" in after


def test_slo_attainment_is_counted_per_level_and_kind(server, client):
    def count(metrics, outcome, level, kind):
        return metrics.get(f"fastswitch:slo_{outcome}_total[('kind', '{kind}'), ('priority', '{level}')]", 0)

    before = server.metrics()
    for level in (0, 1):
        client.completions.create(model="tiny", prompt="on time?", max_tokens=3,
                                  extra_body={"ignore_eos": True, "priority": level})
    after = server.metrics()
    for kind in ("ttft", "tbt"):
        assert count(after, "attained", 0, kind) == count(before, "attained", 0, kind) + 1
        assert count(after, "missed", 1, kind) == count(before, "missed", 1, kind) + 1
        assert count(after, "missed", 0, kind) == count(before, "missed", 0, kind)


def test_a_request_shed_past_capacity_gets_429_with_retry_after_and_nothing_else_is_lost(server, client):
    def shed(metrics):
        return metrics.get("fastswitch:requests_rejected_total[('priority', '5'), ('reason', 'overloaded')]", 0)

    before = server.metrics()
    stream = client.completions.create(model="tiny", prompt="keeps going", max_tokens=16, stream=True,
                                       extra_body={"ignore_eos": True})
    for body in ({"prompt": "shed me", "max_tokens": 4, "priority": 5},
                 {"prompt": "shed me too", "max_tokens": 4, "priority": 6, "stream": True}):
        r = httpx.post(f"{server.url}/v1/completions", json=body)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "overloaded" and "priority" in error["message"]
    with pytest.raises(openai.RateLimitError):
        client.with_options(max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={"priority": 5})
    assert sum(len(c.choices[0].text) > 0 for c in stream if c.choices) >= 1  # the stream ran on to its end
    deadline = time.monotonic() + 10
    while (after := server.metrics())["fastswitch:num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)  # the idle snapshot comes after the last step
    assert shed(after) == shed(before) + 2  # the completion and the chat request (priority 6 has its own label)
    assert after["fastswitch:num_requests_waiting"] == 0 and after["fastswitch:kv_cache_usage_perc"] == 0


def test_api_key_and_limits(llama_dir):
    s = Server(llama_dir, "--api-key", "sekret", "--max-request-bytes", "2000", "--max-queue", "1")
    try:
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi"}, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert httpx.get(f"{s.url}/health").status_code == 200  # operations endpoints need no key
        ok = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekret")
        assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "x" * 5000},
                       headers={"authorization": "Bearer sekret"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": ["a", "b"]}, headers={"authorization": "Bearer sekret"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"]
    finally:
        assert s.stop() == 0


def test_cli_rejects_bad_server_options(llama_dir):
    result = subprocess.run([sys.executable, "-m", "fastswitch", "serve", "--model", llama_dir, "--port", "0"],
                            capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 2 and "port" in result.stderr


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(llama_dir):
    s = Server(llama_dir, "--shutdown-timeout", "20")
    core = s.core_pid()
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 40, "stream": True, "ignore_eos": True,
            "return_token_ids": True}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = next(lines)
        s.proc.send_signal(signal.SIGTERM)  # mid-stream
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"  # the request in flight was served to its end ...
    chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 40  # ... every one of its tokens
    assert s.proc.wait(timeout=60) == 0
    assert gone(core), "the engine core outlived the server"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{s.url}/health", timeout=2)  # and nothing new is accepted


def test_stop_strings_that_span_token_boundaries(client, llama_dir):
    """The stop string is found by the API server, across the text of two tokens, and ends the request."""
    full = offline(llama_dir, "Return the number of items", max_tokens=24)
    tokenizer = Tokenizer(llama_dir)
    detokenizer = IncrementalDetokenizer(tokenizer, full.prompt_token_ids, True)
    pieces = [detokenizer.step(t) for t in full.token_ids]
    at = next(i for i in range(1, len(pieces) - 1) if pieces[i] and pieces[i + 1]
              and full.text.find(pieces[i][-1] + pieces[i + 1][0]) == len("".join(pieces[: i + 1])) - 1)
    stop = pieces[at][-1] + pieces[at + 1][0]
    expected = full.text[: full.text.find(stop)]
    kwargs = dict(model="tiny", prompt="Return the number of items", temperature=0.0, max_tokens=24, stop=[stop],
                  extra_body={"ignore_eos": True})
    out = client.completions.create(**kwargs).choices[0]
    assert out.text == expected and out.finish_reason == "stop" and out.model_extra["stop_reason"] == stop
    streamed = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_kill_9_of_the_engine_core_mid_stream(llama_dir):
    """Streams in flight end with an error event at once; 503s meanwhile; then the server exits non-zero."""
    s = Server(llama_dir)
    core = s.core_pid()
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(core, signal.SIGKILL)
        killed = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    assert time.monotonic() - killed < 2
    assert "error" in json.loads(rest[-1][6:])
    refused = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
    assert httpx.get(f"{s.url}/health").status_code == 503
    assert s.proc.wait(timeout=15) != 0
    assert gone(core)


def test_the_engine_core_exits_when_the_api_server_is_killed(llama_dir):
    s = Server(llama_dir)
    core = s.core_pid()
    s.proc.kill()
    s.proc.wait(timeout=10)
    assert gone(core), "an orphaned engine core"


def test_an_engine_core_that_cannot_start_is_a_one_line_error(llama_dir):
    result = subprocess.run([sys.executable, "-m", "fastswitch", "serve", "--model", llama_dir, "--device", "cpu",
                             "--max-model-len", "1000000"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fastswitch: error: max_model_len=1000000 exceeds")


@pytest.fixture(scope="module")
def fuzzed_server(llama_dir):
    """A server with a short context limit, so no generated request runs for long; afterwards it still
    serves, and nothing is left running."""
    s = Server(llama_dir, "--max-model-len", "64")
    yield s
    out = httpx.post(f"{s.url}/v1/completions", json={"prompt": "still here", "max_tokens": 4, "ignore_eos": True},
                     timeout=60)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 4
    assert wait_until_idle(s)["fastswitch:kv_cache_usage_perc"] == 0
    assert s.stop() == 0


def test_requests_generated_from_the_openapi_schema_never_get_a_5xx(fuzzed_server):
    """schemathesis generates requests for every operation of the server's own OpenAPI schema."""
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for operation in operations:

        @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def never_a_5xx(case):
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.status_code,
                                                 response.text[:300])

        never_a_5xx()
