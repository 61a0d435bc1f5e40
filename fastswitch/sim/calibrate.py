"""`fastswitch sim calibrate`: measure the real engine on this machine and fit the simulator's cost
model to it.

- Iterations: batches of requests of known prompt lengths run through the real `Engine` (prefill
  chunks, then decodes over short and long contexts), then a short multi-turn workload on the
  given KV pool (so with preemptions and swaps in flight, as a benchmark runs); each `step()` is
  timed whole (scheduling, the forward, sampling, detokenizing: everything a simulated iteration
  stands for) against the batch the executor was given. `StepCost`'s effective FLOP rate, memory
  bandwidth and fixed costs (efficiencies 1) are fitted by least squares on the relative error.
- Copies: the real `SwapManager` over the engine's pools, in baseline mode (one copy per block,
  layer and K/V) and in fastswitch mode made inline (one per run), out and in, of many sizes; a
  copy's latency and each direction's bandwidth are fitted to time = copies x latency + bytes ÷
  bandwidth.
- Peaks: this machine's memory read bandwidth (summing a 1 GiB float32 tensor), matmul rate in the
  model's dtype and host memcpy bandwidth (`copy_` of 512 MiB), each the best of several. The
  profile states the fit as peak x efficiency (the fitted FLOP rate ÷ the matmul peak, the fitted
  bandwidth ÷ the read bandwidth), and its "measured" block has the peaks, the fitted figures and
  their ratios, the copy fit's against memcpy too. An efficiency far from what the hardware can
  do (a "bandwidth" that is a quarter of what a plain read reaches, or copies faster than memcpy)
  says the fitted figure stands for something else: fixed costs, caches, a shape the model lacks.
"""

import dataclasses
import itertools
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import least_squares

from fastswitch.bench import machine
from fastswitch.bench.runner import run_offline
from fastswitch.bench.workload import SyntheticSpec, synthetic
from fastswitch.config import EngineConfig
from fastswitch.engine.engine import Engine
from fastswitch.kv.swap import SwapManager
from fastswitch.messages import Copy, ModelOutput, SchedulerOutput
from fastswitch.sampling import SamplingParams
from fastswitch.sim.cost import StepCost
from fastswitch.sim.profiles import Hardware, Link, ModelShape
from fastswitch.stats import EngineStats

log = logging.getLogger(__name__)

# (requests, prompt tokens, tokens to generate): single prefills, then decode batches over short and long contexts
BATCHES = [(1, n, 1) for n in (16, 64, 256, 1024, 2000)] + [(b, c, 16) for b in (1, 4, 16, 48) for c in (16, 256, 1024)]
COPY_BLOCKS = (1, 4, 16, 64, 256)
REPEATS = 3
CONVERSATIONS = SyntheticSpec(conversations=16, rate=4, output_mean=60, think_mean_s=0.5, max_context=1024, seed=1000)
# the peaks: bytes summed, bytes copied, the largest square matmul (doubled from 128 until one takes MATMUL_S)
PEAKS = {"read_bytes": 2**30, "copy_bytes": 2**29, "matmul_max": 4096, "repeats": 5}
MATMUL_S = 0.1
Batch = list[tuple[int, int, bool]]


class _StepTimer:
    """Times every `step()` of an engine whole, with the batch its executor was given."""

    def __init__(self, engine: Engine):
        self.stats, self.executor, self.engine_step = engine.stats, engine.core.executor, engine.step
        engine.core.executor, engine.step = self, self.step
        self.batch: Batch = []
        self.steps: list[tuple[Batch, float]] = []

    def execute(self, step: SchedulerOutput) -> ModelOutput:
        out = self.executor.execute(step)
        sampled = set(out.request_ids)
        self.batch = [(s.num_computed_tokens, s.num_new_tokens, s.request_id in sampled) for s in step.scheduled]
        return out

    def close(self) -> None:
        self.executor.close()

    def step(self):
        """Less the time copies stalled it: the simulator's copy engine models that."""
        self.batch, start, stall = [], time.perf_counter(), self.stats.stall_s
        outputs = self.engine_step()
        seconds = time.perf_counter() - start - (self.stats.stall_s - stall)
        if self.batch and seconds > 0:
            self.steps.append((self.batch, seconds))
        return outputs


def calibrate(config: EngineConfig, name: str) -> dict:
    """The fitted profile as JSON-ready data, with a summary of the measurements it was fitted to.

    The batches run on a roomy KV pool; the conversations on `config`'s (tight, to see preemptions)."""
    roomy = Engine(dataclasses.replace(config, num_kv_blocks=None, kv_cache_memory_bytes=None))
    worker = roomy.core.executor
    runner = worker.runner
    shape = ModelShape.from_config(runner.cfg, _dtype_name(runner.dtype))
    timer = _StepTimer(roomy)
    _run_batches(roomy, BATCHES[:8])  # warm-up: kernels built, caches and allocator pools filled
    timer.steps.clear()
    _run_batches(roomy, BATCHES)
    steps = timer.steps
    copies = _time_copies(runner.kv.data, worker.swapper)
    roomy.core.close()
    steps += _time_conversations(config)
    fitted = _fit_steps(steps, shape, name, _fit_link(copies, worker.swapper.inline_bytes))
    errors = [abs(StepCost(shape, fitted).seconds(b) / t - 1) for b, t in steps]
    log.info("step model: median error %.1f%%, 90th percentile %.1f%%", 100 * np.median(errors),
             100 * np.percentile(errors, 90))
    log.info("calibrate: this machine's peaks")
    peaks = measure_peaks(runner.dtype, **PEAKS)
    hardware, against = _against_peaks(fitted, peaks)
    for line in report(against):
        log.info("calibrate: %s", line)
    engine = {"model_path": str(Path(config.model).resolve()) if config.model else None, "device": str(runner.device),
              "kv": {k: getattr(config, k) for k in ("num_kv_blocks", "kv_cache_memory_bytes", "block_size",
                                                     "swap_space")}}
    return hardware.to_json() | {"measured": {
        "model": shape.name, "dtype": shape.dtype, **engine, "machine": machine.describe(), **against,
        "steps": len(steps), "step_error_median": float(np.median(errors)),
        "step_error_p90": float(np.percentile(errors, 90)), "copies": copies}}


def measure_peaks(dtype: torch.dtype = torch.float32, read_bytes: int = 2**30, copy_bytes: int = 2**29,
                  matmul_max: int = 4096, repeats: int = 5) -> dict:
    """This machine's peaks, each the best of `repeats` runs after one warm-up: memory read bandwidth (summing a
    float32 tensor of `read_bytes`), the matmul rate in `dtype` (square matmuls, doubled in size from 128 until
    one takes `MATMUL_S` or the next would pass `matmul_max`) and host memcpy bandwidth (`copy_` of `copy_bytes`
    between two tensors: bytes copied per second, each read once and written once)."""
    read_s = _best(torch.ones(max(read_bytes // 4, 1)).sum, repeats)
    copy_s = _best(_copy(copy_bytes), repeats)
    n = min(128, matmul_max)
    while True:
        matmul_s = _best(_matmul(n, dtype), repeats)
        if matmul_s >= MATMUL_S or 2 * n > matmul_max:
            break
        n *= 2
    return {"read_bytes_per_s": read_bytes / read_s, "matmul_flops_per_s": 2 * n**3 / matmul_s,
            "memcpy_bytes_per_s": copy_bytes / copy_s, "read_bytes": read_bytes, "copy_bytes": copy_bytes,
            "matmul_n": n, "matmul_dtype": _dtype_name(dtype), "threads": torch.get_num_threads()}


def _copy(nbytes: int):
    source = torch.ones(max(nbytes // 4, 1))
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


def _matmul(n: int, dtype: torch.dtype):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return lambda: torch.matmul(a, b)


def _best(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after a warm-up one."""
    fn()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return max(min(times), 1e-9)


def _against_peaks(fitted: Hardware, peaks: dict) -> tuple[Hardware, dict]:
    """The fit (effective rates, efficiencies 1) restated as measured peak x efficiency, and what the "measured"
    block records: the peaks, the fitted figures and the efficiencies they imply (fitted ÷ peak)."""
    figures = {"flops_per_s": fitted.peak_flops, "memory_bytes_per_s": fitted.memory_bytes_per_s,
               "h2d_bytes_per_s": fitted.link.h2d_bytes_per_s, "d2h_bytes_per_s": fitted.link.d2h_bytes_per_s,
               "copy_latency_s": fitted.link.copy_latency_s, "step_overhead_s": fitted.step_overhead_s,
               "sequence_overhead_s": fitted.sequence_overhead_s}
    efficiency = {"flops": fitted.peak_flops / peaks["matmul_flops_per_s"],
                  "memory": fitted.memory_bytes_per_s / peaks["read_bytes_per_s"],
                  "h2d": fitted.link.h2d_bytes_per_s / peaks["memcpy_bytes_per_s"],
                  "d2h": fitted.link.d2h_bytes_per_s / peaks["memcpy_bytes_per_s"]}
    hardware = dataclasses.replace(fitted, peak_flops=peaks["matmul_flops_per_s"], flops_efficiency=efficiency["flops"],
                                   memory_bytes_per_s=peaks["read_bytes_per_s"], memory_efficiency=efficiency["memory"])
    return hardware, {"peaks": peaks, "fitted": figures, "efficiency": efficiency}


def report(measured: dict) -> list[str]:
    """The peaks, the fit and the efficiencies it implies, as lines to print."""
    p, f, e = measured["peaks"], measured["fitted"], measured["efficiency"]
    return [f"peaks here: memory read {p['read_bytes_per_s'] / 1e9:.3g} GB/s, {p['matmul_dtype']} matmul "
            f"{p['matmul_flops_per_s'] / 1e9:.3g} GFLOP/s (n={p['matmul_n']}), memcpy "
            f"{p['memcpy_bytes_per_s'] / 1e9:.3g} GB/s ({p['threads']} threads)",
            f"fitted: {f['flops_per_s'] / 1e9:.3g} GFLOP/s = {e['flops']:.2f} x the matmul peak; "
            f"{f['memory_bytes_per_s'] / 1e9:.3g} GB/s = {e['memory']:.2f} x the read bandwidth; copies in "
            f"{f['h2d_bytes_per_s'] / 1e9:.3g} GB/s = {e['h2d']:.2f} x memcpy, out {f['d2h_bytes_per_s'] / 1e9:.3g} "
            f"GB/s = {e['d2h']:.2f} x; {f['copy_latency_s'] * 1e6:.3g} µs per copy; "
            f"{f['step_overhead_s'] * 1e3:.3g} ms per iteration + {f['sequence_overhead_s'] * 1e6:.3g} µs per request"]


def _run_batches(engine: Engine, batches) -> None:
    rng, vocab = random.Random(0), min(engine.core.limits.vocab_size, 4000)
    for i, (requests, prompt_len, max_tokens) in enumerate(batches):
        log.info("calibrate: batch %d/%d: %d requests of %d tokens", i + 1, len(batches), requests, prompt_len)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        for _ in range(requests):
            engine.add_request([rng.randrange(3, vocab) for _ in range(prompt_len)], params)
        while engine.has_unfinished_requests():
            engine.step()


def _time_conversations(config: EngineConfig) -> list[tuple[Batch, float]]:
    """Every step of a short multi-turn workload under markov priorities: the mix a benchmark runs
    (prefill chunks beside decodes, swaps in flight, the policy's ranking of many requests)."""
    log.info("calibrate: %d conversations", CONVERSATIONS.conversations)
    engine = Engine(dataclasses.replace(config, policy="trace", trace_pattern="markov"))
    timer = _StepTimer(engine)
    run_offline(engine, synthetic(CONVERSATIONS), progress=False)
    engine.core.close()
    return timer.steps


def _time_copies(device_pool, swapper: SwapManager) -> list[dict]:
    """Copies of many sizes, both modes, both directions: blocks, copy operations, bytes, median seconds."""
    host_pool, num_layers = swapper.host_pool, device_pool.shape[1]
    rows = []
    for mode in ("baseline", "fastswitch"):
        manager = SwapManager(device_pool, host_pool, mode, EngineStats(), asynchronous=False)
        for blocks in COPY_BLOCKS:
            if blocks > min(len(device_pool), len(host_pool)):
                continue
            for kind in ("out", "in"):
                times = []
                for _ in range(REPEATS):
                    start = time.perf_counter()
                    manager.start([Copy(0, kind, [(0, 0, blocks)], True)])
                    times.append(time.perf_counter() - start)
                operations = blocks * num_layers * 2 if mode == "baseline" else 1
                rows.append({"mode": mode, "kind": kind, "blocks": blocks, "operations": operations,
                             "bytes": blocks * manager.block_bytes, "seconds": float(np.median(times))})
        log.info("calibrate: %s copies timed", mode)
    return rows


def _fit_link(copies: list[dict], inline_bytes: float) -> Link:
    """time = operations x latency + bytes ÷ bandwidth of the direction, weighted by 1 / time."""
    a = np.array([[c["operations"], c["bytes"] * (c["kind"] == "out"), c["bytes"] * (c["kind"] == "in")]
                  for c in copies], dtype=float)
    t = np.array([c["seconds"] for c in copies])
    latency, per_byte_out, per_byte_in = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)[0]
    return Link(h2d_bytes_per_s=1 / max(per_byte_in, 1e-15), d2h_bytes_per_s=1 / max(per_byte_out, 1e-15),
                copy_latency_s=max(float(latency), 0.0), inline_copy_bytes=float(min(inline_bytes, 2**62)))


def _fit_steps(steps: list[tuple[Batch, float]], shape: ModelShape, name: str, link: Link) -> Hardware:
    """Effective FLOP/s, memory bandwidth, per-iteration and per-request costs, by least squares on log
    parameters against the log of modeled ÷ measured time of every step."""

    def hardware(x) -> Hardware:
        flops, bandwidth, step, sequence = np.exp(x)
        return Hardware(name, float(flops), float(bandwidth), _memory_bytes(), link, flops_efficiency=1.0,
                        memory_efficiency=1.0, step_overhead_s=float(step), sequence_overhead_s=float(sequence),
                        activation_bytes=0.0)

    def residuals(x):
        cost = StepCost(shape, hardware(x))
        return [np.log(cost.seconds(batch) / seconds) for batch, seconds in steps]

    # A roofline's slower side alone has a gradient: start from several points where both sides may bind.
    # The largest step bounds the FLOP rate from below, the fastest one the bandwidth.
    largest = max(steps, key=lambda step: sum(n for _, n, _ in step[0]))
    flops = 2 * shape.layer_params * sum(n for _, n, _ in largest[0]) / largest[1]
    fastest = min(seconds for _, seconds in steps)
    bandwidth = (shape.layer_params + shape.head_params) * shape.dtype_bytes / fastest
    fits = [least_squares(residuals, np.log([flops * a, bandwidth * b, fastest / 10, fastest / 100]))
            for a, b in itertools.product((1, 3, 10), repeat=2)]
    return hardware(min(fits, key=lambda fit: fit.cost).x)


def _memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
