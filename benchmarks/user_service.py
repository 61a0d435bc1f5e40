"""What each user got in runs with few users: requests served, output tokens, TTFT P50 and P99 (from
each run's summary), and per run how far apart the users are.

    python benchmarks/user_service.py OUT_DIR RUN_DIR...

Writes OUT_DIR/user_service.md and OUT_DIR/user_service.png.
"""

import sys
from pathlib import Path

import numpy as np

from fastswitch.bench import report


def main(out: Path, run_dirs: list[Path]) -> None:
    runs = {}
    for run_dir in run_dirs:
        run = report.load(run_dir)
        if "ttft_p99_by_user" not in run["summary"]:
            raise ValueError(f"{run_dir}: no per-user figures (more than {report.USERS_BROKEN_OUT} users, or an "
                             "older run)")
        runs[run["label"]] = run["summary"]
    lines = ["| run | user | served | output tokens | TTFT P50 s | TTFT P99 s |", "|---|---|---:|---:|---:|---:|"]
    for label, s in runs.items():
        for user, p99 in s["ttft_p99_by_user"].items():
            lines.append(f"| {label} | {user} | {s['served_by_user'][user]} | {s['output_tokens_by_user'][user]} | "
                         f"{_seconds(s['ttft_p50_by_user'][user])} | {_seconds(p99)} |")
    lines += ["", "| run | Jain's index (service) | worst user's TTFT P99 ÷ best user's | worst user's TTFT P50 ÷ best's |",
              "|---|---:|---:|---:|"]
    for label, s in runs.items():
        lines.append(f"| {label} | {s['jain_index']:.3f} | {_spread(s['ttft_p99_by_user'])} | "
                     f"{_spread(s['ttft_p50_by_user'])} |")
    (out / "user_service.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(runs, out / "user_service.png")


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _spread(by_user: dict[str, float | None]) -> str:
    values = [v for v in by_user.values() if v]
    return f"{max(values) / min(values):.2f}" if values else "—"


def _plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = sorted({u for s in runs.values() for u in s["ttft_p99_by_user"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / len(runs)
    for ax, key, title in zip(axes, ("ttft_p50_by_user", "ttft_p99_by_user"), ("TTFT P50", "TTFT P99")):
        for i, (label, s) in enumerate(runs.items()):
            ax.bar(np.arange(len(users)) + i * width, [s[key].get(u) or 0 for u in users], width, label=label)
        ax.set_xticks(np.arange(len(users)) + width * (len(runs) - 1) / 2, users)
        ax.set(ylabel="seconds", title=f"{title} per user (lower is better)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]])
