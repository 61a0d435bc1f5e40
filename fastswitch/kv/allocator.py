"""Block-group allocator: hands out KV blocks in physically contiguous runs, buddy style.

Free memory is kept as aligned power-of-two chunks, split on allocation and coalesced with their
buddy on free. A request grows by taking the blocks right after its last one when they are free;
else it takes a new group sized to its expected growth, keeping the unused tail as its reserve; when
no chunk is that large it falls back to smaller ones, down to single blocks. Reserves are
reclaimed before anyone is refused a block, so no memory is wasted that a plain free list would not
waste. The attention kernel still sees ordinary block ids; contiguity only makes copies larger.
"""

from collections.abc import Hashable

import numpy as np


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.max_order = max(num_blocks.bit_length() - 1, 0)
        self._free: list[set[int]] = [set() for _ in range(self.max_order + 1)]  # chunk starts, per order
        self._order_of: dict[int, int] = {}  # free chunk start -> order
        self._num_free_chunked = 0
        self._reserve: dict[Hashable, list[int]] = {}  # owner -> its unused tail, contiguous after its last block
        self._num_reserved = 0
        self.free(list(range(num_blocks)))

    @property
    def num_free(self) -> int:
        """Blocks that an allocation can get, reserves of other requests included."""
        return self._num_free_chunked + self._num_reserved

    def largest_free_group(self) -> int:
        return max((1 << k for k in range(self.max_order + 1) if self._free[k]), default=0)

    def allocate(self, n: int, owner: Hashable | None = None, after: int | None = None, expected: int = 0) -> list[int]:
        """n blocks for `owner`, whose last block is `after`; `expected` more are likely needed soon."""
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        reserve = self._take_reserve(owner)
        taken, rest = reserve[:n], reserve[n:]
        if rest:
            self._set_reserve(owner, rest)
        last = taken[-1] if taken else after
        while len(taken) < n and last is not None and self._take_block(last + 1):
            last += 1
            taken.append(last)
        if len(taken) < n:
            taken += self._new_group(n - len(taken), owner, expected)
        return taken

    def free(self, block_ids: list[int]) -> None:
        """Free blocks; each contiguous run goes back as a few aligned chunks, not block by block."""
        for start, length in contiguous_runs(block_ids):
            end = start + length
            while start < end:  # the largest aligned chunk at `start` that fits in the run
                order = min((start & -start).bit_length() - 1 if start else self.max_order,
                            (end - start).bit_length() - 1)
                self._push(start, order)
                start += 1 << order

    def drop_reserve(self, owner: Hashable) -> None:
        self.free(self._take_reserve(owner))

    def chunks(self) -> list[tuple[int, int]]:
        """Free chunks as (start, order), for inspection and tests."""
        return sorted(self._order_of.items())

    def reserved(self) -> dict[Hashable, list[int]]:
        return dict(self._reserve)

    # -- groups -------------------------------------------------------------------------------------

    def _new_group(self, m: int, owner: Hashable | None, expected: int) -> list[int]:
        if self._num_free_chunked < m:
            self._reclaim(m - self._num_free_chunked, keep=owner)
        for want in ((m + expected) if owner is not None else m, m):
            order = _ceil_log2(want)
            if order <= self.max_order and any(self._free[k] for k in range(order, self.max_order + 1)):
                start = self._pop(order)
                blocks = list(range(start, start + (1 << order)))
                if owner is not None and len(blocks) > m:
                    self._set_reserve(owner, blocks[m:])
                else:
                    self.free(blocks[m:])
                return blocks[:m]
        taken = []  # under pressure: the largest chunks left, then smaller ones
        while len(taken) < m:
            order = max(k for k in range(self.max_order + 1) if self._free[k])
            start = self._pop(order)
            size = min(1 << order, m - len(taken))
            taken += range(start, start + size)
            self.free(list(range(start + size, start + (1 << order))))
        return taken

    def _take_reserve(self, owner: Hashable | None) -> list[int]:
        reserve = self._reserve.pop(owner, []) if owner is not None else []
        self._num_reserved -= len(reserve)
        return reserve

    def _set_reserve(self, owner: Hashable, blocks: list[int]) -> None:
        self._reserve[owner] = blocks
        self._num_reserved += len(blocks)

    def _reclaim(self, n: int, keep: Hashable | None) -> None:
        for owner in [o for o in self._reserve if o != keep]:
            if n <= 0:
                return
            n -= len(self._reserve[owner])
            self.drop_reserve(owner)

    # -- buddy chunks ------------------------------------------------------------------------------

    def _add(self, start: int, order: int) -> None:
        self._free[order].add(start)
        self._order_of[start] = order
        self._num_free_chunked += 1 << order

    def _remove(self, start: int, order: int) -> None:
        self._free[order].remove(start)
        del self._order_of[start]
        self._num_free_chunked -= 1 << order

    def _push(self, start: int, order: int) -> None:
        """Free a chunk, merging it with its buddy as long as the buddy is free and whole."""
        while order < self.max_order:
            buddy = start ^ (1 << order)
            if self._order_of.get(buddy) != order:
                break
            self._remove(buddy, order)
            start, order = min(start, buddy), order + 1
        self._add(start, order)

    def _pop(self, order: int) -> int:
        """Take a free chunk of exactly `order`, splitting the smallest larger one if needed."""
        k = next(k for k in range(order, self.max_order + 1) if self._free[k])
        start = min(self._free[k])  # lowest address: keeps the top of the pool in large chunks
        self._remove(start, k)
        while k > order:
            k -= 1
            self._add(start + (1 << k), k)
        return start

    def _take_block(self, block: int) -> bool:
        """Take one specific block if it is free, splitting the chunk that holds it."""
        if block >= self.num_blocks:
            return False
        for k in range(self.max_order + 1):
            start = block & ~((1 << k) - 1)
            if self._order_of.get(start) == k:
                break
        else:
            return False
        self._remove(start, k)
        while k > 0:  # keep the half without `block` free, descend into the other
            k -= 1
            half = 1 << k
            if block >= start + half:
                self._add(start, k)
                start += half
            else:
                self._add(start + half, k)
        return True


class FreeListAllocator:
    """vLLM V0's allocator, for the ablation without block groups: single blocks off a free list, the
    last freed first, so a request's blocks scatter as the pool churns and every copy is per block."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def largest_free_group(self) -> int:
        return max((n for _, n in contiguous_runs(sorted(self._free))), default=0)

    def allocate(self, n: int, owner: Hashable | None = None, after: int | None = None, expected: int = 0) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free += block_ids

    def drop_reserve(self, owner: Hashable) -> None:
        """No reserves here."""


def _ceil_log2(n: int) -> int:
    return max(n - 1, 0).bit_length()


def contiguous_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive ids, in order."""
    if not block_ids:
        return []
    if block_ids[-1] - block_ids[0] == len(block_ids) - 1 and block_ids == list(range(block_ids[0], block_ids[-1] + 1)):
        return [(block_ids[0], len(block_ids))]
    ids = np.asarray(block_ids)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(ids) != 1) + 1))
    lengths = np.diff(np.concatenate((starts, [len(ids)])))
    return list(zip(ids[starts].tolist(), lengths.tolist()))


def runs(block_ids: list[int]) -> int:
    """Number of contiguous runs (groups) in a list of block ids."""
    return len(contiguous_runs(block_ids))
