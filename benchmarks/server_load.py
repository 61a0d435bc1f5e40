"""Load: many concurrent streaming clients against `fastswitch serve`, then check that nothing is left.

Starts the server (tiny demo model) on a free loopback port, warms it up, records the resident
memory of both its processes (API server, engine core), then runs N streaming chat clients at once
(the official `openai` async client). Afterwards: every client got the tokens it asked for, the KV
pool is fully free, nothing is running, and each process's memory is compared with where it
started, and after a second identical load (growth that stops is allocator and cache warm-up;
growth that continues would be a leak). The engine core is also measured outside its KV pools:
those are allocated whole at start-up and become resident as blocks are first written, so a burst
that uses blocks never used before grows them, up to their size, without leaking anything.

    python benchmarks/server_load.py [--clients 500] [--max-tokens 16]
"""

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from fastswitch.bench.machine import describe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import engine_core_pid, rss_mb, rss_outside_kv_mb, wait_until_healthy  # noqa: E402


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


async def client_run(client, i: int, max_tokens: int) -> tuple[bool, float]:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=max_tokens, stream=True,
        user=f"user{i % 10}", extra_body={"ignore_eos": True, "return_token_ids": True, "priority": i % 4})
    tokens, ttft = 0, None
    async for chunk in stream:
        if chunk.choices:
            tokens += len(chunk.choices[0].model_extra["token_ids"])
            ttft = ttft or time.perf_counter() - start
    return tokens == max_tokens, ttft or float("nan")


async def load(url: str, clients: int, max_tokens: int) -> list[tuple[bool, float]]:
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 10), timeout=600)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=http)
    return await asyncio.gather(*(client_run(client, i, max_tokens) for i in range(clients)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--server-args", default="", help="extra `fastswitch serve` options, e.g. '--no-enable-prefix-caching'")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "fastswitch", "serve", "--port", str(port), "--served-model-name",
                               "tiny", "--max-queue", str(args.clients + 10), "--policy", "vtc",
                               *args.server_args.split()],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(url, server)
        print("server up; warming up", flush=True)
        asyncio.run(load(url, 8, args.max_tokens))
        core = engine_core_pid(server.pid)
        rss_before = rss_mb(server.pid), rss_mb(core), rss_outside_kv_mb(core)
        print(f"running {args.clients} concurrent streaming clients ...", flush=True)
        start = time.perf_counter()
        results = asyncio.run(load(url, args.clients, args.max_tokens))
        elapsed = time.perf_counter() - start
        time.sleep(1)
        after = metrics(url)
        rss_after = rss_mb(server.pid), rss_mb(core), rss_outside_kv_mb(core)
        print("a second, identical load: does memory keep growing?", flush=True)
        again = asyncio.run(load(url, args.clients, args.max_tokens))
        time.sleep(1)
        rss_again = rss_mb(server.pid), rss_mb(core), rss_outside_kv_mb(core)
    finally:
        server.terminate()
        code = server.wait(timeout=60)
    complete = sum(ok for ok, _ in results)
    ttfts = sorted(t for _, t in results)
    lines = [
        f"# Server load, {args.clients} concurrent streaming clients, cpu, {date.today()}",
        "",
        f"Machine: {describe()}",
        "",
        f"Command: `python benchmarks/server_load.py --clients {args.clients} --max-tokens {args.max_tokens}"
        + (f" --server-args '{args.server_args}'`" if args.server_args else "`"),
        "",
        "Tiny demo model (bf16, CPU, 2 cores), `--policy vtc` over 10 users, priorities 0-3, streaming chat "
        f"completions of {args.max_tokens} tokens each, all sent at once.",
        "",
        f"- completed with the right token count: {complete} / {args.clients}",
        f"- wall time: {elapsed:.1f} s ({args.clients * args.max_tokens / elapsed:.0f} output tokens/s)",
        f"- TTFT p50 / p99: {ttfts[len(ttfts) // 2]:.2f} s / {ttfts[int(0.99 * (len(ttfts) - 1))]:.2f} s",
        f"- afterwards: requests running {after['fastswitch:num_requests_running']:.0f}, waiting "
        f"{after['fastswitch:num_requests_waiting']:.0f}, device KV in use {after['fastswitch:kv_cache_usage_perc']:.1%}",
        *(f"- {name} resident memory: {before:.0f} MB before the load, {after_:.0f} MB after it "
          f"({after_ / before - 1:+.1%}), {again_:.0f} MB after a second identical load"
          for name, before, after_, again_ in zip(("API server", "engine core", "engine core outside the KV pools"),
                                                  rss_before, rss_after, rss_again)),
        f"- the second load: {sum(ok for ok, _ in again)} / {args.clients} complete",
        f"- exit code after SIGTERM: {code}",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"server_load_cpu_{date.today()}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
