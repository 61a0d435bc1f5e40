"""The simulator: its cost and link models on hand-computed cases, and the real engine core driven
by them (every request finishes, no block leaked or held twice, one result per seed)."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastswitch.bench.runner import PRESETS, engine_counters, run_offline
from fastswitch.bench.workload import SyntheticSpec, synthetic
from fastswitch.config import EngineConfig
from fastswitch.messages import AddRequest, Copy
from fastswitch.model.tokenizer import Tokenizer
from fastswitch.sampling import SamplingParams
from fastswitch.sim import calibrate, profiles
from fastswitch.sim.clock import SimClock
from fastswitch.sim.copies import SimCopyEngine
from fastswitch.sim.cost import StepCost
from fastswitch.sim.profiles import HARDWARE, SHAPES, Hardware, Link, ModelShape, load_hardware, load_shape
from fastswitch.sim.simulator import simulated_core, simulated_engine
from fastswitch.stats import EngineStats
from tests.test_cli import run_cli

# 2 layers of hidden 4, MLP 8, 2 heads and 1 KV head of 2 dims, vocab 10, fp32:
# layer params 2 x (2*4*4 + 2*4*2 + 3*4*8) = 288, LM head 40, KV 2 x 2 x 1 x 2 x 4 = 32 bytes per token
SHAPE = ModelShape("toy", num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=1, head_dim=2,
                   vocab_size=10, max_position_embeddings=4096, dtype="float32")
# 500 FLOP/s and 800 B/s effective, 10 ms per step and 1 ms per request
HW = Hardware("toy", peak_flops=1000, memory_bytes_per_s=1000, memory_bytes=1e6, flops_efficiency=0.5,
              memory_efficiency=0.8, step_overhead_s=0.01, sequence_overhead_s=0.001,
              link=Link(h2d_bytes_per_s=100, d2h_bytes_per_s=50, copy_latency_s=0.01))


def test_shape_sizes_from_the_config():
    assert SHAPE.layer_params == 288 and SHAPE.head_params == 40 and SHAPE.kv_bytes_per_token == 32
    assert SHAPES["llama3-8b"].weight_bytes / 2 == pytest.approx(8.03e9, rel=0.01)  # Llama 3 8B's 8.03 B parameters
    assert SHAPES["llama3-8b"].kv_bytes_per_token == 128 * 1024


def test_a_known_batch_takes_its_roofline_time():
    cost = StepCost(SHAPE, HW)
    # a 3-token prefill and a decode at context 5, both sampling: 4 tokens, 12 query-key pairs, 9 tokens of KV.
    # dense: max(2 x (288 x 4 + 40 x 2) / 500, 328 x 4 / 800) = max(4.928, 1.64); attention: max(4 x 2 x 2 x 2 x 12
    # / 500, 9 x 32 / 800) = max(0.768, 0.36); then 10 ms and 2 x 1 ms
    assert cost.seconds([(0, 3, True), (5, 1, True)]) == pytest.approx(4.928 + 0.768 + 0.01 + 0.002)
    # one decode at context 1000: the weights' read bounds the dense part, attention is compute-bound
    assert cost.seconds([(1000, 1, True)]) == pytest.approx(1.64 + 32 * 1001 / 500 + 0.01 + 0.001)
    assert cost.seconds([]) == 0.0


def copy_engine(mode: str, asynchronous: bool = True, inline_bytes: float = 0.0):
    clock, stats = SimClock(), EngineStats()
    link = dataclasses.replace(HW.link, inline_copy_bytes=inline_bytes)
    return SimCopyEngine(mode, 10, SHAPE.num_layers, link, stats, clock, asynchronous), clock, stats


def test_a_baseline_copy_stalls_for_every_block_layer_and_kv():
    engine, clock, stats = copy_engine("baseline")
    assert engine.synchronous(1)
    engine.start([Copy(0, "out", [(0, 0, 2), (7, 2, 1)], True)])
    # 3 blocks x 2 layers x K/V = 12 copies of 10 ms, and 30 bytes at 50 B/s
    assert clock.now() == pytest.approx(0.12 + 0.6) and stats.stall_s == pytest.approx(0.72)
    assert stats.copies == 12 and stats.swap_out_blocks == 3 and stats.swap_out_bytes == 30
    assert engine.finished() == ([], [])  # made on the compute path: never in flight


def test_an_asynchronous_copy_overlaps_and_copies_share_a_direction():
    engine, clock, stats = copy_engine("fastswitch")
    engine.start([Copy(0, "out", [(0, 0, 2), (7, 2, 1)], False),  # 2 runs: 0.02 + 30 / 50 = 0.62 s
                  Copy(1, "out", [(3, 3, 1)], False),  # queued behind it: 0.62 + 0.01 + 0.2
                  Copy(2, "in", [(0, 0, 5)], False)])  # the other direction: 0.01 + 50 / 100
    assert clock.now() == 0.0 and stats.stall_s == 0.0 and stats.copies == 4
    clock.sleep(0.6)
    assert engine.finished() == ([2], [])
    clock.sleep(0.02)
    assert engine.finished() == ([0], [])
    engine.wait(1)  # the compute path waits for the rest
    assert clock.now() == pytest.approx(0.83) and stats.stall_s == pytest.approx(0.21) and engine.finished() == ([], [])


def test_fenced_small_and_inline_copies_stall_the_compute_path():
    engine, clock, stats = copy_engine("fastswitch", inline_bytes=25)
    assert engine.synchronous(2) and not engine.synchronous(3)
    engine.start([Copy(0, "in", [(0, 0, 2)], True)])  # under 25 bytes: inline
    assert clock.now() == pytest.approx(0.01 + 0.2)
    engine.start([Copy(1, "in", [(0, 0, 4)], True)])  # fenced: complete before what follows
    assert clock.now() == pytest.approx(0.21 + 0.01 + 0.4) == stats.stall_s
    engine, clock, stats = copy_engine("fastswitch", asynchronous=False)
    assert engine.synchronous(1000)


def make_config(preset: str, **options) -> EngineConfig:
    return EngineConfig(device="cpu", **PRESETS[preset] | options)


def test_a_swap_out_stalls_baseline_and_overlaps_fastswitch_steps():
    """Two requests decode; one is paused. Baseline makes the copy at once, on the compute path;
    fastswitch's copy runs in the background while both keep decoding: the paused one resumes at once,
    from the blocks the device still caches, without waiting for the copy to land."""
    # steps of 10 ms + 1 ms per request; copies of 1 ms + 10 kB/s
    hw = dataclasses.replace(HW, peak_flops=1e12, memory_bytes_per_s=1e12, link=Link(1e4, 1e4, 1e-3))
    moved = {}
    for preset in ("baseline", "fastswitch"):
        config = make_config(preset, num_kv_blocks=64, block_size=4, swap_space=1e-4, preemption_mode="swap")
        core = simulated_core(config, SHAPE, hw)
        for i in range(2):
            core.add_request(_add(f"r{i}", 8, 40))
        for _ in range(3):
            core.step()
        stall = core.stats.stall_s
        assert core.preempt("r1")
        core.step()  # the pause's copy goes with the next step
        moved[preset] = core.stats.stall_s - stall
    # r1 holds 3 blocks of 4 tokens (10 tokens' KV) of 128 bytes: baseline copies each block, layer and K/V
    # (12 copies) on the compute path, out and (done at once, so r1 resumes in the same step) back in;
    # fastswitch issues one copy of one group, in the background
    assert moved["baseline"] == pytest.approx(2 * (12 * 1e-3 + 384 / 1e4)) and moved["fastswitch"] == 0.0
    r1 = core.scheduler.requests["r1"]
    assert r1.status.value == "running" and core.stats.swap_in_blocks == 0  # its 2 full blocks were still cached
    steps = []
    while core.kv._pending:  # the copy out lands while both decode, 11 ms + 1 ms a step
        start = core.clock.now()
        core.step()
        steps.append(core.clock.now() - start)
    assert 1e-3 + 384 / 1e4 <= 0.012 * (len(steps) + 1) and steps == pytest.approx([0.012] * len(steps), rel=1e-3)
    assert core.stats.stall_s == 0.0


def _add(request_id: str, prompt_len: int, max_tokens: int) -> AddRequest:
    return AddRequest(request_id, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens,
                                                                                 ignore_eos=True), 0.0)


class InvariantExecutor:
    """The cost-model executor, checking the scheduler's invariants before every step."""

    def __init__(self, core):
        self.core, self.inner, self.steps = core, core.executor, 0

    def execute(self, step):
        kv, running = self.core.kv, self.core.scheduler.running
        held = [b for r in running for b in r.block_ids]
        if not kv.prefix_caching:  # with it, requests share cached prefix blocks
            assert len(held) == len(set(held)), "a block is held twice"
        assert len(set(held)) + kv.device.num_available <= kv.num_blocks, "a block is counted twice"
        assert step.num_scheduled_tokens <= self.core.config.max_num_batched_tokens
        self.steps += 1
        return self.inner.execute(step)


def simulate(preset: str, conversations, seed: int = 0, **options):
    config = make_config(preset, policy="trace", trace_pattern="markov", trace_update_freq=0.3, seed=seed, **options)
    engine = simulated_engine(config, SHAPES["llama3-8b"], HARDWARE["a10"], Tokenizer(_demo_model_dir()))
    engine.core.executor = InvariantExecutor(engine.core)
    records, duration = run_offline(engine, conversations, progress=False)
    return engine, records, duration


def _demo_model_dir():
    from fastswitch.model.demo import default_model_path

    return default_model_path()


@settings(max_examples=40, deadline=None)
@given(preset=st.sampled_from(list(PRESETS)), seed=st.integers(0, 10**6), num_blocks=st.integers(24, 80),
       host_gib=st.sampled_from([0.002, 4.0]), rate=st.floats(1.0, 50.0))
def test_every_simulated_request_finishes_and_nothing_leaks(preset, seed, num_blocks, host_gib, rate):
    spec = SyntheticSpec(conversations=8, rate=rate, input_mean=40, output_mean=20, think_mean_s=0.05,
                         max_context=300, seed=seed)
    conversations = synthetic(spec)
    engine, records, _ = simulate(preset, conversations, seed, num_kv_blocks=num_blocks, swap_space=host_gib)
    assert sorted(r.id for r in records) == sorted(f"{c.id}:{k}" for c in conversations for k in range(len(c.turns)))
    turns = {c.id: c.turns for c in conversations}
    assert all(r.output_tokens == turns[r.conversation][r.turn].reply_len for r in records)
    kv = engine.core.kv
    kv.drain()
    assert kv.device.num_available == kv.num_blocks and not kv.device.refs, "device blocks leaked"
    assert kv.host.num_available == kv.host.allocator.num_blocks and not kv.host.refs, "host blocks leaked"
    assert not kv.swapper.copies._ends


def test_a_seed_gives_one_result_and_another_seed_another():
    conversations = synthetic(SyntheticSpec(conversations=12, rate=20, input_mean=40, output_mean=20, think_mean_s=0.05,
                                            max_context=300))
    runs = [simulate("fastswitch", conversations, seed, num_kv_blocks=40) for seed in (1, 1, 2)]
    (a, ra, da), (b, rb, db), (c, rc, dc) = runs
    assert ra == rb and da == db and engine_counters(a.stats) == engine_counters(b.stats)
    assert a.stats.preemptions > 0 and (ra, da) != (rc, dc)


def test_the_kv_pool_is_what_the_memory_leaves_after_weights_and_activations():
    shape, a10 = SHAPES["llama3-8b"], HARDWARE["a10"]
    for utilization in (0.9, 0.8):
        core = simulated_core(EngineConfig(device="cpu", gpu_memory_utilization=utilization, swap_space=1), shape, a10)
        left = 24 * 2**30 * utilization - shape.weight_bytes - 2**30  # 2 MiB blocks: 16 tokens of 128 KiB
        assert core.kv.num_blocks == int(left // 2**21) and core.kv.host.allocator.num_blocks == 512
    assert simulated_core(EngineConfig(device="cpu", num_kv_blocks=7), shape, a10).kv.num_blocks == 7


def test_profiles_and_shapes_by_name_and_from_files(tmp_path):
    assert load_hardware("h100").link.h2d_bytes_per_s == 50e9 and load_hardware("a10").with_link("pcie5").link.h2d_bytes_per_s == 50e9
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(HW.to_json() | {"measured": {"steps": []}}))
    assert load_hardware(str(path)) == HW
    (tmp_path / "shape").mkdir()
    config = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
              "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "max_position_embeddings": 32768, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16"}
    (tmp_path / "shape" / "config.json").write_text(json.dumps(config))
    shape = load_shape(str(tmp_path / "shape"))  # a config.json alone
    assert (shape.num_layers, shape.head_dim, shape.tied_embeddings, shape.dtype) == (24, 64, True, "bfloat16")
    assert load_shape(str(tmp_path / "shape"), "float32").dtype_bytes == 4
    for bad in ("tpu", str(tmp_path / "shape" / "config.json")):
        with pytest.raises(ValueError):
            load_hardware(bad)


def test_calibration_recovers_a_known_profile():
    """Steps and copies timed on a machine that is exactly some profile: the fits give that profile back."""
    truth = dataclasses.replace(HW, flops_efficiency=1.0, memory_efficiency=1.0, memory_bytes_per_s=300)
    cost = StepCost(SHAPE, truth)
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(60):  # decodes (memory-bound below 6 tokens) and prefills (compute-bound)
        batch = [(int(rng.integers(0, 3000)), int(rng.choice([1, 1, 1, 64, 500])), True)
                 for _ in range(int(rng.integers(1, 8)))]
        steps.append((batch, cost.seconds(batch)))
    fitted = calibrate._fit_steps(steps, SHAPE, "toy", truth.link)
    for name in ("peak_flops", "memory_bytes_per_s", "step_overhead_s", "sequence_overhead_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.02), name
    copies = [{"kind": kind, "operations": ops, "bytes": n,
               "seconds": ops * 0.01 + n / (100 if kind == "in" else 50)}
              for kind in ("in", "out") for ops, n in ((1, 10), (8, 40), (1, 640), (64, 640))]
    link = calibrate._fit_link(copies, 4 << 20)
    assert (link.h2d_bytes_per_s, link.d2h_bytes_per_s, link.copy_latency_s) == pytest.approx((100, 50, 0.01))


SIM_WORKLOAD = ["--conversations", "6", "--rate", "20", "--input-mean", "60", "--output-mean", "30",
                "--think-mean", "0.05", "--max-context", "300", "--num-kv-blocks", "24", "--trace-update-freq", "0.3",
                "--no-progress"]


def test_sim_runs_compare_with_real_ones(tmp_path, capsys, llama_dir):
    for preset in ("baseline", "fastswitch"):
        code, out, _ = run_cli(capsys, "sim", "--preset", preset, "--model", llama_dir, "--profile", "a100-80g",
                               "--link", "pcie5", "--out", str(tmp_path / preset), *SIM_WORKLOAD)
        assert code == 0 and f"| {preset} (sim) |" in out
    run = json.loads((tmp_path / "fastswitch" / "results.json").read_text())
    assert run["mode"] == "sim" and run["profile"]["name"] == "a100-80g" and run["profile"]["link"]["h2d_bytes_per_s"] == 50e9
    assert run["summary"]["preemptions"] > 0 and run["config"]["policy"] == "trace"
    baseline = json.loads((tmp_path / "baseline" / "results.json").read_text())["summary"]
    assert baseline["swap_copies"] > run["summary"]["swap_copies"] and baseline["stall_s"] > 0
    code, out, _ = run_cli(capsys, "bench", "run", "--model", llama_dir, "--out", str(tmp_path / "real"),
                           *SIM_WORKLOAD[:-1])
    assert code == 0
    code, out, _ = run_cli(capsys, "bench", "compare", str(tmp_path / "real"), str(tmp_path / "baseline"),
                           str(tmp_path / "fastswitch"), "--out", str(tmp_path / "cmp"))
    assert code == 0 and "| fastswitch |" in out and "| baseline (sim) |" in out
    assert (tmp_path / "cmp" / "tail_latency.png").stat().st_size > 0


def test_the_peaks_are_positive_and_finite():
    for dtype in (torch.float32, torch.bfloat16):
        peaks = calibrate.measure_peaks(dtype, read_bytes=2**20, copy_bytes=2**20, matmul_max=64, repeats=2)
        rates = [peaks[k] for k in ("read_bytes_per_s", "matmul_flops_per_s", "memcpy_bytes_per_s")]
        assert all(math.isfinite(r) and r > 0 for r in rates), peaks
        assert (peaks["matmul_n"], peaks["matmul_dtype"]) == (64, str(dtype).removeprefix("torch."))


def test_a_fit_is_stated_as_measured_peak_times_efficiency():
    peaks = {"matmul_flops_per_s": 2000.0, "read_bytes_per_s": 4000.0, "memcpy_bytes_per_s": 200.0}
    effective = dataclasses.replace(HW, flops_efficiency=1.0, memory_efficiency=1.0)
    hardware, measured = calibrate._against_peaks(effective, peaks)
    assert (hardware.peak_flops, hardware.flops_efficiency) == (2000.0, 0.5)  # 1000 FLOP/s fitted
    assert (hardware.memory_bytes_per_s, hardware.memory_efficiency) == (4000.0, 0.25)
    assert measured["efficiency"] == {"flops": 0.5, "memory": 0.25, "h2d": 0.5, "d2h": 0.25}
    assert StepCost(SHAPE, hardware).seconds([(5, 3, True)]) == pytest.approx(
        StepCost(SHAPE, effective).seconds([(5, 3, True)]))


def test_calibrate_writes_a_profile_the_simulator_takes(tmp_path, capsys, llama_dir, monkeypatch):
    monkeypatch.setattr(calibrate, "BATCHES", [(1, 64, 1), (2, 16, 4), (4, 128, 4)])
    monkeypatch.setattr(calibrate, "COPY_BLOCKS", (1, 16))
    monkeypatch.setattr(calibrate, "CONVERSATIONS", SyntheticSpec(conversations=2, rate=20, output_mean=8,
                                                                  max_context=200))
    monkeypatch.setattr(calibrate, "PEAKS", {"read_bytes": 2**22, "copy_bytes": 2**22, "matmul_max": 128,
                                             "repeats": 2})
    profile = tmp_path / "profile.json"
    code, out, _ = run_cli(capsys, "sim", "calibrate", "--model", llama_dir, "--num-kv-blocks", "64",
                           "--swap-space", "0.01", "--out", str(profile))
    assert code == 0 and "wrote" in out and "x the read bandwidth" in out and "x the matmul peak" in out
    assert profile.stat().st_size < 8000  # a summary, not the samples
    data = json.loads(profile.read_text())
    measured = data["measured"]
    peaks, fitted, efficiency = measured["peaks"], measured["fitted"], measured["efficiency"]
    assert data["peak_flops"] > 0 and data["link"]["copy_latency_s"] >= 0 and measured["steps"] > 5
    # the fit is the measured peak x the efficiency it implies, and each efficiency is fitted ÷ measured
    assert (data["peak_flops"], data["memory_bytes_per_s"]) == (peaks["matmul_flops_per_s"], peaks["read_bytes_per_s"])
    assert efficiency["flops"] == pytest.approx(fitted["flops_per_s"] / peaks["matmul_flops_per_s"])
    assert efficiency["memory"] == pytest.approx(fitted["memory_bytes_per_s"] / peaks["read_bytes_per_s"])
    assert efficiency["h2d"] == pytest.approx(data["link"]["h2d_bytes_per_s"] / peaks["memcpy_bytes_per_s"])
    assert efficiency["d2h"] == pytest.approx(fitted["d2h_bytes_per_s"] / peaks["memcpy_bytes_per_s"])
    assert data["peak_flops"] * data["flops_efficiency"] == pytest.approx(fitted["flops_per_s"])
    assert data["memory_bytes_per_s"] * data["memory_efficiency"] == pytest.approx(fitted["memory_bytes_per_s"])
    assert (measured["model_path"], measured["device"], measured["kv"]["num_kv_blocks"]) == (
        str(Path(llama_dir).resolve()), "cpu", 64)
    assert load_hardware(str(profile)).flops_efficiency == data["flops_efficiency"]
    # no --model: the model (and the dtype) the profile was measured with, not llama3-8b
    code, _, _ = run_cli(capsys, "sim", "--profile", str(profile), "--out", str(tmp_path / "run"), *SIM_WORKLOAD)
    assert code == 0
    run = json.loads((tmp_path / "run" / "results.json").read_text())
    assert run["model_shape"] == Path(llama_dir).name and run["config"]["dtype"] == measured["dtype"]


def _calibrated(tmp_path, **measured) -> str:
    path = tmp_path / "calibrated.json"
    path.write_text(json.dumps(HW.to_json() | {"measured": measured}))
    return str(path)


def test_sim_takes_a_calibrated_profiles_model_dtype_and_cpu_pool(tmp_path, llama_dir):
    from fastswitch.config import CPU_KV_CACHE_BYTES
    from fastswitch.model.demo import default_model_path

    profile = _calibrated(tmp_path, model_path=llama_dir, dtype="float32", device="cpu")
    config, model = profiles.sim_defaults(EngineConfig(), profile)
    assert (model, config.dtype, config.kv_cache_memory_bytes) == (llama_dir, "float32", CPU_KV_CACHE_BYTES)
    # what is given stays: the dtype is the profile's only for the model it measured
    config, model = profiles.sim_defaults(EngineConfig(model="llama3-8b", dtype="auto", num_kv_blocks=7), profile)
    assert (model, config.dtype, config.num_kv_blocks, config.kv_cache_memory_bytes) == ("llama3-8b", "auto", 7, None)
    config, _ = profiles.sim_defaults(EngineConfig(dtype="bfloat16"), profile)
    assert config.dtype == "bfloat16"
    # the tiny demo model (calibrated without --model)
    config, model = profiles.sim_defaults(EngineConfig(), _calibrated(tmp_path, model_path=None, dtype="float32",
                                                              device="cpu"))
    assert model == str(default_model_path()) and config.dtype == "float32"


def test_sim_with_a_built_in_profile_and_no_model_simulates_llama3_8b(tmp_path, capsys):
    assert profiles.sim_defaults(EngineConfig(), "h100") == (EngineConfig(), "llama3-8b")
    code, out, _ = run_cli(capsys, "sim", "--profile", "a10", "--out", str(tmp_path / "run"), *SIM_WORKLOAD)
    assert code == 0 and "llama3-8b on a10" in out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["model_shape"] == "llama3-8b"


def test_a_profile_that_records_no_model_needs_one(tmp_path, capsys, llama_dir):
    old = _calibrated(tmp_path, model="demo-llama-tiny", dtype="bfloat16", steps=[])  # before profiles named one
    code, _, err = run_cli(capsys, "sim", "--profile", old, "--out", str(tmp_path / "a"), *SIM_WORKLOAD)
    assert code == 2 and "give --model" in err and err.count("\n") == 1
    code, _, _ = run_cli(capsys, "sim", "--profile", old, "--model", llama_dir, "--out", str(tmp_path / "b"),
                         *SIM_WORKLOAD)
    assert code == 0


@pytest.mark.parametrize("argv, message", [
    (["--profile", "tpu"], "neither a built-in profile"),
    (["--model", "/no/such/folder"], "model folder not found"),
    (["--rate", "0"], "--rate must be positive"),
    (["--num-kv-blocks", "1", "--model", "qwen2.5-32b"], "KV blocks"),
])
def test_bad_sim_arguments_are_one_line_and_exit_code_2(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, "sim", "--out", str(tmp_path), "--no-progress", *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_sim_needs_an_output_folder(capsys):
    code, _, err = run_cli(capsys, "sim", "--conversations", "1")
    assert code == 2 and "--out is required" in err
