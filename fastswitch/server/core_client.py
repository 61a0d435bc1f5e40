"""The API server's side of the engine core: starts the core's process, sends it requests, and streams
its outputs back to asyncio.

Tokenizing, validation, detokenizing and stop strings happen here (`engine/inputs.py`,
`engine/outputs.py`), so the core spends its time on steps. A reader thread receives the core's
messages and hands them to the event loop; each request's outputs go to its own asyncio queue. A
stop string found here, or a stream closed early (a client that went away), aborts the request in
the core. If the core's process dies, every stream in flight ends with `EngineDeadError` at once.
"""

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable

import msgspec
import zmq

from fastswitch.config import EngineConfig
from fastswitch.engine.core_process import run_engine_core
from fastswitch.engine.inputs import InputProcessor, Prompt
from fastswitch.engine.outputs import OutputProcessor, RequestOutput
from fastswitch.messages import Abort, CoreOutputs, Failed, FromCore, Ready, Shutdown, Snapshot
from fastswitch.model.demo import default_model_path
from fastswitch.model.tokenizer import Tokenizer
from fastswitch.sampling import SamplingParams

log = logging.getLogger(__name__)
SHUTDOWN_WAIT_S = 10.0


class EngineDeadError(RuntimeError):
    """The engine core's process is gone."""


class EngineCoreClient:
    def __init__(self, config: EngineConfig, log_level: str = "warning"):
        self.config = config
        self.tokenizer = Tokenizer(config.model or default_model_path())  # a bad model folder fails here, at once
        self._dir = tempfile.mkdtemp(prefix="fastswitch-")
        addresses = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._context = zmq.Context()
        self._input, self._output = self._context.socket(zmq.PUSH), self._context.socket(zmq.PULL)
        self._input.sndhwm = self._output.rcvhwm = 0  # no message limit: a burst of requests never blocks
        self._input.bind(addresses[0])
        self._output.bind(addresses[1])
        self._encoder, self._decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FromCore)
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(config, *addresses, os.getpid(), log_level), name="fastswitch-core",
            daemon=True)
        self.process.start()
        self._closing, self.dead = False, False
        try:
            ready = self._wait_until_ready()
        except BaseException:
            self.shutdown()
            raise
        self.limits = ready.limits
        self.inputs = InputProcessor(self.tokenizer, self.limits)
        self.outputs = OutputProcessor(self.tokenizer)
        self.snapshot: Snapshot | None = None
        self._streams: dict[str, asyncio.Queue] = {}

    def start(self, loop: asyncio.AbstractEventLoop, on_death: Callable[[], None]) -> None:
        """Begin receiving outputs on `loop`; `on_death` runs there if the core's process dies."""
        self._loop, self._on_death = loop, on_death
        threading.Thread(target=self._read, name="fastswitch-core-reader", daemon=True).start()

    @property
    def num_queued(self) -> int:
        """Requests accepted that have no token yet."""
        return sum(not state.token_ids for state in self.outputs.states.values())

    @property
    def num_in_flight(self) -> int:
        """Requests accepted that have not finished."""
        return len(self.outputs.states)

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str, priority: int = 0,
                       user: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; raises ValueError (before any output) if it is refused."""
        if self.dead:
            raise EngineDeadError("the engine core is not running")
        add, text = self.inputs.process(prompt, params, request_id, time.monotonic(), priority, user)
        stream: asyncio.Queue = asyncio.Queue()
        self.outputs.add(add, text)
        self._streams[request_id] = stream
        self._send(add)
        finished, held = False, None
        try:
            while not finished:
                out, held = held or await stream.get(), None
                while isinstance(out, RequestOutput) and not out.finished and not stream.empty():
                    later = stream.get_nowait()  # a consumer that fell behind catches up in one output
                    if isinstance(later, Exception):
                        held = later
                        break
                    out = _merged(out, later)
                if isinstance(out, Exception):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        if request_id in self.outputs.states:
            self.outputs.abort(request_id)
            self._send(Abort([request_id]))

    def shutdown(self) -> None:
        """Stop the core (after the server has let requests in flight finish) and clean up."""
        self._closing = True
        if self.process.is_alive():
            self._send(Shutdown())
            self.process.join(SHUTDOWN_WAIT_S)
        if self.process.is_alive():
            log.warning("the engine core did not stop within %.0f s: killing it", SHUTDOWN_WAIT_S)
            self.process.kill()
            self.process.join()
        self._context.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- internals -----------------------------------------------------------------------------------

    def _wait_until_ready(self) -> Ready:
        """Block until the core has loaded the model; a core that failed raises ValueError with its reason."""
        poller = zmq.Poller()
        poller.register(self._output, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._output in events:
                message = self._decoder.decode(self._output.recv())
                if isinstance(message, Failed):
                    raise ValueError(message.message)
                log.info("engine core ready (pid %d): %s", self.process.pid, message.description)
                return message
            self.process.join(1)
            raise RuntimeError(f"the engine core exited while starting (exit code {self.process.exitcode})")

    def _send(self, message) -> None:
        if not self.dead and not self._context.closed:
            try:
                self._input.send(self._encoder.encode(message), zmq.NOBLOCK)
            except zmq.Again:  # the core is gone: the reader thread is about to say so
                pass

    def _read(self) -> None:
        """Reader thread: every message from the core goes to the event loop, in order; then the core's end."""
        poller = zmq.Poller()
        poller.register(self._output, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        while not self._closing:
            events = dict(poller.poll(500))
            if self._output in events:
                while True:
                    try:
                        message = self._decoder.decode(self._output.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    self._loop.call_soon_threadsafe(self._dispatch, message)
            elif self.process.sentinel in events:
                self.process.join(1)
                if not self._closing:
                    self._loop.call_soon_threadsafe(self._core_died, self.process.exitcode)
                return

    def _dispatch(self, message: CoreOutputs | Failed) -> None:
        if isinstance(message, Failed):
            for request_id in message.request_ids or []:
                self.outputs.abort(request_id)
                self._deliver(request_id, RuntimeError(message.message))
            return
        if message.snapshot is not None:
            self.snapshot = message.snapshot
        stopped = []
        for delta in message.outputs:  # one at a time: a surprise in one request's text fails that request only
            try:
                outputs, stop = self.outputs.process(CoreOutputs(message.timestamp, [delta]))
            except Exception as error:
                log.exception("request %s: its output could not be processed", delta.request_id)
                self.outputs.abort(delta.request_id)
                self._deliver(delta.request_id, error)
                stop = [delta.request_id]
            else:
                for out in outputs:
                    self._deliver(out.request_id, out)
            stopped += stop
        if stopped:
            self._send(Abort(stopped))

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _core_died(self, exitcode: int | None) -> None:
        self.dead = True
        log.error("the engine core died (exit code %s): failing %d requests in flight", exitcode, len(self._streams))
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDeadError(f"the engine core died (exit code {exitcode})"))
        self._on_death()


def _merged(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    return dataclasses.replace(later, new_text=earlier.new_text + later.new_text,
                               new_token_ids=earlier.new_token_ids + later.new_token_ids)
