"""Paged attention alone: the CPU kernel against the torch reference and the KV-read floor, in one run.

One layer's attention over the block-major pool (a `KVPool` of the model's layers, so the real
strides and the engine's allocation), block tables shuffled across the pool. Decode: `batch` sequences of one query each, at each
context length. Prefill: one sequence's chunk of new tokens over a cached prefix (0 = a fresh
prompt). The floor is the bytes of K and V the step must read once ÷ this machine's read bandwidth,
measured here by summing a 512 MiB tensor. Writes a markdown table, JSON and a plot.

    python benchmarks/attention.py [--shapes tiny,0.5b] [--dtype bfloat16] [--batches 1,8,64]
        [--contexts 32,256,1024,4096,8192] [--prefills 0+512,0+2048,0+4096,4096+64,4096+512]
"""

import argparse
import json
import logging
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from fastswitch.bench.machine import describe
from fastswitch.kv.layout import KVPool
from fastswitch.model.attention import StepBatch, cpu, torch_ref
from fastswitch.model.demo import SIZES

log = logging.getLogger("bench")
MAX_TOKENS = 131072  # batch x context beyond this is skipped (the 0.5b pool would pass 1.6 GB)


def shape(name: str) -> dict:
    s = SIZES[name]
    heads = s["num_attention_heads"]
    return dict(layers=s["num_hidden_layers"], heads=heads, kv_heads=s["num_key_value_heads"],
                head_dim=s["hidden_size"] // heads)


def read_bandwidth() -> float:
    x = torch.ones(128 << 20)
    x.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / min(times)


def timed(fn, budget_s: float = 0.4) -> float:
    fn()
    times, spent = [], 0.0
    while len(times) < 3 or (spent < budget_s and len(times) < 30):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)


def case(s: dict, dtype, queries: list[int], contexts: list[int], block_size: int = 16):
    rng = random.Random(0)
    needed = [-(-c // block_size) for c in contexts]
    order = list(range(sum(needed)))
    rng.shuffle(order)
    tables, used = [], 0
    for n in needed:
        tables.append(order[used:used + n])
        used += n
    pool = KVPool(len(order), s["layers"], block_size, s["kv_heads"], s["head_dim"], dtype, torch.device("cpu"))
    pool = pool.data.normal_()  # allocated as the engine allocates it
    qsl = [0]
    for n in queries:
        qsl.append(qsl[-1] + n)
    slots = [t[p // block_size] * block_size + p % block_size for t, n, c in zip(tables, queries, contexts)
             for p in range(c - n, c)]
    q = torch.randn(qsl[-1], s["heads"], s["head_dim"], dtype=dtype)
    k = torch.randn(qsl[-1], s["kv_heads"], s["head_dim"], dtype=dtype)
    v = torch.randn_like(k)
    layer = s["layers"] // 2
    batch = StepBatch(qsl, contexts, tables, slots, block_size)
    kv_bytes = sum(contexts) * s["kv_heads"] * s["head_dim"] * 2 * dtype.itemsize
    return (q, k, v, pool[:, layer, 0], pool[:, layer, 1], batch), kv_bytes


def measure(s: dict, dtype, queries, contexts) -> dict:
    (q, k, v, k_cache, v_cache, batch), kv_bytes = case(s, dtype, queries, contexts)
    row = {"kv_bytes": kv_bytes}
    for backend in (cpu.CpuAttention(), torch_ref.TorchAttention(torch.device("cpu"))):
        def step():  # metadata once per step, as the runner builds it; the attention of one layer
            backend.prepare(batch).attend(q, k, v, k_cache, v_cache, s["head_dim"] ** -0.5)
        row[f"{backend.name}_ms"] = 1000 * timed(step)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,0.5b")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--contexts", default="32,256,1024,4096,8192")
    parser.add_argument("--prefills", default="0+512,0+2048,0+4096,4096+64,4096+512",
                        help="CACHED+NEW prompt chunks of one sequence")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not cpu.load_kernel():
        sys.exit("the CPU attention kernel could not be built here")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    bandwidth = read_bandwidth()
    log.info("read bandwidth %.1f GB/s", bandwidth / 1e9)
    rows = []
    for name in args.shapes.split(","):
        s = shape(name)
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                if batch * context > MAX_TOKENS:
                    continue
                log.info("%s decode, batch %d, context %d", name, batch, context)
                rows.append(dict(shape=name, kind="decode", batch=batch, cached=context - 1, new=1,
                                 **measure(s, dtype, [1] * batch, [context] * batch)))
        for item in args.prefills.split(","):
            cached, new = map(int, item.split("+"))
            log.info("%s prefill, %d new tokens over %d cached", name, new, cached)
            rows.append(dict(shape=name, kind="prefill", batch=1, cached=cached, new=new,
                             **measure(s, dtype, [new], [cached + new])))
    for r in rows:
        r["floor_ms"] = 1000 * r["kv_bytes"] / bandwidth
        r["speedup"] = r["torch_ms"] / r["cpu_ms"]
        r["vs_floor"] = r["cpu_ms"] / r["floor_ms"]
    write(rows, args, bandwidth)


def write(rows: list[dict], args, bandwidth: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"attention_cpu_{date.today()}"
    command = "python " + " ".join(sys.argv)
    header = (f"# Paged attention, one layer, {args.dtype}, {date.today()}\n\nMachine: {describe()}; read bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s\n\nCommand: `{command}`\n\n"
              "Median time of one layer's attention (metadata built once per call, as once per step), the CPU kernel "
              "against the torch reference, and the floor: K and V bytes read once at the measured bandwidth.\n\n")
    table = ["| shape | kind | batch | cached | new | kernel ms | reference ms | speed-up | floor ms | kernel / floor |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['shape']} | {r['kind']} | {r['batch']} | {r['cached']} | {r['new']} | {r['cpu_ms']:.3f} | "
              f"{r['torch_ms']:.3f} | {r['speedup']:.1f}x | {r['floor_ms']:.3f} | {r['vs_floor']:.2f} |" for r in rows]
    stem.with_suffix(".md").write_text(header + "\n".join(table) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"machine": describe(), "command": command,
                                                     "bandwidth_bytes_s": bandwidth, "rows": rows}, indent=2))
    plot(rows, stem.with_suffix(".png"))
    print(header + "\n".join(table))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 8), squeeze=False)
    for col, name in enumerate(shapes):
        ax = axes[0][col]
        decodes = [r for r in rows if r["shape"] == name and r["kind"] == "decode"]
        for i, batch in enumerate(dict.fromkeys(r["batch"] for r in decodes)):
            mine = [r for r in decodes if r["batch"] == batch]
            x = [r["cached"] + 1 for r in mine]
            color = f"C{i}"
            ax.plot(x, [r["cpu_ms"] for r in mine], "o-", color=color, label=f"kernel, batch {batch}")
            ax.plot(x, [r["torch_ms"] for r in mine], "s--", color=color, alpha=0.6, label=f"reference, batch {batch}")
            ax.plot(x, [r["floor_ms"] for r in mine], ":", color=color, alpha=0.6, label=f"KV-read floor, batch {batch}")
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms per layer", title=f"{name}: decode")
        ax.legend(fontsize=7)
        ax = axes[1][col]
        prefills = [r for r in rows if r["shape"] == name and r["kind"] == "prefill"]
        x = range(len(prefills))
        ax.bar([i - 0.2 for i in x], [r["cpu_ms"] for r in prefills], 0.4, label="kernel")
        ax.bar([i + 0.2 for i in x], [r["torch_ms"] for r in prefills], 0.4, label="reference")
        ax.set_xticks(list(x), [f"{r['new']} new\nover {r['cached']}" for r in prefills])
        ax.set(yscale="log", ylabel="ms per layer", title=f"{name}: prefill chunk")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
