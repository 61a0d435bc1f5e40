"""Scheduler overhead per iteration at 256 concurrent requests, for every policy, on the real engine.

The tiny demo model decodes 256 requests at once (bf16, CPU); each iteration is timed in three parts:
`Scheduler.schedule()`, the rest of the engine's bookkeeping (detokenizing, stop checks, outputs),
and the model (forward and sampling). The trace policy re-draws priorities at 0.04 per iteration and
vtc spreads the requests over 16 users, so ranking changes and preemption decisions are exercised;
With a roomy pool this is the cost of the decisions alone; with a pool 10% short of what the requests
need by the end of the window, requests pause and resume, and `schedule()` also pays for the
preemptions it starts (on CPU, swaps under 4 MiB are copied inline).

    python benchmarks/scheduler_overhead.py [--requests 256] [--steps 60]
"""

import argparse
import json
import random
import statistics
import time
from datetime import date
from pathlib import Path

from fastswitch import LLM, SamplingParams
from fastswitch.model.demo import default_model_path


def measure(policy: str, requests: int, steps: int, tight: bool) -> dict:
    prompt_len, max_tokens = 64, 512
    need = requests * (prompt_len + steps) / 16  # blocks the requests hold by the end of the window
    blocks = int(0.9 * need) if tight else int(2 * need)
    llm = LLM(str(default_model_path()), device="cpu", num_kv_blocks=blocks, max_num_seqs=requests,
              max_num_batched_tokens=4096, policy=policy)
    engine, rng = llm.engine, random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(requests):
        engine.add_request([rng.randrange(3, 4000) for _ in range(prompt_len)], params, priority=rng.randrange(4),
                           user=f"user{i % 16}")
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.core.scheduler.running + list(engine.core.scheduler.waiting)):
        engine.step()  # prefill everything first: measure steady decoding
    scheduler, spent = engine.core.scheduler, []
    original = scheduler.schedule

    def timed():
        start = time.perf_counter()
        out = original()
        spent.append(time.perf_counter() - start)
        return out

    scheduler.schedule = timed
    stats = engine.stats
    before = (stats.iterations, stats.step_time_s, stats.model_time_s, stats.preemptions)
    for _ in range(steps):
        engine.step()
    n = stats.iterations - before[0]
    step_s, model_s = (stats.step_time_s - before[1]) / n, (stats.model_time_s - before[2]) / n
    return dict(policy=policy, pool="tight" if tight else "roomy", requests=requests, running=len(scheduler.running), schedule_ms=1000 * statistics.mean(spent),
                schedule_p99_ms=1000 * sorted(spent)[int(0.99 * (len(spent) - 1))],
                bookkeeping_ms=1000 * (step_s - model_s - statistics.mean(spent)), model_ms=1000 * model_s,
                preemptions=stats.preemptions - before[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = []
    for tight in (False, True):
        for policy in ("fcfs", "priority", "vtc", "trace"):
            print(f"measuring {policy}, {'tight' if tight else 'roomy'} pool ...", flush=True)
            rows.append(measure(policy, args.requests, args.steps, tight))
    table = ["| pool | policy | running | schedule() ms/iter | p99 | other engine ms/iter | model ms/iter | schedule / model | preemptions |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['pool']} | {r['policy']} | {r['running']} | {r['schedule_ms']:.3f} | {r['schedule_p99_ms']:.3f} | "
              f"{r['bookkeeping_ms']:.2f} | {r['model_ms']:.1f} | {r['schedule_ms'] / r['model_ms']:.1%} | "
              f"{r['preemptions']} |" for r in rows]
    header = (f"# Scheduler overhead, {args.requests} concurrent requests, cpu, {date.today()}\n\n"
              f"Command: `python benchmarks/scheduler_overhead.py --requests {args.requests} --steps {args.steps}`\n\n"
              "Tiny demo model, bf16, steady decoding after every prompt is prefilled; means over the measured "
              "iterations. 'roomy': the decisions alone; 'tight': a pool 10% short, so `schedule()` also starts "
              "preemptions and their (inline, under 4 MiB) swap copies. 'other engine' is the rest of "
              "`Engine.step()` outside the model: detokenizing, stop checks, building outputs.\n\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"scheduler_overhead_cpu_{date.today()}"
    stem.with_suffix(".md").write_text(header + "\n".join(table) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(header + "\n".join(table))


if __name__ == "__main__":
    main()
