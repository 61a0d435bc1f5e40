"""Tensor parallelism's executor: one process per rank (`executor/rank.py`), each a Worker over its
shard of the model and of both KV tiers, driven in lockstep by the engine core.

Each call is encoded once and sent to every rank (a PUSH socket each, as vLLM's multiprocessing
executor broadcasts its step); every rank answers. The step's sampled tokens come from rank 0; a
copy is done once every rank has reported it done. On one machine the ranks meet over IPC and a
rendezvous file; across machines (`nnodes`) over TCP at node 0's `dist_init_addr`, the other nodes'
ranks started there by `fastswitch ranks` (`serve_node`). A rank that dies, disconnects or fails a
call fails the engine: the others are killed, the call raises `ExecutorDied`, no process is left
behind on this node, and the other nodes' ranks see the engine go and exit.
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter
from dataclasses import dataclass, replace

import msgspec
import zmq

from fastswitch.config import EngineConfig, format_cores
from fastswitch.executor.rank import Call, Reply
from fastswitch.interfaces import ExecutorDied
from fastswitch.kv.swap import inline_copy_bytes, made_inline
from fastswitch.messages import ModelOutput, SchedulerOutput
from fastswitch.model.config import ModelConfig
from fastswitch.model.demo import default_model_path
from fastswitch.model.parallel import Shard
from fastswitch.stats import EngineStats

log = logging.getLogger(__name__)
LIVENESS_POLL_MS = 200  # while waiting for replies, how often the ranks are checked for life
CLOSE_WAIT_S = 10.0


@dataclass(frozen=True)
class Meeting:
    """Where the ranks meet: torch.distributed's rendezvous, the engine core's socket for replies, and
    each rank's socket for calls."""

    init_method: str
    replies: str
    calls: tuple[str, ...]

    @classmethod
    def of(cls, config: EngineConfig, folder: str) -> "Meeting":
        """On one machine, IPC and a file in the engine's private folder; across machines, TCP at node 0."""
        size = config.tensor_parallel_size
        if config.nnodes == 1:
            return cls(f"file://{folder}/rendezvous", f"ipc://{folder}/replies",
                       tuple(f"ipc://{folder}/calls-{rank}" for rank in range(size)))
        host, port = config.rendezvous()
        return cls(f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}",
                   tuple(f"tcp://{host}:{port + 2 + rank}" for rank in range(size)))


def bind_address(address: str) -> str:
    """A TCP address to bind: its host as an IP address (ZeroMQ binds interfaces, not names)."""
    if not address.startswith("tcp://"):
        return address
    host, _, port = address[len("tcp://"):].rpartition(":")
    return f"tcp://{socket.gethostbyname(host)}:{port}"


def start_ranks(config: EngineConfig, meeting: Meeting, parent_pid: int) -> list[subprocess.Popen]:
    """This node's ranks, as `python -m fastswitch.executor.rank` processes that die with `parent_pid`."""
    cuda = config.device.startswith("cuda")
    local = config.local_ranks()
    shares = [None] * len(local) if cuda else config.rank_cores()
    rank_config = replace(config, cpu_cores=None)  # each rank gets its share of the cores instead
    ranks = []
    for rank, cores in zip(local, shares):
        argv = [sys.executable, "-m", "fastswitch.executor.rank", "--rank", str(rank),
                "--size", str(config.tensor_parallel_size), "--parent-pid", str(parent_pid),
                "--init-method", meeting.init_method, "--calls", meeting.calls[rank], "--replies", meeting.replies,
                "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
                *(["--cores", format_cores(cores)] if cores else []), *rank_config.to_cli_args()]
        ranks.append(subprocess.Popen(argv))
    return ranks


def serve_node(config: EngineConfig) -> int:
    """`fastswitch ranks`: run this node's ranks for the engine on node 0 until they end; 1 if any failed
    (then the others are stopped too: a rank whose peer is gone waits in a collective forever)."""
    ranks = start_ranks(config, Meeting.of(config, ""), os.getpid())
    signal.signal(signal.SIGTERM, lambda *_: _stop_ranks(ranks, None, None, 0))
    log.info("node %d: ranks %s started, meeting the engine at %s", config.node_rank,
             list(config.local_ranks()), config.dist_init_addr)
    failed = False  # once one rank fails, the others are stopped at once
    while any(rank.poll() is None for rank in ranks) and not (failed := any(rank.returncode for rank in ranks)):
        time.sleep(LIVENESS_POLL_MS / 1000)
    _stop_ranks(ranks, None, None, 0 if failed else CLOSE_WAIT_S)
    return int(any(rank.returncode != 0 for rank in ranks))


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, stats: EngineStats):
        self.stats, self.size, self.mode = stats, config.tensor_parallel_size, config.swap_mode
        model = ModelConfig.from_folder(config.model or default_model_path(), need_weights=False)
        Shard(0, self.size).check(model)  # a model the ranks cannot split is refused here, before any starts
        self.num_layers = model.num_layers
        cuda = config.device.startswith("cuda")
        self.inline_bytes = inline_copy_bytes(cuda, config.async_swap)
        self._dir = tempfile.mkdtemp(prefix="fastswitch-tp-")
        meeting = Meeting.of(config, self._dir)
        self._context = zmq.Context()
        self._calls = [self._context.socket(zmq.PUSH) for _ in range(self.size)]
        self._replies = self._context.socket(zmq.PULL)
        for address, calls in zip(meeting.calls, self._calls):
            calls.sndhwm = 0
            calls.bind(bind_address(address))
        self._replies.bind(bind_address(meeting.replies))
        local = config.local_ranks()  # the other nodes' ranks are watched through their connections
        self._remote = {rank: self._calls[rank].get_monitor_socket(zmq.EVENT_DISCONNECTED)
                        for rank in range(self.size) if rank not in local}
        self._encoder, self._decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Reply)
        self._ended_on = Counter()  # copy id -> ranks that reported it done or failed
        self._failed: set[int] = set()  # copies some rank reported failed: failed on all, once all have ended
        self.failure: str | None = None  # once set, every call raises ExecutorDied with it
        self.seam_s = 0.0  # of the steps' time: sending them to the ranks and gathering the replies
        self.ranks = start_ranks(config, meeting, os.getpid())
        # an executor dropped without close() (an LLM going out of scope) still takes its ranks with it
        self._finalizer = weakref.finalize(self, _stop_ranks, self.ranks, self._context, self._dir, 0)
        if self._remote:
            log.warning("tensor parallel: waiting for ranks %s at %s (`fastswitch ranks --node-rank K` on the "
                        "other nodes)", sorted(self._remote), config.dist_init_addr)
        try:
            fits = self._gather()  # each rank's first reply, once its shard is loaded
            log.info("tensor parallel: %d ranks ready", self.size)
            self.spec = self._call(Call("allocate_kv", value=int(min(r.number for r in fits))))[0].spec
        except BaseException:
            self._stop(kill=True)
            raise
        self.block_bytes = self.spec.block_bytes

    # -- the Executor seam -----------------------------------------------------------------------------

    def execute(self, step: SchedulerOutput) -> ModelOutput:
        for copy in step.copies:
            self.stats.count_copy(copy.kind, copy.num_blocks, self.block_bytes, copy.operations(self.mode, self.num_layers))
        start = time.perf_counter()
        replies = self._call(Call("execute", step))
        self.seam_s += time.perf_counter() - start - max(reply.number for reply in replies)
        for reply in replies:
            self._ended_on.update(reply.output.finished_copies + reply.output.failed_copies)
            self._failed.update(reply.output.failed_copies)
        ended = [copy_id for copy_id, ranks in self._ended_on.items() if ranks == self.size]
        for copy_id in ended:
            del self._ended_on[copy_id]
        output = replies[0].output
        output.finished_copies = [i for i in ended if i not in self._failed]
        output.failed_copies = [i for i in ended if i in self._failed]
        self._failed.difference_update(ended)
        return output

    def synchronous(self, num_blocks: int) -> bool:
        return made_inline(self.mode, num_blocks * self.block_bytes, self.inline_bytes)

    def wait(self, copy_id: int) -> bool:
        start = time.perf_counter()
        replies = self._call(Call("wait", value=copy_id))
        failed = copy_id in self._failed or any(reply.failed for reply in replies)
        self._ended_on.pop(copy_id, None)
        self._failed.discard(copy_id)
        self.stats.stall_s += time.perf_counter() - start
        return not failed

    def measure_copy_bandwidth(self) -> float:
        return self._call(Call("measure_copy_bandwidth"))[0].number

    def close(self) -> None:
        try:
            if self.failure is None:
                self._call(Call("close"))
        except ExecutorDied:
            pass
        finally:
            self._stop(kill=self.failure is not None)

    # -- internals -------------------------------------------------------------------------------------

    def _call(self, call: Call) -> list[Reply]:
        """Send the call to every rank (encoded once); their replies in rank order."""
        if self.failure is not None:
            raise ExecutorDied(self.failure)
        message = self._encoder.encode(call)
        for calls in self._calls:
            calls.send(message, copy=False)
        return self._gather()

    def _gather(self) -> list[Reply]:
        replies: list[Reply | None] = [None] * self.size
        for _ in range(self.size):
            while not self._replies.poll(LIVENESS_POLL_MS):
                self._fail_if_a_rank_exited()
            reply = self._decoder.decode(self._replies.recv())
            if reply.error is not None:  # a peer's death shows as a failed collective: name the root cause
                time.sleep(LIVENESS_POLL_MS / 1000)
                self._fail_if_a_rank_exited()
                self._fail(f"tensor-parallel rank {reply.rank} failed: {reply.error}")
            replies[reply.rank] = reply
        return replies

    def _fail_if_a_rank_exited(self) -> None:
        for rank, process in enumerate(self.ranks):
            if process.poll() is not None and process.returncode != 1:  # 1: it reported its error and left
                self._fail(f"tensor-parallel rank {rank} exited (code {process.returncode})")
        for rank, monitor in self._remote.items():
            if monitor.poll(0):
                self._fail(f"tensor-parallel rank {rank}, on another node, disconnected")

    def _fail(self, message: str) -> None:
        log.error("%s: stopping every rank", message)
        self.failure = message
        self._stop(kill=True)
        raise ExecutorDied(message)

    def _stop(self, kill: bool) -> None:
        self._finalizer.detach()
        _stop_ranks(self.ranks, self._context, self._dir, 0 if kill else CLOSE_WAIT_S)


def _stop_ranks(ranks: list[subprocess.Popen], context: zmq.Context | None, folder: str | None, wait_s: float) -> None:
    """Every rank gone (given `wait_s` to exit, then killed), the sockets closed, the rendezvous folder removed.
    A rank whose peer died waits in a collective forever: it must be killed."""
    deadline = time.monotonic() + wait_s
    for rank in ranks:
        try:
            rank.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rank.kill()
            rank.wait()
    if context is not None and not context.closed:
        context.destroy(linger=0)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
