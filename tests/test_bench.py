"""The conversation benchmark: its figures on known data, priorities over HTTP, and short end-to-end runs."""

import json

import pytest

from fastswitch.bench.report import jain_index, load, load_requests, summarize
from fastswitch.bench.runner import PRESETS, RequestRecord, _priorities
from fastswitch.bench.workload import SyntheticSpec, synthetic
from fastswitch.config import EngineConfig
from fastswitch.slo import SLO
from tests.test_cli import run_cli

SUMMARY_KEYS = {"ttft_p50", "ttft_p95", "ttft_p99", "ttft_p999", "tbt_p50", "tbt_p99", "tbt_p999", "throughput_tok_s",
                "preemptions", "swap_out_blocks", "swap_out_bytes", "reuse_saved_blocks", "stall_s", "goodput_req_s",
                "ttft_p99_by_priority", "slo_attainment_by_priority", "lowest_level_ttft_p99", "jain_index"}


def record(i: int, ttft: float, tbt: list[float], user: str = "u", priority: int | None = None) -> RequestRecord:
    return RequestRecord(f"r{i}", "c", 0, user, priority, 10, len(tbt) + 1, 0, 0.0, ttft, tbt)


def test_percentiles_goodput_and_fairness_on_known_data():
    records = [record(i, ttft=i / 1000, tbt=[0.01] * 9 + [i / 100], priority=i % 2) for i in range(1, 1001)]
    s = summarize(records, duration_s=100.0, counters={"preemptions": 7}, slo=SLO.parse("0.5", "0.05"))
    assert s["ttft_p50"] == pytest.approx(0.5005) and s["ttft_p99"] == pytest.approx(0.99001)
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


def test_jain_index_is_one_when_service_is_equal_and_falls_as_one_user_gets_more():
    assert jain_index([record(i, 0.1, [0.1], user=f"u{i % 4}") for i in range(8)]) == pytest.approx(1.0)
    lopsided = [record(0, 0.1, [0.1] * 50, user="a")] + [record(i, 0.1, [], user=f"u{i}") for i in range(1, 4)]
    assert jain_index(lopsided) == pytest.approx((112 + 3 * 12) ** 2 / (4 * (112**2 + 3 * 12**2)))  # 10 + 2 x 51, 10 + 2 x 1


def test_http_priorities_are_seeded_and_markov_moves_one_level():
    markov = _priorities("markov", 4, seed=1, n=3, turns=200)
    assert markov == _priorities("markov", 4, seed=1, n=3, turns=200) != _priorities("markov", 4, seed=1, n=4, turns=200)
    assert all(abs(a - b) == 1 or a == b in (0, 3) for a, b in zip(markov, markov[1:]))
    assert set(_priorities("random", 4, 1, 3, 200)) == {0, 1, 2, 3}
    assert _priorities("none", 4, 1, 3, 5) == [None] * 5


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
    assert runs["baseline"]["summary"]["reuse_saved_blocks"] == 0 and runs["baseline"]["config"]["swap_mode"] == "baseline"
    assert runs["fastswitch"]["summary"]["swap_copies"] < runs["baseline"]["summary"]["swap_copies"]

    code, out, _ = run_cli(capsys, "bench", "compare", str(tmp_path / "baseline"), str(tmp_path / "fastswitch"),
                           "--out", str(tmp_path / "cmp"))
    assert code == 0 and "| baseline |" in out and "| fastswitch |" in out
    for name in ("compare.md", "ttft_cdf.png", "tail_latency.png", "swap_bytes.png", "priority_levels.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0


def test_http_run_against_a_fastswitch_server(tmp_path, capsys, llama_dir):
    """The client streams token ids and builds each next turn from them; the server's counters come back. The
    server ranks the priorities the client sends with the policy asked for."""
    code, out, _ = run_cli(capsys, "bench", "run", "--mode", "http", "--priorities", "random", "--policy", "slo",
                           "--model", llama_dir, "--out", str(tmp_path / "http"), *WORKLOAD)
    assert code == 0
    run, requests = load(tmp_path / "http"), load_requests(tmp_path / "http")
    assert run["mode"] == "http" and run["summary"]["preemptions"] is not None and run["config"]["policy"] == "slo"
    assert set(run["summary"]["slo_attainment_by_priority"]) <= {"0", "1", "2", "3"}
    assert {r["priority"] for r in requests} <= {0, 1, 2, 3}
    later_turns = [r for r in requests if r["turn"] > 0]
    assert later_turns and any(r["cached_tokens"] > 0 for r in later_turns), "turns did not reuse their history"


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://x/v1"], "--url needs --mode http"),
    (["--workload", "missing.json"], "neither 'synthetic' nor a file"),
    (["--rate", "0"], "--rate must be positive"),
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
