"""Benchmark figures from per-request records, a run's files, and the side-by-side of several runs (table
and plots).

A run is `results.json` (label, command, machine, configuration, workload, summary, and the TTFT
quantiles its CDF plot needs: a few KB) and, when it compresses to at most `REQUESTS_LIMIT_BYTES`,
`requests.json.gz` beside it: every request's record, times rounded to the microsecond. A larger
run keeps only results.json; its command regenerates the records.

Latencies are in seconds, over the requests served (not those rejected or timed out). TTFT is
measured from a request's arrival (offline) or from when it was first sent (HTTP, so waiting out
429s counts); TBT pools every gap between consecutive tokens of every request. A request meets the
SLO when it was served and its TTFT and its mean TBT are within its priority level's targets
(`fastswitch/slo.py`; level 0's for a request sent without a priority): attainment and goodput (those
met per second) count every request sent, a rejected or timed-out one as a miss. Jain's fairness
index is over per-user service, counted as VTC counts it by default (a prompt token 1, an output
token 2; nothing for a request not served): 1 when every user got the same, 1/users when one got
everything.
"""

import dataclasses
import gzip
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastswitch.bench.runner import COUNTERS, STRONGEST, RequestRecord
from fastswitch.slo import SLO

log = logging.getLogger(__name__)
REQUESTS_FILE = "requests.json.gz"
REQUESTS_LIMIT_BYTES = 256 * 1024
USERS_BROKEN_OUT = 16  # summaries list per-user figures for at most this many users
CDF_QUANTILES = [*np.linspace(0, 0.99, 100), 0.995, 0.999, 0.9995, 1.0]  # the CDF plot's points, dense at the tail
PERCENTILES = {"p50": 50, "p95": 95, "p99": 99, "p999": 99.9}
TABLE = [  # (column, summary key, format)
    ("TTFT P50 s", "ttft_p50", "{:.3f}"), ("TTFT P95 s", "ttft_p95", "{:.3f}"), ("TTFT P99 s", "ttft_p99", "{:.3f}"),
    ("TTFT P99.9 s", "ttft_p999", "{:.3f}"),
    ("lowest level's TTFT P99 s", "lowest_level_ttft_p99", "{:.3f}"), ("TBT P50 s", "tbt_p50", "{:.4f}"),
    ("TBT P99 s", "tbt_p99", "{:.3f}"), ("TBT P99.9 s", "tbt_p999", "{:.3f}"),
    ("tok/s", "throughput_tok_s", "{:.1f}"), ("goodput req/s", "goodput_req_s", "{:.2f}"),
    ("SLO met", "slo_attainment", "{:.1%}"), ("rejected", "rejected", "{:.0f}"), ("timed out", "timed_out", "{:.0f}"),
    ("preemptions", "preemptions", "{:.0f}"), ("preemptions / request", "preemptions_per_request", "{:.2f}"),
    ("paused s / preemption", "paused_s_per_preemption", "{:.2f}"), ("swap-out blocks", "swap_out_blocks", "{:.0f}"),
    ("swap-out MB", "swap_out_bytes", "{:.1f}"), ("reuse-saved blocks", "reuse_saved_blocks", "{:.0f}"),
    ("stall s", "stall_s", "{:.2f}"), ("cached prompt share", "cached_prompt_share", "{:.1%}"),
]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(records: list[RequestRecord], duration_s: float, counters: dict[str, float | None],
              slo: SLO | None = None) -> dict:
    served = _served(records)
    tbt = [gap for r in served for gap in r.tbt_s]
    output_tokens = sum(r.output_tokens for r in served)
    summary = {"requests": len(records), "served": len(served), "rejected": _count(records, "rejected"),
               "timed_out": _count(records, "timeout"), "rejections": sum(r.rejections for r in records),
               "duration_s": duration_s, "output_tokens": output_tokens,
               "throughput_tok_s": output_tokens / duration_s if duration_s > 0 else None}
    summary |= {f"ttft_{name}": percentile([r.ttft_s for r in served], q) for name, q in PERCENTILES.items()}
    known = [r for r in served if r.cached_tokens is not None]
    prompts = sum(r.prompt_tokens for r in known)
    summary["cached_prompt_share"] = sum(r.cached_tokens for r in known) / prompts if prompts else None
    summary |= {f"tbt_{name}": percentile(tbt, q) for name, q in PERCENTILES.items() if name != "p95"}
    slo = slo or SLO.parse()
    met = [r for r in records if _meets(r, slo)]
    summary |= {"slo_attainment": len(met) / len(records) if records else None,
                "goodput_req_s": len(met) / duration_s if duration_s > 0 else None}
    by_priority = defaultdict(list)
    for r in records:
        if r.priority is not None:
            by_priority[r.priority].append(r)
    levels = [(str(p), v) for p, v in sorted(by_priority.items())]
    summary["ttft_p99_by_priority"] = {p: percentile([r.ttft_s for r in _served(v)], 99) for p, v in levels}
    gaps = {p: [g for r in _served(v) for g in r.tbt_s] for p, v in levels}
    summary["tbt_p99_by_priority"] = {p: percentile(g, 99) for p, g in gaps.items()}
    summary["tbt_p999_by_priority"] = {p: percentile(g, 99.9) for p, g in gaps.items()}
    summary["slo_attainment_by_priority"] = {p: sum(_meets(r, slo) for r in v) / len(v) for p, v in levels}
    summary["rejected_by_priority"] = {p: _count(v, "rejected") for p, v in levels}
    summary["timed_out_by_priority"] = {p: _count(v, "timeout") for p, v in levels}
    summary["lowest_level_ttft_p99"] = summary["ttft_p99_by_priority"][levels[-1][0]] if levels else None
    summary["jain_index"] = jain_index(records)
    summary |= _by_user(records)
    summary |= {key: counters.get(key) for key in COUNTERS}
    preemptions = counters.get("preemptions")
    summary["preemptions_per_request"] = preemptions / len(records) if preemptions is not None and records else None
    paused = [r.paused_s for r in records if r.paused_s is not None]
    summary["paused_s_per_preemption"] = sum(paused) / preemptions if paused and preemptions else None
    return summary


def _by_user(records: list[RequestRecord]) -> dict:
    """Per user, while there are few enough to list: requests served, output tokens, TTFT P50 and P99."""
    users = defaultdict(list)
    for r in records:
        users[r.user].append(r)
    if len(users) > USERS_BROKEN_OUT:
        return {}
    served = {u: _served(v) for u, v in sorted(users.items())}
    return {"served_by_user": {u: len(v) for u, v in served.items()},
            "output_tokens_by_user": {u: sum(r.output_tokens for r in v) for u, v in served.items()},
            "ttft_p50_by_user": {u: percentile([r.ttft_s for r in v], 50) for u, v in served.items()},
            "ttft_p99_by_user": {u: percentile([r.ttft_s for r in v], 99) for u, v in served.items()}}


def _served(records: list[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if r.outcome == "ok"]


def _count(records: list[RequestRecord], outcome: str) -> int:
    return sum(r.outcome == outcome for r in records)


def _meets(r: RequestRecord, slo: SLO) -> bool:
    return r.outcome == "ok" and all(slo.met(r.priority or 0, r.ttft_s, r.tbt_s))


def jain_index(records: list[RequestRecord]) -> float | None:
    service = defaultdict(float)
    for r in records:  # a user whose requests were all refused counts, with nothing
        service[r.user] += r.prompt_tokens + 2 * r.output_tokens if r.outcome == "ok" else 0
    x = np.array(list(service.values()))
    return float(x.sum() ** 2 / (len(x) * (x**2).sum())) if len(x) and x.any() else None


# -- a run's files --------------------------------------------------------------------------------------


def write(out_dir: Path, results: dict, records: list[RequestRecord]) -> None:
    """results.json with the TTFT quantiles for plots, and the records beside it if they compress small enough."""
    ttft = [r.ttft_s for r in _served(records)]
    results = results | {"ttft_quantiles": _rounded(np.quantile(ttft, CDF_QUANTILES).tolist()) if ttft else []}
    packed = gzip.compress(json.dumps([_rounded(dataclasses.asdict(r)) for r in records],
                                      separators=(",", ":")).encode(), mtime=0)
    requests_file = out_dir / REQUESTS_FILE
    if len(packed) <= REQUESTS_LIMIT_BYTES:
        requests_file.write_bytes(packed)
        results["requests_file"] = REQUESTS_FILE
    else:
        requests_file.unlink(missing_ok=True)
        results["requests_file"] = None
        log.info("per-request records not kept: %d KiB compressed, over the %d KiB limit (the command regenerates "
                 "them)", len(packed) // 1024, REQUESTS_LIMIT_BYTES // 1024)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def _rounded(value):
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def load(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no results.json (write one with 'fastswitch bench run --out {run_dir}')")
    return json.loads(path.read_text())


def load_requests(run_dir: str | Path) -> list[dict]:
    """A run's per-request records (`RequestRecord` fields), if it kept them."""
    name = load(run_dir).get("requests_file")
    if not name:
        raise ValueError(f"{run_dir}: its per-request records were not kept (over {REQUESTS_LIMIT_BYTES // 1024} KiB "
                         "compressed); rerun its command to regenerate them")
    return json.loads(gzip.decompress((Path(run_dir) / name).read_bytes()))


# -- comparing runs -------------------------------------------------------------------------------------


def table(runs: list[dict]) -> str:
    """A markdown table, one row per run, how each compares with the first, and, when the runs include presets
    of what users run today (`STRONGEST`), with the best of those on each figure."""
    header = ["run", *(c for c, _, _ in TABLE), "first's P99 TTFT ÷ this", "tok/s ÷ first's"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = runs[0]["summary"]
    for run in runs:
        s = run["summary"]
        cells = [run["label"] + (" (sim)" if run.get("mode") == "sim" else "")]
        for _, key, fmt in TABLE:
            value = s.get(key)
            cells.append("—" if value is None else fmt.format(value / 1e6 if key == "swap_out_bytes" else value))
        cells.append(_ratio(first.get("ttft_p99"), s.get("ttft_p99"), "{:.2f}×"))
        cells.append(_ratio(s.get("throughput_tok_s"), first.get("throughput_tok_s"), "{:.2f}×"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + _against_strongest(runs)


def _against_strongest(runs: list[dict]) -> str:
    """Each run's figures as ratios to the best of the strongest baselines in the comparison."""
    strong = [r["summary"] for r in runs if r.get("preset") in STRONGEST]
    if not strong:
        return ""
    best = {key: (max if higher else min)(v for s in strong if (v := s.get(key)) is not None)
            for key, _, higher in STRONGEST_FIGURES}
    header = ["run", *(f"{column} ÷ best baseline's" for _, column, _ in STRONGEST_FIGURES)]
    lines = ["", "", f"Against the best of {', '.join(sorted({r['preset'] for r in runs if r.get('preset') in STRONGEST}))}"
             " on each figure (below 1 is better for latencies and preemptions, above 1 for tok/s):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        s = run["summary"]
        lines.append("| " + " | ".join([run["label"], *(_ratio(s.get(key), best[key], "{:.2f}")
                                                          for key, _, _ in STRONGEST_FIGURES)]) + " |")
    return "\n".join(lines)


STRONGEST_FIGURES = [("ttft_p99", "P99 TTFT", False), ("tbt_p999", "P99.9 TBT", False),
                     ("throughput_tok_s", "tok/s", True), ("preemptions", "preemptions", False)]


def _ratio(a: float | None, b: float | None, fmt: str) -> str:
    return fmt.format(a / b) if a and b else "—"


def plot(runs: list[dict], out_dir: Path) -> list[Path]:
    """TTFT CDFs, tail-latency bars, swap traffic, the history hit, and per-priority-level P99 TTFT and SLO
    attainment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in runs]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run.get("ttft_quantiles"):  # runs recorded as summaries alone have none
            ax.plot(run["ttft_quantiles"], CDF_QUANTILES, label=run["label"])
    ax.set(xscale="log", xlabel="time to first token (s)", ylabel="fraction of requests", title="TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "ttft_cdf.png"))

    keys = ["ttft_p95", "ttft_p99", "ttft_p999", "tbt_p99", "tbt_p999"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        ax.bar(np.arange(len(keys)) + i * width, [run["summary"].get(k) or 0 for k in keys], width, label=run["label"])
    ax.set_xticks(np.arange(len(keys)) + width * (len(runs) - 1) / 2, [k.replace("_", " ").upper() for k in keys])
    ax.set(yscale="log", ylabel="seconds", title="Tail latency (lower is better)")
    ax.legend()
    paths.append(_save(fig, out_dir / "tail_latency.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    out = [(r["summary"].get("swap_out_bytes") or 0) / 1e6 for r in runs]
    back = [(r["summary"].get("swap_in_bytes") or 0) / 1e6 for r in runs]
    ax.bar(labels, out, label="swapped out")
    ax.bar(labels, back, bottom=out, label="swapped in")
    ax.set(ylabel="MB copied", title="Swap traffic")
    ax.tick_params(axis="x", rotation=20)
    ax.legend()
    paths.append(_save(fig, out_dir / "swap_bytes.png"))

    if any(r["summary"].get("cached_prompt_share") is not None for r in runs):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.bar(labels, [100 * (r["summary"].get("cached_prompt_share") or 0) for r in runs])
        ax.set(ylabel="% of prompt tokens", ylim=(0, 100), title="Prompt tokens served from cached KV (history hit)")
        ax.tick_params(axis="x", rotation=20)
        paths.append(_save(fig, out_dir / "cached_prompt_share.png"))

    levels = sorted({p for run in runs for p in run["summary"].get("ttft_p99_by_priority", {})}, key=int)
    if levels:
        fig, (ttft_ax, slo_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
        for i, run in enumerate(runs):
            s, x = run["summary"], np.arange(len(levels)) + i * width
            ttft_ax.bar(x, [s["ttft_p99_by_priority"].get(p) or 0 for p in levels], width, label=run["label"])
            slo_ax.bar(x, [100 * (s.get("slo_attainment_by_priority", {}).get(p) or 0) for p in levels], width,
                       label=run["label"])
        for ax in (ttft_ax, slo_ax):
            ax.set_xticks(np.arange(len(levels)) + width * (len(runs) - 1) / 2, [f"priority {p}" for p in levels])
        ttft_ax.set(yscale="log", ylabel="seconds", title="P99 TTFT by priority level (lower is better)")
        slo_ax.set(ylabel="% of requests", ylim=(0, 100), title="SLO attainment by priority level")
        ttft_ax.legend()
        paths.append(_save(fig, out_dir / "priority_levels.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
