"""The same workload offline (the engine in this process) and over HTTP (`fastswitch serve`: API server
and engine core in two processes), one after the other on this machine: what serving over HTTP costs.

Both runs get the same engine options and the same conversation workload (`fastswitch bench run`,
priorities off so both use the engine's own policy). The HTTP run also records the CPU seconds of
the API server, the engine core and the benchmark client, which share this machine's cores.

    python benchmarks/http_vs_offline.py --model DIR --out DIR [--engine "--dtype bfloat16 ..."] \\
        [--workload "--conversations 40 --rate 20 ..."]
"""

import argparse
import json
import resource
import shlex
import socket
import subprocess
import sys
from datetime import date
from pathlib import Path

from fastswitch.bench.machine import describe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import cpu_seconds, engine_core_pid, wait_until_healthy  # noqa: E402


def bench(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "fastswitch", "bench", "run", *argv], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", default="", help="engine options for both runs")
    parser.add_argument("--workload", default="--conversations 40 --rate 20 --input-mean 200 --output-mean 100 "
                                              "--think-mean 0.5 --max-context 2048")
    args = parser.parse_args()
    out, engine, workload = Path(args.out), shlex.split(args.engine), shlex.split(args.workload)
    common = ["--priorities", "none", "--model", args.model, *engine, *workload]
    print("offline run ...", flush=True)
    bench("--mode", "offline", "--label", "offline", "--out", str(out / "offline"), *common)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fastswitch", "serve", "--port", str(port), "--model", args.model,
                               *engine], stdout=subprocess.DEVNULL)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server)
        core = engine_core_pid(server.pid)
        before = cpu_seconds(server.pid), cpu_seconds(core), resource.getrusage(resource.RUSAGE_CHILDREN)
        print("HTTP run ...", flush=True)
        bench("--mode", "http", "--url", f"http://127.0.0.1:{port}/v1", "--label", "http", "--out", str(out / "http"),
              *common)
        after = cpu_seconds(server.pid), cpu_seconds(core), resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        server.terminate()
        server.wait(timeout=60)
    client = (after[2].ru_utime + after[2].ru_stime) - (before[2].ru_utime + before[2].ru_stime)
    subprocess.run([sys.executable, "-m", "fastswitch", "bench", "compare", str(out / "offline"), str(out / "http"),
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    offline, http = (json.loads((out / k / "results.json").read_text())["summary"] for k in ("offline", "http"))
    lines = [
        f"# Offline vs HTTP, {Path(args.model).name}, {date.today()}",
        "",
        f"Machine: {describe()}",
        "",
        f"Command: `python benchmarks/http_vs_offline.py --model {args.model} --out {args.out} "
        f"--engine '{args.engine}' --workload '{args.workload}'`",
        "",
        "| | offline | HTTP | HTTP ÷ offline |",
        "|---|---:|---:|---:|",
        f"| throughput (tok/s) | {offline['throughput_tok_s']:.1f} | {http['throughput_tok_s']:.1f} | "
        f"{http['throughput_tok_s'] / offline['throughput_tok_s']:.3f} |",
        f"| TBT P50 (ms) | {1000 * offline['tbt_p50']:.2f} | {1000 * http['tbt_p50']:.2f} | "
        f"{http['tbt_p50'] / offline['tbt_p50']:.3f} |",
        f"| TTFT P50 (s) | {offline['ttft_p50']:.3f} | {http['ttft_p50']:.3f} | {http['ttft_p50'] / offline['ttft_p50']:.2f} |",
        "",
        f"CPU seconds during the HTTP run: engine core {after[1] - before[1]:.1f}, API server "
        f"{after[0] - before[0]:.1f}, benchmark client {client:.1f} (wall {http['duration_s']:.1f} s).",
        "",
        "`compare.md` has the full table; `ttft_cdf.png` and `tail_latency.png` the plots.",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
