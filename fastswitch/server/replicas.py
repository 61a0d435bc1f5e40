"""N `fastswitch serve` replicas behind a router, started and stopped as one: `fastswitch replicas`.

Each replica is a `fastswitch serve` on its own port with the same engine options, and on a
machine it shares, its own share of it: on CPU a contiguous slice of the cores this process may use
(`--cpu-cores`), on CUDA its own device. The KV budget options are per replica. The router is SMG
(`pip install 'fastswitch[router]'`), started once every replica answers /health, with the replicas
as its workers. SIGTERM or SIGINT stops the router, then the replicas (each lets its requests in
flight finish, as `serve` does). A replica that dies is logged and left to the router, which sends
new requests to the others; if the router dies, everything stops and the exit code is 1.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx

from fastswitch.config import EngineConfig, format_cores

log = logging.getLogger(__name__)

ROUTER_POLICIES = ("consistent_hashing", "cache_aware", "round_robin", "power_of_two", "random", "prefix_hash")
STARTUP_TIMEOUT_S = 600.0


def shares(config: EngineConfig, num: int) -> list[dict[str, str]]:
    """Each replica's own share of the machine: the option to add to its engine options."""
    if config.device.startswith("cuda"):
        import torch

        if num > torch.cuda.device_count():
            raise ValueError(f"--num {num} replicas on CUDA need {num} devices; "
                             f"{torch.cuda.device_count()} are visible")
        return [{"device": f"cuda:{i}"} for i in range(num)]
    cores = config.cpu_set() or sorted(os.sched_getaffinity(0))
    if num > len(cores):
        raise ValueError(f"--num {num} replicas need at least {num} CPU cores; {len(cores)} are available")
    size = len(cores) // num
    return [{"cpu_cores": format_cores(cores[i * size : (i + 1) * size])} for i in range(num)]


def router_command(policy: str, host: str, port: int, workers: list[str], extra: list[str]) -> list[str]:
    """SMG's command line, without SMG's worker overload protection, which leaves a worker out of routing while
    its KV usage is at 0.8 or 8 requests wait: a busy FastSwitch is there by design (its pool runs full, paused
    requests wait on the host tier), so the protection moves conversations between replicas and their history
    is left behind (measured, 120 conversations past capacity: 57% of prompt tokens cached with it under
    consistent_hashing, 77% without, as on one replica; cache_aware 56% and 76.5%)."""
    smg = shutil.which("smg")
    if smg is None:
        raise ValueError("the router is not installed: pip install 'fastswitch[router]' (SMG)")
    return [smg, "launch", "--host", host, "--port", str(port), "--policy", policy, "--worker-urls", *workers,
            "--disable-worker-overload-protection", *extra]


def run(config: EngineConfig, serve_args: list[str], num: int, policy: str, host: str, port: int,
        router_args: list[str], log_level: str = "warning") -> int:
    """Start the replicas on the ports after `port`, then the router on `port`; serve until signalled."""
    if num < 1:
        raise ValueError("--num must be at least 1")
    if policy not in ROUTER_POLICIES:
        raise ValueError(f"invalid --router-policy {policy!r}; choose from {', '.join(ROUTER_POLICIES)}")
    ports = [port + 1 + i for i in range(num)]
    router_log = ["--log-level", {"warning": "warn"}.get(log_level, log_level)]
    router = router_command(policy, host, port, [f"http://127.0.0.1:{p}" for p in ports], router_log + router_args)
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    replicas = [_start_replica(serve_args, share, p, log_level) for share, p in zip(shares(config, num), ports)]
    processes = list(replicas)
    try:
        if not all(_wait_healthy(f"http://127.0.0.1:{p}/health", r, stopping) for p, r in zip(ports, replicas)):
            return 0
        processes.insert(0, subprocess.Popen(router))
        if not _wait_healthy(f"http://{_connect_host(host)}:{port}/v1/models", processes[0], stopping):
            return 0
        print(f"serving {num} replicas behind SMG ({policy}) on http://{host}:{port}/v1", flush=True)
        return _watch(processes[0], replicas, stopping)
    finally:
        _stop(processes)


def _start_replica(serve_args: list[str], share: dict[str, str], port: int, log_level: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fastswitch", "--log-level", log_level, "serve", "--host", "127.0.0.1", "--port",
            str(port), *serve_args]
    for name, value in share.items():  # after the shared options, so it wins
        argv += ["--" + name.replace("_", "-"), value]
    print(f"starting replica on port {port} ({', '.join(f'{k} {v}' for k, v in share.items())})", file=sys.stderr,
          flush=True)
    return subprocess.Popen(argv)


def _wait_healthy(url: str, process: subprocess.Popen, stopping: list) -> bool:
    """Until `url` answers 200; False if signalled meanwhile."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not stopping:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(process.args[:4])} exited while starting (exit code {process.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {STARTUP_TIMEOUT_S:.0f} s")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling a child's readiness
    return False


def _watch(router: subprocess.Popen, replicas: list[subprocess.Popen], stopping: list) -> int:
    gone = set()
    while not stopping:
        if router.poll() is not None:
            log.error("the router exited (code %s): stopping the replicas", router.returncode)
            return 1
        for i, replica in enumerate(replicas):
            if i not in gone and replica.poll() is not None:
                gone.add(i)
                log.warning("replica %d exited (code %s); the router sends new requests to the others", i,
                            replica.returncode)
        time.sleep(0.5)  # nothing to do but notice exits and signals
    return 0


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
