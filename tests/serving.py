"""`fastswitch serve` in a child process on a loopback port, for the server tests."""

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port(following: int = 0) -> int:
    """A free loopback port, and (`following`) the next that many free too, as `fastswitch replicas` takes them."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if all(_free(port + i) for i in range(1, following + 1)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Server:
    def __init__(self, model_dir: str, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A file, not a pipe: nobody reads a pipe while the server runs, and a full one would block its logging.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastswitch", "serve", "--model", model_dir, "--port", str(self.port),
             "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "512", "--served-model-name", "tiny", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)  # polling the child's readiness
        self.stop()
        raise RuntimeError(f"server did not start: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {s.name + ("" if not s.labels else str(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def core_pid(self) -> int:
        """The engine core's process: the server's multiprocessing child (not its resource tracker)."""
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return next(int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def gone(pid: int, within_s: float = 10.0) -> bool:
    """Whether process `pid` has exited (or become a zombie) within the time given."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)  # polling another process's exit
    return False


def ranks_under(pid: int) -> list[int]:
    """The tensor-parallel rank processes descending from `pid`."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = [int(c) for c in open(f"/proc/{parent}/task/{parent}/children").read().split()]
        except FileNotFoundError:
            continue
        todo += children
        found += [c for c in children if b"fastswitch.executor.rank" in open(f"/proc/{c}/cmdline", "rb").read()]
    return found
