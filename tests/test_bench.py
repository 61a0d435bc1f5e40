"""The conversation benchmark: its figures on known data, priorities over HTTP, and short end-to-end runs."""

import asyncio
import contextlib
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from fastswitch.bench import report
from fastswitch.bench.report import jain_index, load, load_requests, summarize
from fastswitch.bench.runner import PRESETS, RequestRecord, _priorities, _retry_after_s, run_http, run_offline
from fastswitch.bench.workload import Conversation, SyntheticSpec, Turn, synthetic
from fastswitch.config import EngineConfig
from fastswitch.engine.engine import Engine
from fastswitch.slo import SLO
from tests.test_cli import run_cli

SUMMARY_KEYS = {"ttft_p50", "ttft_p95", "ttft_p99", "ttft_p999", "tbt_p50", "tbt_p99", "tbt_p999", "throughput_tok_s",
                "preemptions", "swap_out_blocks", "swap_out_bytes", "reuse_saved_blocks", "stall_s", "goodput_req_s",
                "ttft_p99_by_priority", "slo_attainment_by_priority", "lowest_level_ttft_p99", "jain_index",
                "served", "rejected", "timed_out", "rejections", "rejected_by_priority", "timed_out_by_priority",
                "tbt_p99_by_priority", "tbt_p999_by_priority", "cached_prompt_share"}


def record(i: int, ttft: float, tbt: list[float], user: str = "u", priority: int | None = None) -> RequestRecord:
    return RequestRecord(f"r{i}", "c", 0, user, priority, 10, len(tbt) + 1, 0, 0.0, ttft, tbt)


def not_served(i: int, outcome: str, priority: int, rejections: int) -> RequestRecord:
    return RequestRecord(f"r{i}", "c", 0, "u", priority, 10, 0, None, 0.0, None, [], outcome=outcome,
                         rejections=rejections)


def test_percentiles_goodput_and_fairness_on_known_data():
    records = [record(i, ttft=i / 1000, tbt=[0.01] * 9 + [i / 100], priority=i % 2) for i in range(1, 1001)]
    s = summarize(records, duration_s=100.0, counters={"preemptions": 7}, slo=SLO.parse("0.5", "0.05"))
    assert s["ttft_p50"] == pytest.approx(0.5005) and s["ttft_p99"] == pytest.approx(0.99001)
    assert s["cached_prompt_share"] == 0.0  # no record reports a cached token
    assert s["ttft_p999"] == pytest.approx(0.999001) and s["ttft_p95"] == pytest.approx(0.95005)
    assert s["tbt_p50"] == pytest.approx(0.01)  # 9 of every 10 gaps
    assert s["tbt_p99"] == pytest.approx(sorted(g for r in records for g in r.tbt_s)[9900], rel=0.01)
    assert s["throughput_tok_s"] == pytest.approx(11 * 1000 / 100)
    # met: TTFT <= 0.5 s (i <= 500) and mean TBT (0.09 + i/100) / 10 <= 0.05 (i <= 41)
    assert s["slo_attainment"] == pytest.approx(41 / 1000) and s["goodput_req_s"] == pytest.approx(0.41)
    assert s["ttft_p99_by_priority"]["0"] == pytest.approx(0.99002) and set(s["ttft_p99_by_priority"]) == {"0", "1"}
    assert s["slo_attainment_by_priority"] == {"0": pytest.approx(20 / 500), "1": pytest.approx(21 / 500)}
    assert s["lowest_level_ttft_p99"] == s["ttft_p99_by_priority"]["1"]
    assert s["preemptions"] == 7 and s["swap_out_blocks"] is None
    assert s.keys() >= SUMMARY_KEYS


def test_rejected_and_timed_out_requests_are_misses_outside_the_latencies(tmp_path):
    records = [record(1, 0.1, [0.01] * 4, priority=0), record(2, 0.2, [0.01] * 4, priority=0),
               record(3, 0.3, [0.02] * 4, priority=1), record(4, 1.5, [0.02] * 3 + [0.5], priority=1),
               not_served(5, "rejected", 0, 3), not_served(6, "rejected", 1, 3), not_served(7, "timeout", 1, 1),
               not_served(8, "rejected", 2, 3)]
    s = summarize(records, duration_s=10.0, counters={})  # default targets: TTFT 0.5 s at level 0, 1 s at level 1
    assert (s["requests"], s["served"], s["rejected"], s["timed_out"], s["rejections"]) == (8, 4, 3, 1, 10)
    assert s["ttft_p50"] == pytest.approx(0.25) and s["output_tokens"] == 20  # the four served
    assert s["slo_attainment"] == pytest.approx(3 / 8) and s["goodput_req_s"] == pytest.approx(0.3)
    assert s["slo_attainment_by_priority"] == {"0": pytest.approx(2 / 3), "1": pytest.approx(1 / 4), "2": 0.0}
    assert s["ttft_p99_by_priority"] == {"0": pytest.approx(0.199), "1": pytest.approx(1.488), "2": None}
    assert s["lowest_level_ttft_p99"] is None  # level 2 had nothing served
    assert s["rejected_by_priority"] == {"0": 1, "1": 1, "2": 1}
    assert s["timed_out_by_priority"] == {"0": 0, "1": 1, "2": 0}
    assert s["tbt_p99_by_priority"]["0"] == pytest.approx(0.01) and s["tbt_p999_by_priority"]["1"] > 0.45
    assert s["tbt_p99_by_priority"]["2"] is None
    assert f"| {3 / 8:.1%} | 3 | 1 |" in report.table([{"label": "x", "summary": s}])
    report.write(tmp_path, {"label": "x", "summary": s}, records)
    assert load(tmp_path)["ttft_quantiles"][-1] == 1.5 and load_requests(tmp_path)[7]["outcome"] == "rejected"
    plots = report.plot([load(tmp_path)], tmp_path)
    assert (tmp_path / "priority_levels.png") in plots and (tmp_path / "cached_prompt_share.png") in plots


def test_jain_index_is_one_when_service_is_equal_and_falls_as_one_user_gets_more():
    assert jain_index([record(i, 0.1, [0.1], user=f"u{i % 4}") for i in range(8)]) == pytest.approx(1.0)
    lopsided = [record(0, 0.1, [0.1] * 50, user="a")] + [record(i, 0.1, [], user=f"u{i}") for i in range(1, 4)]
    assert jain_index(lopsided) == pytest.approx((112 + 3 * 12) ** 2 / (4 * (112**2 + 3 * 12**2)))  # 10 + 2 x 51, 10 + 2 x 1


def test_summary_lists_each_user_while_there_are_few():
    records = [record(0, 0.5, [0.1], user="a"), record(1, 1.5, [0.1, 0.1], user="a"), record(2, 2.0, [], user="b"),
               RequestRecord("r3", "c", 0, "b", None, 10, 0, None, 0.0, None, [], outcome="timeout")]
    s = summarize(records, 10.0, {})
    assert s["served_by_user"] == {"a": 2, "b": 1} and s["output_tokens_by_user"] == {"a": 5, "b": 1}
    assert s["ttft_p50_by_user"] == {"a": pytest.approx(1.0), "b": 2.0}
    assert s["ttft_p99_by_user"]["a"] == pytest.approx(1.49)
    many = summarize([record(i, 0.1, [], user=f"u{i}") for i in range(report.USERS_BROKEN_OUT + 1)], 1.0, {})
    assert "ttft_p99_by_user" not in many


def test_http_priorities_are_seeded_and_markov_moves_one_level():
    markov = _priorities("markov", 4, seed=1, n=3, turns=200)
    assert markov == _priorities("markov", 4, seed=1, n=3, turns=200) != _priorities("markov", 4, seed=1, n=4, turns=200)
    assert all(abs(a - b) == 1 or a == b in (0, 3) for a, b in zip(markov, markov[1:]))
    assert set(_priorities("random", 4, 1, 3, 200)) == {0, 1, 2, 3}
    assert _priorities("none", 4, 1, 3, 5) == [None] * 5


def test_retry_after_is_honoured_up_to_a_minute_and_one_second_when_unreadable():
    seconds = [_retry_after_s(httpx.Response(429, headers={"Retry-After": v} if v else {}))
               for v in ("3", "600", "Wed, 21 Oct 2015 07:28:00 GMT", "nan", "-1", None)]
    assert seconds == [3.0, 60.0, 1.0, 1.0, 1.0, 1.0]


@contextlib.contextmanager
def scripted_server(refusals: int, retry_after: str | None = "1", token_gap_s: float = 0.0):
    """A real OpenAI-style HTTP server in a thread: it answers its first `refusals` completions with 429 (with
    `Retry-After`, unless None), then streams each a token id per `token_gap_s`. It notes when each request
    arrived (`sends`) and when a client closed a stream before its end (`aborted`), on time.monotonic."""
    state = SimpleNamespace(sends=[], aborted=[], prompts=[], keys=[])

    async def completions(request):
        body = await request.json()
        state.sends.append(time.monotonic())
        state.prompts.append(body["prompt"])
        state.keys.append(request.headers.get("x-smg-routing-key"))
        if len(state.sends) <= refusals:
            error = {"message": "overloaded", "type": "rate_limit_error", "param": None, "code": "overloaded"}
            return JSONResponse({"error": error}, 429, {"Retry-After": retry_after} if retry_after else None)

        async def events():
            done = False
            try:
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(token_gap_s)
                    yield f"data: {json.dumps({'choices': [{'token_ids': [3 + i]}]})}\n\n"
                yield "data: [DONE]\n\n"
                done = True
            finally:  # a client's disconnect cancels the stream here
                if not done:
                    state.aborted.append(time.monotonic())
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/models", lambda _: JSONResponse({"data": [{"id": "m"}]})),
                            Route("/v1/completions", completions, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run)
    thread.start()
    while not server.started:
        time.sleep(0.01)  # waiting for the server thread to listen
    state.url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(10)


def conversation(turns: int, reply_len: int = 4) -> Conversation:
    return Conversation("c", "u", 0.0, [Turn([5, 6, 7], reply_len, 0.0) for _ in range(turns)])


def test_http_client_waits_out_retry_after_and_counts_the_wait_in_ttft(capsys):
    with scripted_server(refusals=2, retry_after="1") as server:
        records, _ = asyncio.run(run_http(server.url, [conversation(turns=2)]))
    assert len(server.sends) == 4 and all(b - a >= 1.0 for a, b in zip(server.sends[:2], server.sends[1:3]))
    first, second = sorted(records, key=lambda r: r.turn)
    assert (first.outcome, first.rejections, first.output_tokens) == ("ok", 2, 4) and first.ttft_s >= 2.0
    assert (second.outcome, second.rejections) == ("ok", 0) and second.ttft_s < 1.0
    assert "2/2" in capsys.readouterr().err


def test_http_client_gives_up_after_its_retries_and_ends_the_conversation(capsys):
    with scripted_server(refusals=100, retry_after=None) as server:
        records, _ = asyncio.run(run_http(server.url, [conversation(turns=3)], max_retries=1))
    assert len(server.sends) == 2 and server.sends[1] - server.sends[0] >= 1.0  # 1 s without a Retry-After
    [r] = records
    assert (r.outcome, r.rejections, r.ttft_s, r.tbt_s, r.output_tokens) == ("rejected", 2, None, [], 0)
    assert "3/3" in capsys.readouterr().err  # the two turns never sent are counted too


def test_http_client_abandons_a_turn_past_its_timeout_and_closes_the_stream():
    late = Conversation("late", "u", 1.0, [Turn([5], 1, 0.0)])  # keeps the client open after the timeout
    with scripted_server(refusals=0, token_gap_s=0.2) as server:
        records, duration = asyncio.run(run_http(server.url, [conversation(turns=2, reply_len=20), late],
                                                 request_timeout_s=0.5, progress=False))
    abandoned, served = sorted(records, key=lambda r: r.conversation)
    assert (abandoned.outcome, abandoned.rejections) == ("timeout", 0)
    # what had streamed is kept: its first token at 0.2 s, a second 0.2 s later, then the timeout at 0.5 s
    assert 0.2 <= abandoned.ttft_s < 0.5 and abandoned.output_tokens == 2 and len(abandoned.tbt_s) == 1
    assert served.outcome == "ok" and len(server.sends) == 2  # the abandoned conversation's second turn never sent
    assert len(server.aborted) == 1 and server.aborted[0] < server.sends[1], "the stream was not closed at the timeout"
    assert duration < 2.0  # 20 tokens would take 4 s


def test_http_client_sends_text_prompts_for_routers_and_keys_each_conversation():
    from fastswitch.model.demo import default_model_path
    from fastswitch.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(default_model_path())
    c = conversation(turns=2, reply_len=3)
    with scripted_server(refusals=0) as server:
        asyncio.run(run_http(server.url, [c], progress=False, text=tokenizer))
    first, second = server.prompts
    assert first == tokenizer.decode(c.turns[0].user_tokens)  # the history as text, not token ids
    assert second.startswith(first) and len(second) > len(first)  # the next turn continues it
    assert server.keys == [c.id, c.id]


def test_http_client_keys_requests_by_user_when_asked():
    ann = Conversation("c1", "ann", 0.0, [Turn([5], 2, 0.0)] * 2)
    bob = Conversation("c2", "bob", 0.0, [Turn([5], 2, 0.0)])
    with scripted_server(refusals=0) as server:
        asyncio.run(run_http(server.url, [ann, bob], progress=False, routing_key="user"))
        with pytest.raises(ValueError, match="routing key"):
            asyncio.run(run_http(server.url, [bob], progress=False, routing_key="tenant"))
    assert sorted(server.keys) == ["ann", "ann", "bob"]


def test_every_preset_is_a_valid_engine_configuration():
    for name, options in PRESETS.items():
        EngineConfig(**options)


WORKLOAD = ["--conversations", "6", "--rate", "50", "--input-mean", "60", "--output-mean", "30", "--think-mean", "0.02",
            "--max-context", "300", "--num-kv-blocks", "24", "--trace-update-freq", "0.3", "--dtype", "float32"]


def test_offline_runs_and_their_comparison(tmp_path, capsys, llama_dir):
    conversations = synthetic(SyntheticSpec(conversations=6, rate=50, input_mean=60, output_mean=30, think_mean_s=0.02,
                                            max_context=300))
    for preset in ("baseline", "fastswitch"):
        code, out, _ = run_cli(capsys, "bench", "run", "--preset", preset, "--model", llama_dir,
                               "--out", str(tmp_path / preset), *WORKLOAD)
        assert code == 0 and f"| {preset} |" in out
    runs = {p: load(tmp_path / p) for p in ("baseline", "fastswitch")}
    for preset, run in runs.items():
        assert run["summary"].keys() >= SUMMARY_KEYS and run["config"]["policy"] == "trace"
        requests = load_requests(tmp_path / preset)
        assert len(requests) == sum(len(c.turns) for c in conversations)
        assert sum(r["output_tokens"] for r in requests) == sum(t.reply_len for c in conversations for t in c.turns)
        assert run["ttft_quantiles"] == sorted(run["ttft_quantiles"])
        assert run["ttft_quantiles"][-1] == pytest.approx(max(r["ttft_s"] for r in requests), abs=1e-6)
        assert run["summary"]["preemptions"] > 0 and run["summary"]["swap_out_blocks"] > 0, "memory was not tight"
        assert 0 <= run["summary"]["recompute_preemptions"] <= run["summary"]["preemptions"]
    assert runs["baseline"]["summary"]["reuse_saved_blocks"] == 0 and runs["baseline"]["config"]["swap_mode"] == "baseline"
    assert runs["fastswitch"]["summary"]["swap_copies"] < runs["baseline"]["summary"]["swap_copies"]

    code, out, _ = run_cli(capsys, "bench", "compare", str(tmp_path / "baseline"), str(tmp_path / "fastswitch"),
                           "--out", str(tmp_path / "cmp"))
    assert code == 0 and "| baseline |" in out and "| fastswitch |" in out
    for name in ("compare.md", "ttft_cdf.png", "tail_latency.png", "swap_bytes.png", "priority_levels.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0


def test_offline_a_shed_request_is_recorded_rejected_and_ends_its_conversation(llama_dir):
    engine = Engine(EngineConfig(model=llama_dir, dtype="float32", policy="slo", shed="0=0.001", num_kv_blocks=24))
    conversations = synthetic(SyntheticSpec(conversations=6, rate=1000, input_mean=60, output_mean=30,
                                            think_mean_s=0.02, max_context=300))
    records, _ = run_offline(engine, conversations, progress=False)
    rejected = [r for r in records if r.outcome == "rejected"]
    assert rejected, "nothing was shed at a bound of 0.5 ms"
    assert all((r.rejections, r.ttft_s, r.tbt_s, r.output_tokens) == (1, None, [], 0) for r in rejected)
    for c in conversations:
        mine = sorted((r for r in records if r.conversation == c.id), key=lambda r: r.turn)
        assert [r.turn for r in mine] == list(range(len(mine)))
        assert all(r.outcome == "ok" for r in mine[:-1])  # only the last one recorded may be refused
        assert len(mine) == len(c.turns) or mine[-1].outcome == "rejected"


def test_http_run_against_a_fastswitch_server(tmp_path, capsys, llama_dir):
    """The client streams token ids and builds each next turn from them; the server's counters come back. The
    server ranks the priorities the client sends with the policy asked for."""
    code, out, _ = run_cli(capsys, "bench", "run", "--mode", "http", "--priorities", "random", "--policy", "slo",
                           "--model", llama_dir, "--out", str(tmp_path / "http"), *WORKLOAD)
    assert code == 0
    run, requests = load(tmp_path / "http"), load_requests(tmp_path / "http")
    assert run["mode"] == "http" and run["summary"]["preemptions"] is not None and run["config"]["policy"] == "slo"
    assert 0 <= run["summary"]["recompute_preemptions"] <= run["summary"]["preemptions"]  # a labelled sample
    assert run["workload"]["max_retries"] == 2 and run["workload"]["request_timeout"] is None
    assert run["summary"]["served"] == sum(r["outcome"] == "ok" for r in requests)  # slo sheds by default
    assert set(run["summary"]["slo_attainment_by_priority"]) <= {"0", "1", "2", "3"}
    assert {r["priority"] for r in requests} <= {0, 1, 2, 3}
    later_turns = [r for r in requests if r["turn"] > 0]
    assert later_turns and any(r["cached_tokens"] > 0 for r in later_turns), "turns did not reuse their history"


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://x/v1"], "--url needs --mode http"),
    (["--workload", "missing.json"], "neither 'synthetic' nor a file"),
    (["--rate", "0"], "--rate must be positive"),
    (["--mode", "http", "--request-timeout", "0"], "--request-timeout positive"),
])
def test_bad_bench_arguments_are_one_line_and_exit_code_2(capsys, tmp_path, llama_dir, argv, message):
    code, _, err = run_cli(capsys, "bench", "run", "--model", llama_dir, "--out", str(tmp_path), *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_sharegpt_file_drives_a_run(tmp_path, capsys, llama_dir):
    turns = [{"from": "human", "value": "What is a context switch?"}, {"from": "gpt", "value": "A pause and resume."},
             {"from": "human", "value": "And what does it cost?"}, {"from": "gpt", "value": "A copy of its KV."}]
    (tmp_path / "sharegpt.json").write_text(json.dumps([{"id": "a", "conversations": turns},
                                                         {"id": "b", "conversations": turns[:2]}]))
    code, _, _ = run_cli(capsys, "bench", "run", "--workload", str(tmp_path / "sharegpt.json"), "--model", llama_dir,
                         "--rate", "50", "--out", str(tmp_path / "run"))
    assert code == 0
    run, requests = load(tmp_path / "run"), load_requests(tmp_path / "run")
    assert sorted(r["id"] for r in requests) == ["a:0", "a:1", "b:0"]
    assert requests[0]["output_tokens"] > 0 and run["workload"]["workload"].endswith("sharegpt.json")


def test_a_run_keeps_its_records_beside_it_only_while_they_compress_small(tmp_path, monkeypatch):
    from fastswitch.bench import report

    records = [record(i, ttft=i / 100, tbt=[0.01 * (i % 7)] * 50, priority=i % 4) for i in range(1, 401)]
    report.write(tmp_path, {"label": "x", "summary": summarize(records, 10.0, {})}, records)
    kept = load_requests(tmp_path)
    assert [r["id"] for r in kept] == [r.id for r in records] and kept[5]["tbt_s"] == pytest.approx(records[5].tbt_s)
    assert load(tmp_path)["ttft_quantiles"][0] == 0.01 and load(tmp_path)["ttft_quantiles"][-1] == 4.0
    monkeypatch.setattr(report, "REQUESTS_LIMIT_BYTES", 1024)
    report.write(tmp_path, {"label": "x", "summary": {}}, records)
    assert load(tmp_path)["requests_file"] is None and not (tmp_path / report.REQUESTS_FILE).exists()
    with pytest.raises(ValueError, match="rerun its command"):
        load_requests(tmp_path)
