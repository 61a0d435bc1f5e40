"""The engine core in a process of its own, behind `fastswitch serve`: ZMQ in, ZMQ out, msgspec on the wire.

While there is work it steps without pause, taking whatever input has arrived between two steps;
idle, it sleeps on its input socket. It never outlives the API server: the kernel kills it when its
parent dies (PR_SET_PDEATHSIG), and it checks its parent whenever idle. SIGINT and SIGTERM are the
API server's to act on (a Ctrl-C reaches the whole process group): the server lets requests in
flight finish, then sends Shutdown.
"""

import ctypes
import logging
import os
import signal

import msgspec
import zmq

from fastswitch.config import EngineConfig
from fastswitch.engine.core import EngineCore
from fastswitch.interfaces import ExecutorDied
from fastswitch.lifetime import die_with_parent
from fastswitch.messages import Abort, AddRequest, CoreOutputs, Failed, Ready, Shutdown, ToCore
from fastswitch.model.config import ModelError

log = logging.getLogger("fastswitch.core")
SNAPSHOT_INTERVAL_S = 0.25  # while busy, /metrics is at most this stale; a step that changes who runs publishes at once
IDLE_POLL_MS = 1000


def run_engine_core(config: EngineConfig, input_address: str, output_address: str, parent_pid: int,
                    log_level: str) -> None:
    """The process's entry point: build the core, say Ready (or Failed), then serve until Shutdown."""
    die_with_parent(parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    context = zmq.Context()
    inputs, outputs = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inputs.rcvhwm = outputs.sndhwm = 0  # no message limit: a slow reader never stalls the steps
    inputs.connect(input_address)
    outputs.connect(output_address)
    encoder = msgspec.msgpack.Encoder()
    try:
        try:
            core = EngineCore.from_config(config)
        except Exception as error:  # bad options or model files: the server reports it and exits
            if not isinstance(error, (ValueError, ModelError, MemoryError)):
                log.exception("the engine core could not start")
            outputs.send(encoder.encode(Failed(str(error) or type(error).__name__)))
            return
        outputs.send(encoder.encode(Ready(core.limits, core.description)))
        try:
            CoreLoop(core, inputs, outputs, parent_pid).run()
        finally:
            core.close()
    finally:
        inputs.close(linger=0)
        outputs.close(linger=5000)  # what is sent gets delivered, if the server is still there
        context.term()


class CoreLoop:
    def __init__(self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket, parent_pid: int):
        self.core, self.inputs, self.outputs, self.parent_pid = core, inputs, outputs, parent_pid
        self.encoder, self.decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToCore)
        self.last_snapshot, self.last_counts = 0.0, (0, 0, 0)

    def run(self) -> None:
        busy = False
        while True:
            if not self.core.has_unfinished_requests():
                if busy:  # just went idle: settle the copies, give memory back, publish the final state
                    self.core.kv.drain()
                    _trim_heap()
                    self._send(CoreOutputs(self.core.clock.now(), [], self.core.snapshot()))
                    busy, self.last_counts = False, (0, 0, 0)
                if not self.inputs.poll(IDLE_POLL_MS):
                    if os.getppid() != self.parent_pid:
                        log.error("the API server is gone: exiting")
                        return
                    continue
            if not self._take_input():
                return
            if self.core.has_unfinished_requests():
                busy = True
                self._step()

    def _take_input(self) -> bool:
        """Handle every message that has arrived; False on Shutdown."""
        while True:
            try:
                message = self.decoder.decode(self.inputs.recv(zmq.NOBLOCK))
            except zmq.Again:
                return True
            if isinstance(message, AddRequest):
                self.core.add_request(message)
            elif isinstance(message, Abort):
                self.core.abort(message.request_ids)
            elif isinstance(message, Shutdown):
                return False

    def _step(self) -> None:
        try:
            step = self.core.step()
        except ExecutorDied:  # a tensor-parallel rank is gone: nothing can run; the server sees this process exit
            raise
        except Exception as error:  # a bug, not bad input: fail the requests in flight, keep serving
            log.exception("engine step failed; aborting the requests in flight")
            failed = list(self.core.scheduler.requests)
            self.core.abort(failed)
            self._send(Failed(f"engine step failed: {error}", failed))
            return
        scheduler = self.core.scheduler
        counts = len(scheduler.running), len(scheduler.waiting), len(scheduler.swapped)
        finished = any(o.finish_reason is not None for o in step.outputs)
        if finished or counts != self.last_counts or step.timestamp - self.last_snapshot >= SNAPSHOT_INTERVAL_S:
            step.snapshot, self.last_counts = self.core.snapshot(), counts
        if step.outputs or step.snapshot is not None:
            self._send(step)

    def _send(self, message) -> None:
        if isinstance(message, CoreOutputs) and message.snapshot is not None:
            self.last_snapshot = message.timestamp
        self.outputs.send(self.encoder.encode(message))


def _trim_heap() -> None:
    """glibc keeps freed heap memory for reuse; after a burst of requests that can be hundreds of MB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
