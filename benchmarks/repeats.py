"""Median and spread of repeated runs: every OUT_DIR/PRESET/run-K/results.json that
`REPEATS=N benchmarks/conversations.sh` wrote, one row per preset, into OUT_DIR/repeats.md.

    python benchmarks/repeats.py OUT_DIR
"""

import sys
from pathlib import Path

import numpy as np

from fastswitch.bench import report

FIGURES = [("TTFT P99 s", "ttft_p99", "{:.3f}"), ("TTFT P50 s", "ttft_p50", "{:.3f}"),
           ("TBT P99.9 s", "tbt_p999", "{:.3f}"), ("tok/s", "throughput_tok_s", "{:.1f}"),
           ("preemptions / request", "preemptions_per_request", "{:.2f}")]


def main(out: Path) -> None:
    runs: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*/run-*/results.json")):
        run = report.load(path.parent)
        runs.setdefault(run["label"], []).append(run["summary"])
    header = ["preset", "runs", *(f"{name}: median (min–max)" for name, _, _ in FIGURES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, summaries in runs.items():
        cells = [label, str(len(summaries))]
        for _, key, fmt in FIGURES:
            values = [s[key] for s in summaries if s.get(key) is not None]
            cells.append("—" if not values else f"{fmt.format(np.median(values))} "
                         f"({fmt.format(min(values))}–{fmt.format(max(values))})")
        lines.append("| " + " | ".join(cells) + " |")
    (out / "repeats.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
