"""Line plots of `sim_paper.sh`'s sweeps: each figure one parameter, a line per configuration.

    python benchmarks/sim_paper_plots.py OUT_DIR

Reads every results.json under OUT_DIR (a sweep shares its default point with the overload
experiment, so each point is found by its parameters, not its folder) and writes
OUT_DIR/sweep_<parameter>.png, baseline and fastswitch only.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = [("ttft_p99", "TTFT P99 (s)", "log"), ("tbt_p999", "TBT P99.9 (s)", "log"),
           ("throughput_tok_s", "output tok/s", "linear"), ("swap_out_blocks", "swap-out blocks", "symlog")]
SWEEPS = {  # parameter -> axis label
    "rate": "conversations per second", "link": "host link GB/s each way", "block_size": "tokens per KV block",
    "trace_update_freq": "priority updates per request per iteration", "swap_space": "host tier GiB",
}


def parameters(run: dict) -> dict:
    return {"rate": run["workload"]["rate"], "link": run["profile"]["link"]["h2d_bytes_per_s"] / 1e9,
            "block_size": run["config"]["block_size"], "trace_update_freq": run["config"]["trace_update_freq"],
            "swap_space": run["config"]["swap_space"]}


def defaults(run: dict) -> dict:
    """What sim_paper.sh holds while it varies one parameter: its overload setting."""
    small = run["model_shape"] == "llama3-8b"
    return {"rate": 2.5 if small else 1.5, "link": 25.0, "block_size": 16,
            "trace_update_freq": 0.04 if small else 0.02, "swap_space": 60.0}


def main() -> None:
    out = Path(sys.argv[1])
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/results.json"))]
    runs = [r for r in runs if r["config"]["policy"] == "trace" and r["preset"] in ("baseline", "fastswitch")]
    for sweep, label in SWEEPS.items():
        lines: dict[str, dict[float, dict]] = {}
        for run in runs:
            p, held = parameters(run), defaults(run)
            if all(p[k] == v for k, v in held.items() if k != sweep):
                lines.setdefault(f"{run['model_shape']} {run['preset']}", {})[p[sweep]] = run["summary"]
        lines = {name: points for name, points in lines.items() if len(points) > 1}
        if lines:
            plot(lines, label, out / f"sweep_{sweep}.png")


def plot(lines: dict[str, dict[float, dict]], label: str, path: Path) -> None:
    fig, axes = plt.subplots(1, len(METRICS), figsize=(16, 3.8))
    for ax, (key, title, scale) in zip(axes, METRICS):
        for name, points in sorted(lines.items()):
            xs = sorted(points)
            ax.plot(xs, [points[x][key] for x in xs], "o-", label=name)
        ax.set(xlabel=label, title=title, yscale=scale)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
