"""`fastswitch bench swap`: what a context switch costs, against the machine's copy floor.

For one request of each size, on the KV shapes of the demo models: swap-out + swap-in in `baseline`
mode (per block, per layer, K and V, synchronous) and `fastswitch` mode (coalesced runs, off the
compute path), against one plain copy of the same bytes each way (the physical floor). Then, on a
real model, how much a decoding batch slows down while another request swaps in the background.
"""

import json
import logging
import statistics
import time
from pathlib import Path

import torch

from fastswitch.kv.layout import KVPool
from fastswitch.kv.manager import KVManager
from fastswitch.kv.swap import MODES, SwapManager
from fastswitch.model.demo import demo_config
from fastswitch.request import Request
from fastswitch.sampling import SamplingParams
from fastswitch.stats import EngineStats

log = logging.getLogger(__name__)
SHAPES = {"tiny": ("llama", "tiny"), "0.5b": ("qwen2", "0.5b"), "8b": ("llama", "8b")}


def kv_shape(model: str) -> tuple[int, int, int]:
    cfg = demo_config(*SHAPES[model])
    return cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def measure_switch(model: str, tokens: int, mode: str, device: torch.device, dtype: torch.dtype, block_size: int,
                   repeats: int) -> dict:
    """Median time of swap-out + swap-in of one `tokens`-long request, and of the single-copy floor."""
    layers, kv_heads, head_dim = kv_shape(model)
    num_blocks = 2 * -(-tokens // block_size) + 8
    pool = KVPool(num_blocks, layers, block_size, kv_heads, head_dim, dtype, device)
    host = KVPool(num_blocks, layers, block_size, kv_heads, head_dim, dtype, torch.device("cpu"), host_for=device)
    stats = EngineStats()
    swapper = SwapManager(pool.data, host.data, mode, stats)
    kv = KVManager(num_blocks, num_blocks, block_size, stats, swapper)
    request = Request("r", [0] * tokens, SamplingParams(max_tokens=1), 0.0)
    kv.grow(request, tokens)  # as the engine would: a prompt's worth of blocks, in groups
    request.num_computed_tokens = tokens
    n_blocks = len(request.block_ids)
    times, floors = [], []
    # the floor copies between the same two device regions the swap alternates between, so both see the
    # same cache state: out of one, back into the other
    regions, host_span = (pool.data[:n_blocks], pool.data[n_blocks : 2 * n_blocks]), host.data[:n_blocks]
    for i in range(repeats + 1):  # the first round trip warms up
        request.host_tokens = 0  # copy every block every time: this measures the switch, not reuse
        copies_before = stats.copies
        out = _timed(device, lambda: _switch(kv, lambda: kv.swap_out(request)))
        back = _timed(device, lambda: _switch(kv, lambda: kv.swap_in(request)))
        times.append(out + back)
        copies = stats.copies - copies_before
        floors.append(_timed(device, lambda: host_span.copy_(regions[i % 2], non_blocking=True))
                      + _timed(device, lambda: regions[1 - i % 2].copy_(host_span, non_blocking=True)))
    swapper.close()
    nbytes = 2 * n_blocks * swapper.block_bytes
    seconds, floor = statistics.median(times[1:]), statistics.median(floors[1:])
    return dict(model=model, tokens=tokens, mode=mode, bytes=nbytes, copies=copies, seconds=seconds,
                floor_seconds=floor, gb_s=nbytes / seconds / 1e9, floor_gb_s=nbytes / floor / 1e9,
                vs_floor=seconds / floor)


def measure_interference(model_dir: str, device: str, dtype: str, batch: int, mover_tokens: int, steps: int,
                         load_format: str = "auto") -> dict:
    """Decode step time of a batch with and without another request swapping out and in meanwhile."""
    from fastswitch.config import EngineConfig
    from fastswitch.engine.engine import Engine

    engine = Engine(EngineConfig(model=model_dir, device=device, dtype=dtype, kv_cache_memory_bytes=1 << 30,
                                 max_num_batched_tokens=max(2048, mover_tokens), load_format=load_format))
    for i in range(batch):
        engine.add_request([100 + i] * 16, SamplingParams(temperature=0, max_tokens=10**6, ignore_eos=True))
    mover = Request("mover", [7] * mover_tokens, SamplingParams(max_tokens=1), 0.0)
    engine.core.kv.grow(mover, mover_tokens)
    mover.num_computed_tokens = mover_tokens
    for _ in range(3):
        engine.step()
    quiet, busy, switches = [], [], 0
    for phase in range(2 * steps):
        background = phase % 2 == 1
        if background and engine.core.kv.ready(mover):
            mover.host_tokens = 0
            if mover.block_ids:
                engine.core.kv.swap_out(mover)
            else:
                engine.core.kv.swap_in(mover)
            switches += 1
        start = time.perf_counter()
        engine.step()
        (busy if background else quiet).append(time.perf_counter() - start)
    engine.core.close()
    q, b = statistics.median(quiet), statistics.median(busy)
    return dict(batch=batch, mover_tokens=mover_tokens, quiet_step_s=q, busy_step_s=b, slowdown=b / q - 1,
                switches=switches)


def run(models: list[str], token_counts: list[int], device: str, dtype: str, block_size: int, repeats: int,
        json_path: str | None, plot_path: str | None, interference_models: list[str],
        load_format: str = "auto") -> list[dict]:
    dev, dt = torch.device(device), getattr(torch, dtype)
    rows = []
    for model in models:
        for tokens in token_counts:
            for mode in MODES:
                log.info("swap: %s, %d tokens, %s", model, tokens, mode)
                rows.append(measure_switch(model, tokens, mode, dev, dt, block_size, repeats))
    print(table(rows))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))
    if plot_path:
        plot(rows, plot_path)
    for model_dir in interference_models:
        log.info("interference: a decoding batch on %s while another request swaps", model_dir)
        result = measure_interference(model_dir, device, dtype, batch=8, mover_tokens=2048, steps=40,
                                      load_format=load_format)
        print(f"\nBackground swapping ({Path(model_dir).name}): batch of {result['batch']} decoding, a "
              f"{result['mover_tokens']}-token request switched {result['switches']} times: step "
              f"{1000 * result['quiet_step_s']:.2f} ms quiet, {1000 * result['busy_step_s']:.2f} ms busy, "
              f"slowdown {100 * result['slowdown']:.1f}%")
        rows.append(dict(interference=result, model_dir=model_dir))
        if json_path:
            Path(json_path).write_text(json.dumps(rows, indent=2))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tokens | mode | MB moved | copies | ms | GB/s | floor ms | x floor | baseline / fastswitch |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r["model"], r["tokens"], r["mode"]): r for r in rows}
    for r in rows:
        base = by_key.get((r["model"], r["tokens"], "baseline"))
        speedup = f"{base['seconds'] / r['seconds']:.2f}" if base and r["mode"] == "fastswitch" else ""
        lines.append(f"| {r['model']} | {r['tokens']} | {r['mode']} | {r['bytes'] / 1e6:.1f} | {r['copies']} | "
                     f"{1000 * r['seconds']:.2f} | {r['gb_s']:.1f} | {1000 * r['floor_seconds']:.2f} | "
                     f"{r['vs_floor']:.2f} | {speedup} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for mode, marker in (("baseline", "o"), ("fastswitch", "s")):
            mine = [r for r in rows if r["model"] == model and r["mode"] == mode]
            ax.plot([r["tokens"] for r in mine], [1000 * r["seconds"] for r in mine], marker=marker, label=mode)
        floor = [r for r in rows if r["model"] == model and r["mode"] == "fastswitch"]
        ax.plot([r["tokens"] for r in floor], [1000 * r["floor_seconds"] for r in floor], "k--", label="one plain copy (floor)")
        ax.set(xscale="log", yscale="log", xlabel="request length (tokens)", ylabel="swap-out + swap-in (ms)",
               title=f"{model} KV shape")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _switch(kv: KVManager, plan) -> None:
    """Plan a swap, make its copies and wait for them, as the engine does when it must."""
    plan()
    kv.swapper.start(kv.take_copies())
    kv.drain()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, copy) -> float:
    _sync(device)
    start = time.perf_counter()
    copy()
    _sync(device)
    return time.perf_counter() - start
