"""The simulator against the real engine on this machine (issue 15's validation).

    python benchmarks/sim_validation.py OUT_DIR [--repeats 2] [--model DIR]

Calibrates a profile (`fastswitch sim calibrate`, on its own workload seed), then for each workload
below runs the real `fastswitch bench run` (offline, `--repeats` times: the real engine's own spread)
and `fastswitch sim` with that profile (`--seeds` times, one per engine seed: the trace policy's
draws, which the real runs vary by timing instead), compares them (`bench compare`), and writes
ratios.md / ratios.json (simulated mean ÷ real mean, against the targets) and ratios.png.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from fastswitch.model.demo import default_model_path

KV = ["--num-kv-blocks", "128"]
COMMON = ["--conversations", "40", "--think-mean", "1", "--max-context", "2048", *KV]
WORKLOADS = {  # name -> (preset, options): loads from light to past what the engine sustains
    "light": ("fastswitch", ["--rate", "1"]),
    "medium": ("fastswitch", ["--rate", "2"]),
    "heavy": ("fastswitch", ["--rate", "8"]),
    "medium-baseline": ("baseline", ["--rate", "2"]),
}
TARGETS = {  # summary key -> allowed relative error
    "throughput_tok_s": 0.15, "ttft_p50": 0.25, "ttft_p99": 0.25, "preemptions": 0.20, "swap_out_blocks": 0.20,
}


def fastswitch(*argv: str) -> None:
    print("+ fastswitch", " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "fastswitch", *argv], check=True, stdout=subprocess.DEVNULL)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=2, help="real runs per workload (default: 2)")
    parser.add_argument("--seeds", type=int, default=5, help="simulated runs per workload, one per engine seed (the "
                                                             "trace policy's draws; default: 5)")
    parser.add_argument("--model", default=None, help="model folder (default: the tiny demo model)")
    args = parser.parse_args()
    out, model = Path(args.out), ["--model", args.model or str(default_model_path())]  # the simulator's default is 8B
    out.mkdir(parents=True, exist_ok=True)
    profile = out / "profile.json"
    if not profile.is_file():
        fastswitch("sim", "calibrate", *model, *KV, "--out", str(profile))
    rows = {}
    for name, (preset, options) in WORKLOADS.items():
        argv = ["--preset", preset, *model, *COMMON, *options]
        reals = [out / name / f"real-{i + 1}" for i in range(args.repeats)]
        for i, run_dir in enumerate(reals):
            if not (run_dir / "results.json").is_file():
                fastswitch("bench", "run", *argv, "--label", f"real {i + 1}", "--out", str(run_dir))
        sims = [out / name / f"sim-seed{k}" for k in range(args.seeds)]
        for k, sim_dir in enumerate(sims):
            fastswitch("sim", *argv, "--profile", str(profile), "--seed", str(k), "--label", f"sim seed {k}",
                       "--no-progress", "--out", str(sim_dir))
        fastswitch("bench", "compare", *map(str, reals + sims), "--out", str(out / name))
        rows[name] = ratios([summary(r) for r in reals], [summary(r) for r in sims])
    (out / "ratios.json").write_text(json.dumps(rows, indent=1))
    (out / "ratios.md").write_text(table(rows) + "\n")
    plot(rows, out / "ratios.png")
    print(table(rows))


def ratios(reals: list[dict], sims: list[dict]) -> dict:
    """Per key: each side's values and spread (max ÷ min), and the simulated mean ÷ the real mean."""
    row = {}
    for key in TARGETS:
        real, sim = [r[key] for r in reals], [s[key] for s in sims]
        row[key] = {"real": real, "sim": sim, "real_spread": _spread(real), "sim_spread": _spread(sim),
                    "ratio": float(np.mean(sim) / np.mean(real)) if np.mean(real) else None}
    return row


def _spread(values: list[float]) -> float | None:
    return max(values) / min(values) if min(values) else None


def table(rows: dict) -> str:
    header = ["workload", *(f"{k} sim ÷ real (±{t:.0%})" for k, t in TARGETS.items())]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [name]
        for key, target in TARGETS.items():
            r = row[key]
            met = r["ratio"] is not None and abs(r["ratio"] - 1) <= target
            cells.append(f"**{r['ratio']:.2f}** {'met' if met else 'not met'} (real {_values(r['real'])}, spread "
                         f"{r['real_spread'] or 0:.2f}×; sim mean {np.mean(r['sim']):.3g}, spread "
                         f"{r['sim_spread'] or 0:.2f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _values(values: list[float]) -> str:
    return " / ".join(f"{v:.3g}" for v in values)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        x = np.arange(len(TARGETS)) + i * width
        ax.bar(x, [row[k]["ratio"] or 0 for k in TARGETS], width, label=name)
        for j, key in enumerate(TARGETS):  # every simulated run ÷ every real one: both sides' spread
            each = [s / r for s in row[key]["sim"] for r in row[key]["real"] if r]
            ax.plot([x[j]] * len(each), each, "k_", markersize=6, alpha=0.5)
    for j, target in enumerate(TARGETS.values()):
        ax.fill_between([j - 0.1, j + 0.9], 1 - target, 1 + target, color="green", alpha=0.12, lw=0)
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xticks(np.arange(len(TARGETS)) + width * (len(rows) - 1) / 2, list(TARGETS))
    ax.set(ylabel="simulated ÷ real", yscale="log", yticks=[0.25, 0.5, 0.8, 1, 1.25, 2, 3], yticklabels=[
        "0.25", "0.5", "0.8", "1", "1.25", "2", "3"],
           title="Simulator vs real engine (bars: mean ÷ mean; ticks: each sim run ÷ each real run; green: target)")
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
