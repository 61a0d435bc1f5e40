"""Tensor parallelism on this machine: decode at batch 8 with 1 rank against N ranks, and what the
executor seam costs per step (sending the step to every rank, gathering their replies).

For each size, one engine decodes 8 requests of `--context` tokens together; the median
`Engine.step()` gives the decode tokens/s. With N > 1 ranks, the seam is each step's wall time in
the executor less the slowest rank's own time (`MultiprocExecutor.seam_s`), and the model's
collectives are timed alone in N processes pinned as the ranks are (one all-reduce of a decode
step's activations, one all-gather of its logit shards). One rank runs on every core; N ranks each
on their share. Writes markdown, JSON and a plot.

    python benchmarks/tensor_parallel.py [--shape 0.5b] [--sizes 1,2] [--context 128] [--steps 30]
"""

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import model_path  # noqa: E402

from fastswitch import Engine, EngineConfig, SamplingParams  # noqa: E402
from fastswitch.bench.machine import describe  # noqa: E402
from fastswitch.model.config import ModelConfig  # noqa: E402

log = logging.getLogger("bench")
BATCH = 8


def measure(path: Path, size: int, context: int, steps: int) -> dict:
    engine = Engine(EngineConfig(model=str(path), tensor_parallel_size=size, num_kv_blocks=BATCH * (context // 16 + 8),
                                 max_num_seqs=BATCH, enable_prefix_caching=False))
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for _ in range(BATCH):
        engine.add_request([rng.randrange(3, 4000) for _ in range(context - 1)], params)
    scheduler, executor = engine.core.scheduler, engine.core.executor
    while not all(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running) or len(scheduler.running) < BATCH:
        engine.step()  # the prefills
    times, seam = [], []
    for _ in range(steps):
        seam_before, start = getattr(executor, "seam_s", 0.0), time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        seam.append(getattr(executor, "seam_s", 0.0) - seam_before)
    description = engine.core.description
    engine.core.close()
    step = statistics.median(times)
    return dict(ranks=size, step_ms=1000 * step, tokens_per_s=BATCH / step, seam_us=1e6 * statistics.median(seam),
                seam_share=statistics.median(seam) / step, engine=description)


def collectives_us(size: int, shape) -> tuple[float, float]:
    """Median µs of one all-reduce of [BATCH, hidden] and one all-gather of [BATCH, vocab / size], in `size`
    processes pinned to their share of the cores with one thread each, over gloo."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        results = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_time_collectives, args=(size, shape.hidden_size, -(-shape.vocab_size // size), folder, results),
                 nprocs=size)
        return results.get()


def _time_collectives(rank: int, size: int, hidden: int, vocab_rows: int, folder: str, results) -> None:
    import torch
    import torch.distributed as dist

    from fastswitch.config import EngineConfig

    cores = EngineConfig(device="cpu", tensor_parallel_size=size).rank_cores()[rank]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=size)
    x, y = torch.randn(BATCH, hidden), torch.randn(BATCH, vocab_rows)
    timings = []
    for op in (lambda: dist.all_reduce(x), lambda: dist.all_gather([torch.empty_like(y) for _ in range(size)], y)):
        times = []
        for _ in range(60):
            start = time.perf_counter()
            op()
            times.append(time.perf_counter() - start)
        timings.append(1e6 * statistics.median(times[10:]))
    if rank == 0:
        results.put(tuple(timings))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--sizes", default="1,2")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        log.info("%s: %d rank(s), batch %d at context %d", args.shape, size, BATCH, args.context)
        row = measure(model_path(args.shape), size, args.context, args.steps)
        if size > 1:
            row["all_reduce_us"], row["all_gather_us"] = collectives_us(size, ModelConfig.from_folder(
                model_path(args.shape), need_weights=False))
        rows.append(row)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"tensor_parallel_{args.shape}_cpu_{date.today()}"  # "0.5b" has a dot: no with_suffix
    command = "python " + " ".join(sys.argv)
    base = rows[0]["tokens_per_s"]
    header = (f"# Tensor parallelism, {args.shape}, {date.today()}\n\nMachine: {describe()}\n\nCommand: `{command}`\n\n"
              f"Median `Engine.step()` of {BATCH} requests decoding at context {args.context} ({args.steps} steps); "
              "the seam: each step's time in the executor less the slowest rank's own.\n\n")
    table = ["| ranks | step ms | decode tok/s | vs 1 rank | seam µs / step | seam share of the step | all-reduce µs "
             "| logits all-gather µs | engine |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        collectives = f"{r['all_reduce_us']:.0f} | {r['all_gather_us']:.0f}" if "all_reduce_us" in r else "— | —"
        table.append(f"| {r['ranks']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x "
                     f"| {r['seam_us']:.0f} | {100 * r['seam_share']:.2f}% | {collectives} | {r['engine']} |")
    (out / f"{name}.md").write_text(header + "\n".join(table) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"machine": describe(), "command": command, "rows": rows}, indent=2))
    plot(rows, out / f"{name}.png")
    print(header + "\n".join(table))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = [f"{r['ranks']} rank{'s' * (r['ranks'] > 1)}" for r in rows]
    compute = [r["step_ms"] - r["seam_us"] / 1000 for r in rows]
    ax.bar(labels, compute, label="ranks' own time")
    ax.bar(labels, [r["seam_us"] / 1000 for r in rows], bottom=compute, label="seam (send + gather)")
    ax.set(ylabel=f"decode step ms (batch {BATCH})", title="tensor parallelism: one decode step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
