"""Median and spread of repeated runs, one row per run label, into OUT_DIR/repeats.md, with the
headline figures plotted as medians and min–max bars in OUT_DIR/repeats.png: every
OUT_DIR/PRESET/run-K/results.json that `REPEATS=N benchmarks/conversations.sh` wrote, or
OUT_DIR/run-K/LABEL/results.json from `REPEATS=N benchmarks/priority_tails.sh` and
`SEEDS=... benchmarks/sim_switch.sh` (one folder per setting).

    python benchmarks/repeats.py OUT_DIR
"""

import sys
from pathlib import Path

import numpy as np

from fastswitch.bench import report

FIGURES = [  # (column, summary key, format); a key "a.b" is summary["a"]["b"]
    ("TTFT P99 s", "ttft_p99", "{:.3f}"), ("TTFT P50 s", "ttft_p50", "{:.3f}"), ("TBT P99 s", "tbt_p99", "{:.3f}"),
    ("TBT P99.9 s", "tbt_p999", "{:.3f}"), ("tok/s", "throughput_tok_s", "{:.1f}"),
    ("goodput req/s", "goodput_req_s", "{:.2f}"), ("SLO met, level 0", "slo_attainment_by_priority.0", "{:.1%}"),
    ("SLO met, level 1", "slo_attainment_by_priority.1", "{:.1%}"), ("rejected", "rejected", "{:.0f}"),
    ("timed out", "timed_out", "{:.0f}"), ("preemptions / request", "preemptions_per_request", "{:.2f}"),
]
PLOTTED = ("ttft_p99", "tbt_p999", "throughput_tok_s", "preemptions_per_request")


def main(out: Path) -> None:
    runs: dict[str, list[dict]] = {}
    for path in sorted([*out.glob("*/run-*/results.json"), *out.glob("run-*/*/results.json")]):
        run = report.load(path.parent)
        runs.setdefault(run["label"], []).append(run["summary"])
    header = ["preset", "runs", *(f"{name}: median (min–max)" for name, _, _ in FIGURES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, summaries in runs.items():
        cells = [label, str(len(summaries))]
        for _, key, fmt in FIGURES:
            values = [v for s in summaries if (v := _figure(s, key)) is not None]
            cells.append("—" if not values else f"{fmt.format(np.median(values))} "
                         f"({fmt.format(min(values))}–{fmt.format(max(values))})")
        lines.append("| " + " | ".join(cells) + " |")
    (out / "repeats.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(runs, out / "repeats.png")


def _plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [f for f in FIGURES if f[1] in PLOTTED]
    fig, axes = plt.subplots(1, len(figures), figsize=(3.2 * len(figures), 4))
    labels = list(runs)
    for ax, (name, key, _) in zip(axes, figures):
        values = [[v for s in runs[label] if (v := _figure(s, key)) is not None] or [0.0] for label in labels]
        medians = np.array([np.median(v) for v in values])
        spread = np.array([medians - [min(v) for v in values], [max(v) for v in values] - medians])
        ax.bar(labels, medians, yerr=spread, capsize=3)
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(f"{path.parent.name}: median and min–max of {max(len(v) for v in runs.values())} runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _figure(summary: dict, key: str):
    for part in key.split("."):
        summary = summary.get(part) if isinstance(summary, dict) else None
    return summary


if __name__ == "__main__":
    main(Path(sys.argv[1]))
