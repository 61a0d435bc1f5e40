"""The engine on its own thread, streaming outputs to asyncio: the HTTP layer never blocks the engine.

Commands (add, abort) go to the engine thread through a queue; each request's outputs come back on
its own asyncio queue. A request is validated on the engine thread: the first item of its stream
is either the acceptance or the ValueError that refused it, so the server can answer 400 before it
starts streaming. Closing a stream early (a client that went away) aborts the request.
"""

import asyncio
import ctypes
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastswitch.engine.engine import Engine, Prompt
from fastswitch.engine.request import RequestOutput
from fastswitch.sampling import SamplingParams

log = logging.getLogger(__name__)
ACCEPTED = object()


@dataclass
class _Add:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    priority: int
    user: str | None
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastswitch-engine", daemon=True)
        self._thread.start()

    @property
    def num_queued(self) -> int:
        """Requests accepted but not yet started (approximate: read from another thread)."""
        return len(self.engine.scheduler.waiting) + self._commands.qsize()

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str, priority: int = 0,
                       user: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; raises ValueError (before any output) if it is refused."""
        stream: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, prompt, params, priority, user, stream, asyncio.get_running_loop()))
        first = await stream.get()
        if isinstance(first, Exception):
            raise first
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, Exception):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    # -- engine thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        while not self._stopping.is_set():
            self._handle_commands(block=not self.engine.has_unfinished_requests())
            if not self.engine.has_unfinished_requests():
                if busy:  # just went idle: hand the memory a burst of requests used back to the system
                    _trim_heap()
                busy = False
                continue
            busy = True
            try:
                outputs = self.engine.step()
            except Exception as error:  # a bug, not bad input: fail every request in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                self._fail_all(error)
                continue
            for out in outputs:
                self._deliver(out.request_id, out, last=out.finished)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _handle_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.prompt, command.params, request_id=command.request_id,
                                        priority=command.priority, user=command.user)
            except ValueError as error:
                command.loop.call_soon_threadsafe(command.stream.put_nowait, error)
                return
            self._streams[command.request_id] = (command.loop, command.stream)
            command.loop.call_soon_threadsafe(command.stream.put_nowait, ACCEPTED)
        elif command[0] == "abort":
            self.engine.abort(command[1])
            self._streams.pop(command[1], None)

    def _deliver(self, request_id: str, item, last: bool) -> None:
        target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            self._deliver(request_id, error, last=True)


def _trim_heap() -> None:
    """glibc keeps freed heap memory for reuse; after a burst of requests that can be hundreds of MB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
