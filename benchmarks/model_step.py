"""The whole model step through the engine: decode at batch 8 against context length, and a 4k prefill.

For each model shape, dtype and attention backend, in one run: 8 requests whose prompts fill the
context to each length decode together, and the median `Engine.step()` is the decode step; then one
prompt of `--prefill-len` tokens is prefilled alone (in chunks of the engine's token budget) and
timed to its first token. The decode floor is the bytes a step must read once (the weights, and
every sequence's K and V in every layer) ÷ this machine's read bandwidth. Writes a markdown table,
JSON and a plot.

    python benchmarks/model_step.py [--shapes tiny,0.5b] [--dtypes bfloat16,float32] [--backends cpu,torch]
        [--contexts 32,256,1024,2048,4000] [--prefill-len 4000]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import read_bandwidth  # noqa: E402
from offline_throughput import model_path  # noqa: E402

from fastswitch import Engine, EngineConfig, SamplingParams  # noqa: E402
from fastswitch.bench.machine import describe  # noqa: E402

log = logging.getLogger("bench")
BATCH, DECODE_STEPS = 8, 12


def engine(path: Path, dtype: str, backend: str, max_len: int) -> Engine:
    blocks = BATCH * (-(-max_len // 16) + 2) * 5 // 4  # headroom: nobody is preempted
    return Engine(EngineConfig(model=str(path), dtype=dtype, attention_backend=backend, num_kv_blocks=blocks,
                               max_model_len=max_len + 96, max_num_seqs=BATCH, enable_prefix_caching=False))


def decode_step_s(eng: Engine, context: int, rng: random.Random) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)  # none ends before all decode
    ids = [eng.add_request([rng.randrange(3, 4000) for _ in range(context - 1)], params) for _ in range(BATCH)]
    times = []
    while len(times) < DECODE_STEPS:
        decoding = all(r.num_computed_tokens >= r.num_prompt_tokens for r in eng.core.scheduler.requests.values())
        start = time.perf_counter()
        eng.step()
        if decoding:
            times.append(time.perf_counter() - start)
    for request_id in ids:
        eng.abort(request_id)
    return statistics.median(times)


def prefill_s(eng: Engine, length: int, rng: random.Random) -> float:
    eng.add_request([rng.randrange(3, 4000) for _ in range(length)], SamplingParams(max_tokens=1))
    start = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    return time.perf_counter() - start


def decode_floor_s(eng: Engine, context: int, bandwidth: float) -> float:
    runner = eng.core.executor.runner
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    cfg = runner.cfg
    kv = BATCH * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * runner.dtype.itemsize
    return (weights + kv) / bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,0.5b")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--backends", default="cpu,torch")
    parser.add_argument("--contexts", default="32,256,1024,2048,4000")
    parser.add_argument("--prefill-len", type=int, default=4000)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bandwidth = read_bandwidth()
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            for backend in args.backends.split(","):
                eng = engine(model_path(shape), dtype, backend, max(max(contexts), args.prefill_len))
                rng = random.Random(0)
                row = dict(shape=shape, dtype=dtype, backend=eng.core.executor.runner.attention.name, decode_ms={}, floor_ms={})
                for context in contexts:
                    log.info("%s %s %s: decode at batch %d, context %d", shape, dtype, backend, BATCH, context)
                    row["decode_ms"][context] = 1000 * decode_step_s(eng, context, rng)
                    row["floor_ms"][context] = 1000 * decode_floor_s(eng, context, bandwidth)
                log.info("%s %s %s: prefill of %d tokens", shape, dtype, backend, args.prefill_len)
                row["prefill_s"] = prefill_s(eng, args.prefill_len, rng)
                rows.append(row)
                del eng
    write(rows, args, contexts, bandwidth)


def write(rows: list[dict], args, contexts: list[int], bandwidth: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"model_step_cpu_{date.today()}"
    command = "python " + " ".join(sys.argv)
    first, last = contexts[0], contexts[-1]
    header = (f"# Model step through the engine, {date.today()}\n\nMachine: {describe()}; read bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s\n\nCommand: `{command}`\n\nMedian `Engine.step()` while {BATCH} requests "
              f"decode at each context length (ms), the ratio of the longest to the shortest, the step against "
              f"its floor (weights + KV read once), and the time to prefill one {args.prefill_len}-token prompt "
              f"(chunks of 2048).\n\n")
    table = ["| shape | dtype | attention | " + " | ".join(f"ctx {c}" for c in contexts) +
             f" | {last} / {first} | {last}: step / floor | prefill {args.prefill_len} s |",
             "|---|---|---|" + "---:|" * (len(contexts) + 3)]
    for r in rows:
        d = r["decode_ms"]
        table.append(f"| {r['shape']} | {r['dtype']} | {r['backend']} | " + " | ".join(f"{d[c]:.1f}" for c in contexts)
                     + f" | {d[last] / d[first]:.2f} | {d[last] / r['floor_ms'][last]:.2f} | {r['prefill_s']:.2f} |")
    stem.with_suffix(".md").write_text(header + "\n".join(table) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"machine": describe(), "command": command,
                                                     "bandwidth_bytes_s": bandwidth, "rows": rows}, indent=2))
    plot(rows, contexts, stem.with_suffix(".png"))
    print(header + "\n".join(table))


def plot(rows: list[dict], contexts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for i, r in enumerate(r for r in rows if r["shape"] == shape):
            style = "o-" if r["backend"] == "cpu" else "s--"
            ax.plot(contexts, [r["decode_ms"][c] for c in contexts], style, color=f"C{i}",
                    label=f"{r['backend']} attention, {r['dtype']}")
            ax.plot(contexts, [r["floor_ms"][c] for c in contexts], ":", color=f"C{i}", alpha=0.5)
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel=f"decode step ms (batch {BATCH})",
               title=f"{shape}: decode step (dotted: read floor)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
