"""Per-user service of runs that kept their request records: what each user got, and how evenly.

    python benchmarks/user_service.py OUT_DIR RUN_DIR...

For each run and user: requests served and abandoned, output tokens, the user's service rate (its
output tokens over the span from its first arrival to its last token) and its P99 TTFT; per run,
Jain's index over the users' service rates (1: all alike). Writes OUT_DIR/user_service.md and
OUT_DIR/user_service.png.
"""

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastswitch.bench import report


def per_user(run_dir: Path) -> dict[str, dict]:
    users = defaultdict(list)
    for r in report.load_requests(run_dir):
        users[r["user"]].append(r)
    rows = {}
    for user, records in sorted(users.items()):
        served = [r for r in records if r["outcome"] == "ok"]
        ends = [r["arrival_s"] + (r["ttft_s"] or 0) + sum(r["tbt_s"]) for r in records]
        span = max(ends) - min(r["arrival_s"] for r in records)
        tokens = sum(r["output_tokens"] for r in served)
        ttfts = [r["ttft_s"] for r in served if r["ttft_s"] is not None]
        rows[user] = {"served": len(served), "abandoned": len(records) - len(served), "tokens": tokens,
                      "rate": tokens / span if span > 0 else 0.0,
                      "ttft_p99": float(np.percentile(ttfts, 99)) if ttfts else None}
    return rows


def jain(rates: list[float]) -> float:
    x = np.array(rates)
    return float(x.sum() ** 2 / (len(x) * (x**2).sum())) if x.any() else 0.0


def main(out: Path, run_dirs: list[Path]) -> None:
    runs = {report.load(d)["label"]: per_user(d) for d in run_dirs}
    lines = ["| run | user | served | abandoned | output tokens | tok/s while active | P99 TTFT s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for label, users in runs.items():
        for user, row in users.items():
            ttft = "—" if row["ttft_p99"] is None else f"{row['ttft_p99']:.2f}"
            lines.append(f"| {label} | {user} | {row['served']} | {row['abandoned']} | {row['tokens']} | "
                         f"{row['rate']:.1f} | {ttft} |")
    lines += ["", "| run | Jain's index over users' tok/s | slowest user ÷ fastest |", "|---|---:|---:|"]
    for label, users in runs.items():
        rates = [row["rate"] for row in users.values()]
        lines.append(f"| {label} | {jain(rates):.3f} | {min(rates) / max(rates):.2f} |")
    (out / "user_service.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(runs, out / "user_service.png")


def _plot(runs: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = sorted({u for rows in runs.values() for u in rows})
    fig, (rate_ax, ttft_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / len(runs)
    for i, (label, rows) in enumerate(runs.items()):
        x = np.arange(len(users)) + i * width
        rate_ax.bar(x, [rows.get(u, {}).get("rate", 0) for u in users], width, label=label)
        ttft_ax.bar(x, [rows.get(u, {}).get("ttft_p99") or 0 for u in users], width, label=label)
    for ax in (rate_ax, ttft_ax):
        ax.set_xticks(np.arange(len(users)) + width * (len(runs) - 1) / 2, users)
    rate_ax.set(ylabel="output tokens / s while active", title="Service per user (higher is better)")
    ttft_ax.set(ylabel="seconds", title="P99 TTFT per user (lower is better)")
    rate_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]])
