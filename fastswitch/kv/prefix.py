"""Prefix hashes, and the block cache of one tier (device or host) that they index.

A full block is named by a hash chain: hash(parent's hash, the block's token ids). Equal names mean
equal tokens at equal positions behind them, hence equal KV. A cryptographic hash, so one tenant
cannot forge a collision into another's cache.

`BlockCache` refcounts a pool's blocks. A block whose last user is gone is freed, unless it is full
and named: then it stays, findable by name, in an LRU list, until the pool needs the room. The names
of evicted blocks are remembered for a while (ghost entries, as ARC keeps them), so the cache can say
how often what it evicts is wanted again: what evicting one more block is likely to cost.
"""

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable

from fastswitch.kv.allocator import BlockAllocator, FreeListAllocator

GHOST_POOLS = 4  # evictions the host cache remembers, and counts over, in pools' worth: a pause on a host that churns
# lasts a few pools' worth of evictions (8B past capacity with a 4 GiB host: about three)


def block_hashes(token_ids: list[int], block_size: int, known: list[bytes]) -> list[bytes]:
    """Names of every full block of token_ids, extending the `known` names of its first blocks."""
    hashes = list(known)
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else b""
        digest = hashlib.blake2b(parent + array("q", token_ids[start : start + block_size]).tobytes(), digest_size=16)
        hashes.append(digest.digest())
    return hashes


class BlockCache:
    def __init__(self, allocator: BlockAllocator | FreeListAllocator,
                 before_evict: Callable[[int], None] = lambda block: None, ghost_pools: int = 0):
        self.allocator, self.before_evict = allocator, before_evict  # before_evict: settle a copy still reading it
        self.ghost_pools = ghost_pools  # 0: no ghost entries kept (the device: nobody asks its regret rate)
        self.refs: dict[int, int] = {}
        self.name_of: dict[int, bytes] = {}
        self.by_name: dict[bytes, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, least recent first
        self.ghosts: OrderedDict[bytes, None] = OrderedDict()  # names of the latest evicted blocks, oldest first
        self.evictions = self.regrets = 0.0  # evicted blocks, and those wanted again; halved every window
        self.version = 0  # changes whenever a name is added or evicted: lookups by name made before may differ

    @property
    def num_available(self) -> int:
        """Blocks an allocation can get: free ones, and cached ones nobody uses."""
        return self.allocator.num_free + len(self.lru)

    def allocate(self, n: int, owner: Hashable | None = None, after: int | None = None, expected: int = 0) -> list[int]:
        if self.allocator.num_free < n:
            self.evict(n - self.allocator.num_free)
        blocks = self.allocator.allocate(n, owner=owner, after=after, expected=expected)
        self.take(blocks)
        return blocks

    def take(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refs[block] = self.refs.get(block, 0) + 1
            self.lru.pop(block, None)

    def drop(self, blocks: list[int]) -> None:
        """One user fewer for each block; tail first, so a prefix outlives its continuations in the LRU."""
        unused = []
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                del self.refs[block]
                if block in self.name_of:
                    self.lru[block] = None
                else:
                    unused.append(block)
        self.allocator.free(unused[::-1])

    def name(self, block: int, name: bytes) -> None:
        """Make a block findable by name (the first block with a name keeps it)."""
        if name not in self.by_name and block not in self.name_of:
            self.by_name[name], self.name_of[block] = block, name
            self.version += 1

    def find(self, name: bytes) -> int | None:
        return self.by_name.get(name)

    def evict(self, n: int) -> None:
        for _ in range(min(n, len(self.lru))):
            block, _ = self.lru.popitem(last=False)
            self.before_evict(block)
            name = self.name_of.pop(block)
            del self.by_name[name]
            self.version += 1
            self.allocator.free([block])
            if self.ghost_pools:
                self._remember(name)

    def _remember(self, name: bytes) -> None:
        window = self.ghost_pools * self.allocator.num_blocks
        self.ghosts[name] = None
        if len(self.ghosts) > window:
            self.ghosts.popitem(last=False)
        self.evictions += 1
        if self.evictions >= window:
            self.evictions, self.regrets = self.evictions / 2, self.regrets / 2

    def missed(self, names: list[bytes]) -> None:
        """These names were wanted and not found: those evicted lately count as regretted evictions."""
        for name in names:
            if name in self.ghosts:
                del self.ghosts[name]
                self.regrets += 1

    @property
    def regret_rate(self) -> float:
        """The share of recently evicted blocks that were wanted again."""
        return self.regrets / self.evictions if self.evictions else 0.0
