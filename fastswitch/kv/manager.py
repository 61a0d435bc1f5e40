"""Which blocks each request holds, on the device and on the host, and when they move.

The scheduler decides *that* a request grows, pauses or resumes; this decides *which* blocks, plans
the copies and keeps the books. It knows nothing about torch: copies go through the SwapManager.

A request's host copy is a prefix of its KV: `host_tokens` tokens in `host_block_ids`. It stays
valid after a swap-in, so the next swap-out copies only the blocks written since (in `baseline`
mode the host copy is dropped after each swap-in, so every block is copied every time). Blocks a
copy is still reading or writing are freed only once that copy is done.
"""

import logging

from fastswitch.engine.request import Request
from fastswitch.engine.stats import EngineStats
from fastswitch.kv.allocator import BlockAllocator
from fastswitch.kv.swap import SwapHandle, SwapManager, plan_copies

log = logging.getLogger(__name__)

GROWTH_HORIZON = 256  # output tokens a request's block group is sized for, at most


class KVManager:
    def __init__(self, num_blocks: int, num_host_blocks: int, block_size: int, stats: EngineStats,
                 swapper: SwapManager | None = None):
        self.device, self.host = BlockAllocator(num_blocks), BlockAllocator(num_host_blocks)
        self.block_size, self.stats, self.swapper = block_size, stats, swapper
        self.reuse = swapper is not None and swapper.mode == "fastswitch"
        self._pending: list[tuple[SwapHandle, list[int], list[int]]] = []  # (copy, device, host blocks)

    @property
    def num_blocks(self) -> int:
        return self.device.num_blocks

    def blocks_needed(self, request: Request, n: int) -> int:
        """Device blocks `request` must add to hold n more tokens."""
        return -(-(request.num_computed_tokens + n) // self.block_size) - len(request.block_ids)

    def can_grow(self, request: Request, n: int) -> bool:
        """Whether the blocks are free, waiting for copies that are about to free some if that is enough."""
        need = self.blocks_needed(request, n)
        while not self.device.can_allocate(need) and self._pending:
            if self.device.num_free + sum(len(d) for _, d, _ in self._pending) < need:
                return False
            self.swapper.wait(self._pending[0][0])
            self.poll()
        return self.device.can_allocate(need)

    def grow(self, request: Request, n: int) -> None:
        request.block_ids += self.device.allocate(
            self.blocks_needed(request, n), owner=request.request_id,
            after=request.block_ids[-1] if request.block_ids else None, expected=self._expected_blocks(request, n))

    def ready(self, request: Request) -> bool:
        """False while the request's KV is still being copied in."""
        return request.swap is None or request.swap.done()

    def release(self, request: Request) -> None:
        """Give back every block of a finished, aborted or recomputed request."""
        self.device.drop_reserve(request.request_id)
        self.host.drop_reserve(request.request_id)
        self._free_after(request.swap, request.block_ids, request.host_block_ids)
        request.block_ids, request.host_block_ids, request.host_tokens, request.swap = [], [], 0, None

    def swap_out(self, request: Request) -> bool:
        """Start copying a request's KV to the host; False (and nothing done) if the host has no room."""
        n_blocks = len(request.block_ids)
        missing = n_blocks - len(request.host_block_ids)
        if missing > 0 and not self.host.can_allocate(missing):
            return False
        if missing > 0:
            request.host_block_ids += self.host.allocate(
                missing, owner=request.request_id, after=request.host_block_ids[-1] if request.host_block_ids else None,
                expected=self._expected_blocks(request, 0))
        if request.swap is not None:  # a swap-in still writing these device blocks must land first
            self.swapper.wait(request.swap)
        valid = n_blocks if request.host_tokens == request.num_computed_tokens else request.host_tokens // self.block_size
        self.stats.reuse_saved_blocks += valid
        handle = self.swapper.swap_out(plan_copies(request.block_ids[valid:], request.host_block_ids[valid:n_blocks]))
        self.device.drop_reserve(request.request_id)
        self._free_after(handle, request.block_ids, [])
        request.block_ids, request.host_tokens, request.swap = [], request.num_computed_tokens, handle
        return True

    def swap_in(self, request: Request) -> bool:
        """Start copying a paused request's KV back; False if its swap-out is in flight or blocks are short."""
        if not self.ready(request):
            return False
        n_blocks = -(-request.num_computed_tokens // self.block_size)
        if not self.device.can_allocate(n_blocks):
            self.poll()
            if not self.device.can_allocate(n_blocks):
                return False
        request.block_ids = self.device.allocate(n_blocks, owner=request.request_id,
                                                 expected=self._expected_blocks(request, 0))
        request.swap = self.swapper.swap_in(plan_copies(request.host_block_ids[:n_blocks], request.block_ids))
        if not self.reuse:
            self.host.drop_reserve(request.request_id)
            self._free_after(request.swap, [], request.host_block_ids)
            request.host_block_ids, request.host_tokens = [], 0
        return True

    def poll(self) -> None:
        """Free the blocks of copies that have completed."""
        still = []
        for handle, device_blocks, host_blocks in self._pending:
            if handle.done():
                self.device.free(device_blocks)
                self.host.free(host_blocks)
            else:
                still.append((handle, device_blocks, host_blocks))
        self._pending = still

    def drain(self) -> None:
        """Wait for every copy in flight and free what they held."""
        for handle, _, _ in self._pending:
            handle.wait()
        self.poll()

    def _free_after(self, handle: SwapHandle | None, device_blocks: list[int], host_blocks: list[int]) -> None:
        if handle is None or handle.done():
            self.device.free(device_blocks)
            self.host.free(host_blocks)
        else:
            self._pending.append((handle, device_blocks, host_blocks))

    def _expected_blocks(self, request: Request, n: int) -> int:
        to_come = request.num_tokens - request.num_computed_tokens - n
        to_come += min(GROWTH_HORIZON, (request.params.max_tokens or GROWTH_HORIZON) - request.num_output_tokens)
        return -(-to_come // self.block_size)
