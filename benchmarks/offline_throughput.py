"""Offline throughput: FastSwitch against transformers `generate` on the same model, in the same run.

Greedy decoding of equal-length random prompts at several batch sizes; output tokens per second of
wall time (prefill included), and FastSwitch's engine overhead per iteration (time in `step()`
outside the model forward and sampling). Writes a markdown table, the raw JSON and a bar chart.

    python benchmarks/offline_throughput.py [--models tiny,0.5b] [--batch-sizes 1,8,32]
"""

import argparse
import json
import logging
import random
import time
from datetime import date
from pathlib import Path

import torch

from fastswitch import LLM, SamplingParams
from fastswitch.bench.machine import describe
from fastswitch.model.demo import default_model_path, write_demo_model

log = logging.getLogger("bench")


def model_path(size: str) -> Path:
    if size == "tiny":
        return default_model_path()
    path = default_model_path().parent / f"demo-qwen2-{size}"
    if not (path / "model.safetensors").is_file():
        log.info("writing the %s demo model to %s", size, path)
        write_demo_model(path, arch="qwen2", size=size)
    return path


def run_fastswitch(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.stats
    before = (stats.iterations, stats.step_time_s, stats.model_time_s)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    iterations = stats.iterations - before[0]
    overhead = (stats.step_time_s - before[1]) - (stats.model_time_s - before[2])
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"tok_s": tokens / elapsed, "overhead_ms": 1000 * overhead / iterations, "tokens": [o.token_ids for o in outputs]}


def run_transformers(model, prompts: list[list[int]], max_tokens: int) -> dict:
    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, **kwargs)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, **kwargs)
        elapsed = time.perf_counter() - start
    return {"tok_s": ids.shape[0] * max_tokens / elapsed, "tokens": out[:, ids.shape[1]:].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,0.5b")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoModelForCausalLM

    rows = []
    for size in args.models.split(","):
        path = model_path(size)
        llm = LLM(str(path), dtype=args.dtype, device=args.device, kv_cache_memory_bytes=1 << 30)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
        rng = random.Random(0)
        for batch in map(int, args.batch_sizes.split(",")):
            prompts = [[rng.randrange(3, 4000) for _ in range(args.prompt_len)] for _ in range(batch)]
            log.info("%s, batch %d: fastswitch", size, batch)
            fs = run_fastswitch(llm, prompts, args.max_tokens)
            log.info("%s, batch %d: transformers", size, batch)
            ref = run_transformers(hf, prompts, args.max_tokens)
            same = sum(a == b for a, b in zip(fs["tokens"], ref["tokens"]))
            rows.append(dict(model=size, batch=batch, fastswitch_tok_s=fs["tok_s"], transformers_tok_s=ref["tok_s"],
                             ratio=fs["tok_s"] / ref["tok_s"], overhead_ms=fs["overhead_ms"], identical=f"{same}/{batch}"))
            log.info("%s", rows[-1])
        del llm, hf
    write_results(rows, args)


def write_results(rows: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"offline_throughput_{args.device}_{date.today()}"
    header = (f"# Offline throughput, {args.device}, {date.today()}\n\n"
              f"Machine: {describe()}\n\n"
              f"Command: `python benchmarks/offline_throughput.py --models {args.models} --batch-sizes {args.batch_sizes} "
              f"--prompt-len {args.prompt_len} --max-tokens {args.max_tokens} --dtype {args.dtype} --device {args.device}`\n\n"
              f"Greedy, {args.dtype}, prompts of {args.prompt_len} tokens, {args.max_tokens} output tokens each; "
              "tok/s = output tokens / wall time (prefill included). 'identical' counts requests whose tokens equal "
              "transformers' (bf16 rounding can differ between the two).\n\n")
    table = ["| model | batch | FastSwitch tok/s | transformers tok/s | ratio | engine overhead ms/iter | identical |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['model']} | {r['batch']} | {r['fastswitch_tok_s']:.1f} | {r['transformers_tok_s']:.1f} | "
              f"{r['ratio']:.2f} | {r['overhead_ms']:.2f} | {r['identical']} |" for r in rows]
    stem.with_suffix(".md").write_text(header + "\n".join(table) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"machine": describe(), "args": vars(args), "rows": rows}, indent=2))
    plot(rows, stem.with_suffix(".png"))
    print(header + "\n".join(table))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        x = range(len(mine))
        ax.bar([i - 0.2 for i in x], [r["fastswitch_tok_s"] for r in mine], 0.4, label="FastSwitch")
        ax.bar([i + 0.2 for i in x], [r["transformers_tok_s"] for r in mine], 0.4, label="transformers")
        ax.set_xticks(list(x), [f"batch {r['batch']}" for r in mine])
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"{model} demo model")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
