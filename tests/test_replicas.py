"""`fastswitch replicas`: two real servers behind a real SMG router on loopback ports."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving import Server, free_port, gone

pytestmark = pytest.mark.skipif(not any((Path(p) / "smg").exists() for p in os.environ["PATH"].split(":")),
                                reason="needs the SMG router: pip install 'fastswitch[router]'")


class Replicas(Server):
    """`fastswitch replicas` in a child process; `output()` and `stop()` as for a server."""

    def __init__(self, model_dir: str, *extra: str):  # not Server's: readiness is the launcher's line
        self.port = free_port(following=2)  # the replicas take the next two
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastswitch", "replicas", "--num", "2", "--port", str(self.port), "--model",
             model_dir, "--dtype", "float32", "--num-kv-blocks", "256", "--served-model-name", "tiny", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            if "serving 2 replicas" in self.output():
                return
            time.sleep(0.2)  # polling the child's readiness
        self.stop()
        raise RuntimeError(f"replicas did not start: {self.output()}")

    def replica_pids(self) -> list[int]:
        """The `fastswitch serve` children, by port (the router is the other child)."""
        pid = self.proc.pid
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        serving = {c: Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0") for c in children}
        return [c for c, argv in sorted(serving.items(), key=lambda kv: kv[1]) if b"serve" in argv]

    def prompt_tokens(self, port: int) -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        line = next(line for line in text.splitlines() if line.startswith("fastswitch:prompt_tokens"))
        return float(line.split()[-1])


def converse(client: openai.OpenAI, user: str, turns: int = 2) -> list[int]:
    """A conversation keyed on its user; the cached prompt tokens each turn reported."""
    history, cached = f"{user} asks about context switches in serving engines. " * 12, []
    for _ in range(turns):
        out = client.completions.create(model="tiny", prompt=history, max_tokens=8, temperature=0, user=user,
                                        extra_body={"ignore_eos": True}, extra_headers={"x-smg-routing-key": user})
        cached.append(out.usage.prompt_tokens_details.cached_tokens or 0)
        history += out.choices[0].text + " and then? "
    return cached


def test_consistent_hashing_keeps_each_users_history_on_one_replica_and_a_lost_replica_is_routed_around(llama_dir):
    r = Replicas(llama_dir)
    try:
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0, timeout=60)
        cached, served = {}, [0.0, 0.0]
        for i in range(32):  # at least 8 users, and more until both replicas have some: where the ring puts a
            cached[f"user{i}"] = converse(client, f"user{i}")  # key depends on the replicas' (random) ports
            served = [r.prompt_tokens(r.port + 1 + k) for k in range(2)]
            if i >= 7 and all(served):
                break
        assert all(turns[1] > 0 for turns in cached.values()), cached  # every later turn found its history
        assert all(s > 0 for s in served), served  # the users spread over both replicas
        first, second = r.replica_pids()
        os.kill(first, signal.SIGKILL)
        assert gone(first)
        deadline, outcomes = time.monotonic() + 60, []
        while time.monotonic() < deadline:  # no request hangs; new ones go to the replica left
            try:
                outcomes.append(len(converse(client, f"after{len(outcomes)}", turns=1)))
            except openai.APIError:
                outcomes.append(0)
            if outcomes[-3:] == [1, 1, 1]:
                break
        assert outcomes[-3:] == [1, 1, 1], outcomes
    finally:
        pids = [int(c) for c in Path(f"/proc/{r.proc.pid}/task/{r.proc.pid}/children").read_text().split()]
        assert r.stop() == 0
    assert all(gone(pid) for pid in pids), "a replica or the router outlived the launcher"


def test_sticky_sessions_place_conversations_by_load_and_keep_each_on_its_replica(llama_dir):
    """What the docs recommend for per-user fairness: each conversation keyed on its own id, its first turn
    placed by power_of_two, its later turns kept where its history is."""
    r = Replicas(llama_dir, "--router-policy", "power_of_two", "--router-arg=--sticky-sessions")
    try:
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0, timeout=60)
        cached, served = {}, [0.0, 0.0]
        for i in range(32):  # until both replicas have some: where a new key goes is the router's choice
            cached[f"conversation{i}"] = converse(client, f"conversation{i}", turns=3)
            served = [r.prompt_tokens(r.port + 1 + k) for k in range(2)]
            if i >= 3 and all(served):
                break
        assert all(t > 0 for turns in cached.values() for t in turns[1:]), cached  # no later turn moved
        assert all(s > 0 for s in served), served
    finally:
        assert r.stop() == 0


def test_replicas_split_the_cores_and_refuse_more_replicas_than_cores(llama_dir):
    from fastswitch.config import EngineConfig
    from fastswitch.server.replicas import shares

    cores = sorted(os.sched_getaffinity(0))
    config = EngineConfig(device="cpu")
    split = shares(config, len(cores))
    assert [s["cpu_cores"] for s in split] == [str(c) for c in cores]
    result = subprocess.run([sys.executable, "-m", "fastswitch", "replicas", "--num", str(len(cores) + 1), "--model",
                             llama_dir], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "CPU cores" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_router_runs_without_smgs_overload_protection():
    """A busy FastSwitch runs with its KV pool full and requests waiting, which SMG's overload protection takes
    for a worker to avoid: it would move conversations away from their history."""
    from fastswitch.server.replicas import ROUTER_POLICIES, router_command

    workers = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    for policy in ROUTER_POLICIES:
        assert "--disable-worker-overload-protection" in router_command(policy, "h", 0, workers, [])
