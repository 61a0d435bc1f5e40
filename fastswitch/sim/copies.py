"""A simulated copy engine between the device and host KV pools, with the real one's semantics
(`kv/swap.py`) and a model of the link's time.

Each direction of the link carries one copy at a time, in the order issued: a copy starts when the
link is free and takes, per copy operation, `copy_latency_s` plus its bytes at the direction's
bandwidth. `baseline` mode makes one operation per block, layer and K/V, all on the compute path;
`fastswitch` mode one per contiguous run. A copy on the compute path (baseline, `async_swap=False`,
under `inline_copy_bytes`, or fenced) stalls it: the clock moves to the copy's end, counted as
stall. Any other copy overlaps compute and is done once the clock passes its end.
"""

import math

from fastswitch.messages import Copy
from fastswitch.sim.clock import SimClock
from fastswitch.sim.profiles import Link
from fastswitch.stats import EngineStats

MODES = ("fastswitch", "baseline")


class Channel:
    """One direction of the link: copies in issue order, each after the one before."""

    def __init__(self, bytes_per_s: float, latency_s: float):
        self.bytes_per_s, self.latency_s = bytes_per_s, latency_s
        self.free_at = 0.0

    def transfer(self, now: float, operations: int, num_bytes: int) -> float:
        """Queue a copy issued at `now`; when it ends."""
        self.free_at = max(now, self.free_at) + operations * self.latency_s + num_bytes / self.bytes_per_s
        return self.free_at


class SimCopyEngine:
    def __init__(self, mode: str, block_bytes: int, num_layers: int, link: Link, stats: EngineStats, clock: SimClock,
                 asynchronous: bool = True):
        if mode not in MODES:
            raise ValueError(f"invalid swap_mode {mode!r}; choose from {', '.join(MODES)}")
        self.mode, self.block_bytes, self.num_layers, self.stats, self.clock = mode, block_bytes, num_layers, stats, clock
        self.inline_bytes = link.inline_copy_bytes if asynchronous else math.inf
        self.channels = {"out": Channel(link.d2h_bytes_per_s, link.copy_latency_s),
                         "in": Channel(link.h2d_bytes_per_s, link.copy_latency_s)}
        self._ends: dict[int, float] = {}  # asynchronous copies not yet seen done -> when they end

    @property
    def round_trip_bytes_per_s(self) -> float:
        """What `SwapManager.measure_bandwidth` would measure: bytes moved out and back in per second."""
        out, back = (1 / c.bytes_per_s for c in self.channels.values())
        return 2 / (out + back)

    def synchronous(self, num_blocks: int) -> bool:
        return self.mode == "baseline" or num_blocks * self.block_bytes < self.inline_bytes

    def start(self, copies: list[Copy]) -> None:
        for copy in copies:
            blocks = copy.num_blocks
            if not blocks:
                continue
            operations = copy.operations(self.mode, self.num_layers)
            self.stats.count_copy(copy.kind, blocks, self.block_bytes, operations)
            direction = "out" if copy.kind in ("out", "writeback") else "in"
            now = self.clock.now()
            end = self.channels[direction].transfer(now, operations, blocks * self.block_bytes)
            if copy.fenced or self.synchronous(blocks):
                self._stall_until(end)
            else:
                self._ends[copy.copy_id] = end

    def finished(self) -> tuple[list[int], list[int]]:
        """The asynchronous copies the clock has passed the end of since the last call; none fail."""
        now = self.clock.now()
        done = [copy_id for copy_id, end in self._ends.items() if end <= now]
        for copy_id in done:
            del self._ends[copy_id]
        return done, []

    def wait(self, copy_id: int) -> bool:
        end = self._ends.pop(copy_id, None)
        if end is not None:
            self._stall_until(end)
        return True

    def close(self) -> None:
        self._ends.clear()

    def _stall_until(self, end: float) -> None:
        self.stats.stall_s += max(0.0, end - self.clock.now())
        self.clock.advance_to(end)
