"""Moves KV blocks between the device pool and the host pool.

Both pools share the block-major layout, so a run of contiguous blocks is one contiguous byte range
in each. Two modes:

- `fastswitch`: one copy per contiguous run (all layers, K and V at once), issued off the compute
  path: on a worker thread on CPU (torch copies release the GIL), on a dedicated CUDA stream with an
  event on GPU. The caller polls the returned handle; it waits only when it must. On CPU a swap
  smaller than INLINE_COPY_BYTES is copied inline: the hand-off would cost more than the copy.
  `asynchronous=False` (an ablation) copies every run inline, on the compute path.
- `baseline`: like vLLM V0, one copy per block, per layer, for K and for V, issued synchronously
  on the compute path.
"""

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from fastswitch.engine.stats import EngineStats

Run = tuple[int, int, int]  # (source start block, destination start block, number of blocks)
MODES = ("fastswitch", "baseline")
# On CPU, handing a copy to the worker thread costs about 0.1 ms, more than copying 4 MiB inline does.
INLINE_COPY_BYTES = 4 << 20


def plan_copies(src_blocks: list[int], dst_blocks: list[int]) -> list[Run]:
    """The fewest contiguous runs that copy src_blocks[i] to dst_blocks[i] for every i."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks for {len(dst_blocks)} destinations")
    if not src_blocks:
        return []
    n = len(src_blocks)
    if src_blocks == list(range(src_blocks[0], src_blocks[0] + n)) and dst_blocks == list(range(dst_blocks[0], dst_blocks[0] + n)):
        return [(src_blocks[0], dst_blocks[0], n)]  # one group each side: the usual case
    src, dst = np.asarray(src_blocks), np.asarray(dst_blocks)
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1  # where a run ends
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [len(src)])))
    return list(zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist()))


class SwapHandle:
    """A copy in flight; `done()` never blocks."""

    def __init__(self, future: Future | None = None, event: "torch.cuda.Event | None" = None):
        self._future, self._event = future, event

    def done(self) -> bool:
        if self._future is not None:
            return self._future.done()
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._future is not None:
            self._future.result()
        elif self._event is not None:
            self._event.synchronize()


class SwapManager:
    def __init__(self, device_pool: torch.Tensor, host_pool: torch.Tensor, mode: str, stats: EngineStats,
                 asynchronous: bool = True):
        if mode not in MODES:
            raise ValueError(f"invalid swap_mode {mode!r}; choose from {', '.join(MODES)}")
        self.device_pool, self.host_pool, self.mode, self.stats = device_pool, host_pool, mode, stats
        self.block_bytes = device_pool[0].numel() * device_pool.element_size()
        self.cuda = device_pool.is_cuda
        self.inline_bytes = math.inf if not asynchronous else 0 if self.cuda else INLINE_COPY_BYTES
        if mode == "fastswitch" and self.cuda:
            self._streams = {"out": torch.cuda.Stream(device_pool.device), "in": torch.cuda.Stream(device_pool.device)}
        elif mode == "fastswitch":
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastswitch-swap")

    def swap_out(self, runs: list[Run], writeback: bool = False) -> SwapHandle:
        """Device -> host. Runs are (device block, host block, count). `writeback`: caching a finished
        request's blocks on the host, counted apart from pausing requests."""
        self._count(runs, "writeback" if writeback else "out")
        return self._start(self.device_pool, self.host_pool, runs, "out")

    def swap_in(self, runs: list[Run]) -> SwapHandle:
        """Host -> device. Runs are (host block, device block, count)."""
        self._count(runs, "in")
        return self._start(self.host_pool, self.device_pool, runs, "in")

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

    def wait(self, handle: SwapHandle) -> None:
        """Block the compute path until the copy is done, counting the time as stall."""
        if not handle.done():
            start = time.perf_counter()
            handle.wait()
            self.stats.stall_s += time.perf_counter() - start

    def _start(self, src: torch.Tensor, dst: torch.Tensor, runs: list[Run], direction: str) -> SwapHandle:
        if not runs:
            return SwapHandle()
        inline = sum(n for _, _, n in runs) * self.block_bytes < self.inline_bytes
        if self.mode == "baseline" or inline:
            start = time.perf_counter()
            if self.mode == "baseline":
                self._copy_per_block_and_layer(src, dst, runs)
            else:
                self._copy_runs(src, dst, runs, non_blocking=False)
            self.stats.stall_s += time.perf_counter() - start
            return SwapHandle()
        if self.cuda:
            stream = self._streams[direction]
            stream.wait_stream(torch.cuda.current_stream())  # the blocks' last writes come first
            with torch.cuda.stream(stream):
                self._copy_runs(src, dst, runs, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            return SwapHandle(event=event)
        return SwapHandle(future=self._worker.submit(self._copy_runs, src, dst, runs, False))

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

    def _count(self, runs: list[Run], direction: str) -> None:
        blocks = sum(n for _, _, n in runs)
        self.stats.copies += blocks * self.device_pool.shape[1] * 2 if self.mode == "baseline" else len(runs)
        if direction == "writeback":
            self.stats.writeback_blocks += blocks
        elif direction == "out":
            self.stats.swap_out_blocks += blocks
            self.stats.swap_out_bytes += blocks * self.block_bytes
        else:
            self.stats.swap_in_blocks += blocks
            self.stats.swap_in_bytes += blocks * self.block_bytes

    def close(self) -> None:
        if hasattr(self, "_worker"):
            self._worker.shutdown(wait=True)
