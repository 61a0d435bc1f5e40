"""What the benchmarks read about a running `fastswitch serve`: readiness, its engine core's pid, CPU time,
memory (Linux /proc)."""

import subprocess
import time
from pathlib import Path

import httpx


def wait_until_healthy(url: str, server: subprocess.Popen) -> None:
    """Poll /health until the server answers 200; RuntimeError if it exits first."""
    while server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling the server's readiness
    raise RuntimeError(f"fastswitch serve exited with code {server.returncode} before it was ready")


def engine_core_pid(server_pid: int) -> int:
    """The server's multiprocessing child (not its resource tracker)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    return next(int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_outside_kv_mb(pid: int, pool_bytes: int = 256 << 20) -> float:
    """Resident memory outside the KV pools: every mapping's Rss except anonymous ones of at least
    `pool_bytes` (the device pool and the host tier are allocated whole at start-up and faulted in as
    blocks are first written, so their resident size grows with use up to their size, which is no leak)."""
    total, size, anonymous = 0, 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header: start-end perms offset dev inode [path]
            start, end = (int(x, 16) for x in head[0].split("-"))
            size, anonymous = end - start, len(head) < 6
        elif head[0] == "Rss:" and not (anonymous and size >= pool_bytes):
            total += int(head[1])
    return total / 1024
