"""Carries out the KV manager's copy plans between the device pool and the host pool.

Both pools share the block-major layout, so a run of contiguous blocks is one contiguous byte range
in each. Two modes:

- `fastswitch`: one copy per contiguous run (all layers, K and V at once), issued off the compute
  path: on a worker thread on CPU (torch copies release the GIL), on a dedicated CUDA stream per
  direction with an event on GPU. The executor reports the copies `finished` in each step's output; the KV manager waits only when it
  must. On CPU
  a copy smaller than INLINE_COPY_BYTES is made inline: the hand-off would cost more than the copy.
  `asynchronous=False` (an ablation) copies every run inline, on the compute path.
- `baseline`: like vLLM V0, one copy per block, per layer, for K and for V, issued synchronously
  on the compute path.

A fenced copy completes before anything issued after it: inline on CPU; on CUDA the compute stream
and the other direction's stream wait for its event, so the host does not stall.
"""

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fastswitch.messages import Copy, Run
from fastswitch.stats import EngineStats

MODES = ("fastswitch", "baseline")
# On CPU, handing a copy to the worker thread costs about 0.1 ms, more than copying 4 MiB inline does.
INLINE_COPY_BYTES = 4 << 20


def inline_copy_bytes(cuda: bool, asynchronous: bool) -> float:
    """Copies smaller than this are made inline, on the compute path."""
    return math.inf if not asynchronous else 0 if cuda else INLINE_COPY_BYTES


def made_inline(mode: str, num_bytes: int, inline_bytes: float) -> bool:
    """Whether a copy of `num_bytes` is made on the compute path: every baseline copy, and small ones."""
    return mode == "baseline" or num_bytes < inline_bytes


class SwapHandle:
    """A copy in flight; `done()` never blocks. A copy that failed (the copy thread raised, a CUDA error) is
    done, and `failed` says so."""

    def __init__(self, future: Future | None = None, event: "torch.cuda.Event | None" = None):
        self._future, self._event = future, event
        self.failed = False

    def done(self) -> bool:
        if self._future is not None:
            if not self._future.done():
                return False
            self.failed = self._future.exception() is not None
            return True
        try:
            return self._event is None or self._event.query()
        except RuntimeError:  # a CUDA error, reported by the event
            self.failed = True
            return True

    def wait(self) -> None:
        try:
            if self._future is not None:
                self._future.result()
            elif self._event is not None:
                self._event.synchronize()
        except Exception:
            self.failed = True


class SwapManager:
    def __init__(self, device_pool: torch.Tensor, host_pool: torch.Tensor, mode: str, stats: EngineStats,
                 asynchronous: bool = True):
        if mode not in MODES:
            raise ValueError(f"invalid swap_mode {mode!r}; choose from {', '.join(MODES)}")
        self.device_pool, self.host_pool, self.mode, self.stats = device_pool, host_pool, mode, stats
        self.block_bytes = device_pool[0].numel() * device_pool.element_size()
        self.cuda = device_pool.is_cuda
        self.inline_bytes = inline_copy_bytes(self.cuda, asynchronous)
        self._handles: dict[int, SwapHandle] = {}  # asynchronous copies not yet seen done
        if mode == "fastswitch" and self.cuda:
            self._streams = {"out": torch.cuda.Stream(device_pool.device), "in": torch.cuda.Stream(device_pool.device)}
        elif mode == "fastswitch":
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastswitch-swap")

    def synchronous(self, num_blocks: int) -> bool:
        return made_inline(self.mode, num_blocks * self.block_bytes, self.inline_bytes)

    def start(self, copies: list[Copy]) -> None:
        for copy in copies:
            outward = copy.kind in ("out", "writeback")
            src, dst = (self.device_pool, self.host_pool) if outward else (self.host_pool, self.device_pool)
            self.stats.count_copy(copy.kind, copy.num_blocks, self.block_bytes,
                                  copy.operations(self.mode, self.device_pool.shape[1]))
            self._start(copy, src, dst, "out" if outward else "in")

    def finished(self) -> tuple[list[int], list[int]]:
        """The asynchronous copies done since the last call, and those that failed (never blocks)."""
        ended = [(copy_id, handle) for copy_id, handle in self._handles.items() if handle.done()]
        for copy_id, handle in ended:
            del self._handles[copy_id]
        return [i for i, h in ended if not h.failed], [i for i, h in ended if h.failed]

    def wait(self, copy_id: int) -> bool:
        """Block the compute path until the copy is done, counting the time as stall; False if it failed."""
        handle = self._handles.pop(copy_id, None)
        if handle is not None and not handle.done():
            start = time.perf_counter()
            handle.wait()
            self.stats.stall_s += time.perf_counter() - start
        return handle is None or not handle.failed

    def measure_bandwidth(self, max_bytes: int = 64 << 20) -> float:
        """Bytes per second of one large device -> host -> device round trip, timed at start-up."""
        n = max(1, min(self.device_pool.shape[0], self.host_pool.shape[0], max_bytes // self.block_bytes))
        if self.host_pool.shape[0] == 0:
            return 1.0  # no host tier: swapping is never the cheaper choice
        self.host_pool[:n].copy_(self.device_pool[:n])  # warm up
        start = time.perf_counter()
        self.host_pool[:n].copy_(self.device_pool[:n])
        self.device_pool[:n].copy_(self.host_pool[:n])
        if self.cuda:
            torch.cuda.synchronize(self.device_pool.device)
        return 2 * n * self.block_bytes / (time.perf_counter() - start)

    def _start(self, copy: Copy, src: torch.Tensor, dst: torch.Tensor, direction: str) -> None:
        if not copy.runs:
            return
        if copy.fenced and (not self.cuda or self.synchronous(copy.num_blocks)):
            start = time.perf_counter()
            if self.mode == "baseline":
                self._copy_per_block_and_layer(src, dst, copy.runs)
            else:
                self._copy_runs(src, dst, copy.runs, non_blocking=False)
            self.stats.stall_s += time.perf_counter() - start
        elif self.cuda:
            stream = self._streams[direction]
            stream.wait_stream(torch.cuda.current_stream())  # the blocks' last writes come first
            with torch.cuda.stream(stream):
                self._copy_runs(src, dst, copy.runs, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            if copy.fenced:
                for waiter in (torch.cuda.current_stream(), self._streams["in" if direction == "out" else "out"]):
                    waiter.wait_event(event)
            self._handles[copy.copy_id] = SwapHandle(event=event)
        else:
            future = self._worker.submit(self._copy_runs, src, dst, copy.runs, False)
            self._handles[copy.copy_id] = SwapHandle(future=future)

    def _copy_runs(self, src: torch.Tensor, dst: torch.Tensor, runs: list[Run], non_blocking: bool) -> None:
        for s, d, n in runs:
            dst[d : d + n].copy_(src[s : s + n], non_blocking=non_blocking)

    def _copy_per_block_and_layer(self, src: torch.Tensor, dst: torch.Tensor, runs: list[Run]) -> None:
        num_layers = src.shape[1]
        for s, d, n in runs:
            for i in range(n):
                for layer in range(num_layers):
                    for kv in (0, 1):
                        dst[d + i, layer, kv].copy_(src[s + i, layer, kv])
        if self.cuda:
            torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        if hasattr(self, "_worker"):
            self._worker.shutdown(wait=True)
