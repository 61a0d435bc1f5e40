"""Which blocks each request holds, on the device and on the host, and when they move.

The scheduler decides *that* a request grows, pauses, resumes or starts; this decides *which*
blocks, plans the copies and keeps the books. It knows nothing about torch: it plans copies
(`take_copies` puts them in the next step message, for the executor to make before the forward)
and learns from each step's output which are done (`landed`). A copy the copy engine makes on the compute path, or one whose blocks are
needed in the same step, is *fenced*: complete before anything after it, so it counts as done at once.

Both tiers are BlockCaches: blocks are refcounted, and full blocks are named by their prefix hash.
- A request's host copy is a prefix of its KV: `host_tokens` tokens in `host_block_ids`. It stays
  valid after a swap-in, so the next swap-out copies only the blocks written since; a full block
  whose name is already on the host is referenced instead of copied. (`baseline` mode, and
  `reuse=False`, drop the host copy after each swap-in: every block is copied every time.)
- With prefix caching, a finished request's named blocks stay cached on the device (LRU) and are
  written back to the host (`write_back`); a new request reuses its longest cached prefix: device
  blocks directly, host blocks by swap-in, so only the rest of its prompt is prefilled.
- `write_through` copies full blocks to the host as they are computed, as host-cached named blocks
  (`prompt`: the prompt's only; `spare`: only into free host blocks, never evicting history, and only
  while no write-through copy of an earlier step is in flight, at what the link has spare): a later
  swap-out references them instead of copying, and a request recomputed after its device blocks
  were evicted finds them on the host.
A named device block is immutable, so pausing or finishing a request releases its named blocks
into the device cache at once, even while a copy to the host is still reading them: evicting such
a block first settles that copy. Blocks a copy writes, and unnamed blocks a copy reads, are
released only once that copy is done; a name is published only once the KV behind it is complete.
"""

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from fastswitch.interfaces import Clock, CopyEngine, MonotonicClock
from fastswitch.kv.allocator import BlockAllocator, FreeListAllocator
from fastswitch.kv.prefix import GHOST_POOLS, BlockCache, block_hashes
from fastswitch.messages import Copy, Run
from fastswitch.request import Request
from fastswitch.stats import EngineStats

log = logging.getLogger(__name__)
GROWTH_HORIZON = 256  # output tokens a request's block group is sized for, at most


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




class KVManager:
    def __init__(self, num_blocks: int, num_host_blocks: int, block_size: int, stats: EngineStats,
                 swapper: CopyEngine | None = None, prefix_caching: bool = False, block_groups: bool = True,
                 reuse: bool = True, clock: Clock | None = None, write_through: str = "off", write_back: bool = True):
        allocator = BlockAllocator if block_groups else FreeListAllocator
        self.device = BlockCache(allocator(num_blocks), before_evict=self._before_evict)
        self.host = BlockCache(allocator(num_host_blocks), ghost_pools=GHOST_POOLS)
        self.block_size, self.stats, self.swapper = block_size, stats, swapper
        self.reuse = reuse and swapper is not None and swapper.mode == "fastswitch"
        self.prefix_caching, self.clock = prefix_caching, clock or MonotonicClock()
        self.write_through = write_through if self.tiered else "off"
        self.write_back = write_back
        self._pending: dict[int, list[Callable[[], None]]] = {}  # copies not known done -> work to do then
        self._reading: dict[int, int] = {}  # device block -> the copy to the host still reading it
        self._owners: dict[int, Request] = {}  # copies in flight that pause or resume a request -> the request
        self._failed: set[int] = set()  # copies whose follow-up work runs now, after they failed
        self._lost: dict[str, Request] = {}  # requests whose copy failed: to be recomputed (`take_lost`)
        self._planned: list[Copy] = []  # not yet handed to the copy engine
        self._copy_ids = itertools.count()
        self._writing_through: set[int] = set()  # write-through copies in flight
        self._held_memo: dict[bytes, list[tuple[str, int]]] = {}  # `_held`'s answers while the tiers' names stay
        self._held_versions = (-1, -1)
        self.short_by = 0  # device blocks the last admit, resume or growth that did not fit lacked

    @property
    def num_blocks(self) -> int:
        return self.device.allocator.num_blocks

    def blocks_needed(self, request: Request, tokens: int) -> int:
        """Device blocks `request` must add to hold the KV of its first `tokens` tokens."""
        return -(-tokens // self.block_size) - len(request.block_ids)

    def can_grow(self, request: Request, n: int) -> bool:
        """Whether the blocks are available, settling copies that are about to release some if needed."""
        need = self.blocks_needed(request, request.num_computed_tokens + n)
        while need > self.device.num_available and self._pending:
            self._settle(next(iter(self._pending)))
        return self._fits(need)

    def _fits(self, need: int) -> bool:
        """Whether `need` device blocks are available; if not, remember how many are short (`short_by`)."""
        self.short_by = max(0, need - self.device.num_available)
        return not self.short_by

    def freed_by(self, requests: list[Request]) -> int:
        """Device blocks that pausing all these requests would give back (some only once a copy reading them
        lands): those no other request holds."""
        held = Counter(b for r in requests for b in r.block_ids)
        return sum(self.device.refs.get(b) == n for b, n in held.items())

    def grow(self, request: Request, n: int) -> None:
        self._grow_to(request, request.num_computed_tokens + n)

    def ready(self, request: Request) -> bool:
        """False while the request's KV is still being copied in, or once a copy of it failed."""
        return request.swap not in self._pending and request.request_id not in self._lost

    def resumable(self, request: Request) -> bool:
        """Whether a paused request can be resumed now: on the tiered path at once (the device still holds
        what its pause is copying to the host), otherwise once its swap-out has landed."""
        return request.request_id not in self._lost and (self.tiered or self.ready(request))

    # -- starting a request: reuse its cached prefix --------------------------------------------

    def admit(self, request: Request, budget: int) -> tuple[int, int] | None:
        """Give a waiting request its cached prefix and the blocks for its first chunk.

        Returns (tokens whose KV it reuses, tokens to compute this iteration: 0 while a host prefix is
        being copied in), or None, changing nothing, if the blocks are not there."""
        on_device, on_host = self._lookup(request)
        reused = (len(on_device) + len(on_host)) * self.block_size
        n = min(request.num_tokens - reused, budget)
        new_blocks = -(-(reused + n) // self.block_size) - len(on_device)
        if not self._fits(new_blocks + sum(b in self.device.lru for b in on_device)):
            return None
        self.device.take(on_device)
        request.block_ids = list(on_device)
        if on_host:
            copies = self.device.allocate(len(on_host), owner=request.request_id,
                                          after=on_device[-1] if on_device else None)
            request.block_ids += copies
            self.host.take(on_host)  # pinned while they are read
            request.swap = self._plan("in", plan_copies(on_host, copies), request)
            self._after(request.swap, lambda: self.host.drop(on_host))
        if not request.num_output_tokens:  # usage reports the prompt's first admission, not recomputations
            request.num_cached_tokens = min(reused, request.num_prompt_tokens)
        self.stats.prefix_device_hit_blocks += len(on_device)
        self.stats.prefix_host_hit_blocks += len(on_host)
        if request.computed_at_pause:  # resuming after a preemption by recomputation
            self.stats.resume_device_blocks += len(on_device)
            self.stats.resume_recomputed_tokens += max(request.computed_at_pause - reused, 0)
            request.computed_at_pause = 0
        return reused, self._first_chunk(request, reused, n)

    def cached_prefix_tokens(self, request: Request) -> int:
        """Tokens of a waiting request's prefix that admitting it now would reuse (device and host)."""
        on_device, on_host = self._lookup(request)
        return (len(on_device) + len(on_host)) * self.block_size

    def _lookup(self, request: Request) -> tuple[list[int], list[int]]:
        """The longest cached prefix: device blocks, then host blocks continuing it; one token is left
        to compute, so there are logits to sample from."""
        if not self.prefix_caching or request.num_computed_tokens:
            return [], []
        names = self._names(request)[: (request.num_tokens - 1) // self.block_size]
        on_device, on_host = [], []
        for name in names:
            block = self.device.find(name)
            if block is None:
                break
            on_device.append(block)
        for name in names[len(on_device) :] if self.reuse else []:
            block = self.host.find(name)
            if block is None:
                break
            on_host.append(block)
        if self.reuse:
            self.host.missed(names[len(on_device) + len(on_host) :])
        return on_device, on_host

    def commit(self, request: Request) -> None:
        """After an iteration: name the request's blocks that are now full, so others can find them (none while
        a copy is still writing its KV: a name is published only once the KV behind it is complete)."""
        if not self.prefix_caching or not self.ready(request):
            return
        full = request.num_computed_tokens // self.block_size
        names = self._names(request)
        for i in range(request.num_named_blocks, full):
            self.device.name(request.block_ids[i], names[i])
        request.num_named_blocks = max(request.num_named_blocks, full)
        end = self._write_through_end(request, full)
        if end > request.num_written_through:
            handle = self._copy_to_host(request, range(request.num_written_through, end))
            if handle is not None:
                self._writing_through.add(handle)
            request.num_written_through = end

    def _write_through_end(self, request: Request, full: int) -> int:
        """How many of the request's first blocks (`full` of them complete) write-through wants on the host now."""
        if self.write_through == "spare":  # into free host blocks (none evicts history), once the last copy is done
            if self._writing_through and self._writing_through - {copy.copy_id for copy in self._planned}:
                return request.num_written_through
            return min(full, request.num_written_through + self.host.allocator.num_free)
        if self.write_through == "prompt":
            return min(full, request.num_prompt_tokens // self.block_size)
        return full if self.write_through == "all" else 0

    # -- pausing and resuming ------------------------------------------------------------------

    @property
    def tiered(self) -> bool:
        """Whether pausing and resuming take the tiered path (full blocks named, in both tiers' caches)."""
        return self.prefix_caching and self.reuse

    def swap_out(self, request: Request) -> bool:
        """Start copying a request's KV to the host; False (and nothing done) if the host has no room."""
        if self.tiered:
            return self._pause(request)
        n_blocks = self._trim(request)
        names = self._names(request)[: request.num_named_blocks] if self.reuse else []
        valid = n_blocks if request.host_tokens == request.num_computed_tokens else request.host_tokens // self.block_size
        known = {j: self.host.find(names[j]) for j in range(max(valid, len(request.host_block_ids)), len(names))}
        known = {j: b for j, b in known.items() if b is not None}
        self.host.take(list(known.values()))  # before allocating, which could evict them
        missing = n_blocks - len(request.host_block_ids) - len(known)
        if missing > self.host.num_available:
            self.host.drop(list(known.values()))
            return False
        if not self.ready(request):  # a swap-in still writing these device blocks must land first
            self._settle(request.swap)
        copy = []  # (block index, host block) to copy
        for j in range(valid, n_blocks):
            if j < len(request.host_block_ids):
                copy.append((j, request.host_block_ids[j]))  # a stale private block: overwrite it
            elif j in known:
                request.host_block_ids.append(known[j])
            else:
                block = self.host.allocate(1, owner=request.request_id,
                                           after=request.host_block_ids[-1] if request.host_block_ids else None,
                                           expected=n_blocks - j - 1)[0]
                copy.append((j, block))
                request.host_block_ids.append(block)
        self.stats.reuse_saved_blocks += n_blocks - len(copy)
        sources = [request.block_ids[j] for j, _ in copy]
        handle = self._plan("out", plan_copies(sources, [b for _, b in copy]), request)
        self._read_by(handle, sources)
        self._time_swap(request, handle)
        self._after_success(handle, lambda: [self.host.name(b, names[j]) for j, b in copy if j < len(names)])
        self._release_device(request, handle)
        request.host_tokens, request.swap = request.num_computed_tokens, handle
        return True

    def swap_in(self, request: Request, budget: int = 0) -> tuple[int, int] | None:
        """Resume a paused request: start bringing its KV back. One whose KV is back at once (nothing to copy, or
        copies made inline) also gets the blocks for its first chunk (at most `budget` tokens), as `admit` gives
        a waiting request: on the tiered path it does not resume without them; otherwise, if they are free.

        Returns (tokens whose KV it gets back: the scheduler's new `num_computed_tokens`, less if the tiered
        path recomputes a lost tail; tokens to compute this iteration), or None, changing nothing, if it cannot
        be resumed yet (`resumable`) or device blocks are short."""
        if not self.resumable(request):
            self.short_by = 0
            return None
        if self.tiered:
            return self._resume(request, budget)
        computed = request.num_computed_tokens
        n_blocks = -(-computed // self.block_size)
        if not self._fits(n_blocks):
            return None
        request.block_ids = self.device.allocate(n_blocks, owner=request.request_id,
                                                 expected=self._expected_blocks(request, computed))
        request.swap = self._plan("in", plan_copies(request.host_block_ids[:n_blocks], request.block_ids), request)
        self._time_swap(request, request.swap)
        if not self.reuse:
            self._release_host(request, request.swap)
        return computed, self._first_chunk(request, computed, min(request.num_tokens - computed, budget))

    def _first_chunk(self, request: Request, tokens: int, n: int) -> int:
        """The blocks for a started or resumed request's first n tokens after its first `tokens`, if its KV is
        there and the blocks are free; the tokens it computes this iteration."""
        if not self.ready(request) or self.blocks_needed(request, tokens + n) > self.device.num_available:
            return 0
        self._grow_to(request, tokens + n)
        return n

    def lost_history(self, request: Request) -> bool:
        """Whether a paused request's KV has a full block that neither tier holds any more (tiered path): resuming
        it would recompute from there, as restarting it over its cached prefix does."""
        full = request.num_computed_tokens // self.block_size
        return self.tiered and len(self._held(self._names(request)[:full])) < full

    @contextmanager
    def holding(self, request: Request) -> Iterator[None]:
        """While room is made for a paused or waiting request: the host blocks of the prefix it would get back
        stay, so the pauses made to give it room (whose copies to the host evict the oldest cached blocks,
        often its own, paused longest) do not take its history."""
        computed = request.num_computed_tokens
        names = self._names(request)[: (computed or request.num_tokens - 1) // self.block_size]
        pinned = [b for where, b in self._held(names) if where == "host"] if self.tiered else []
        self.host.take(pinned)
        try:
            yield
        finally:
            self.host.drop(pinned)

    def _held(self, names: list[bytes]) -> list[tuple[str, int]]:
        """Where each block of the longest prefix of `names` that some tier holds is: ("device" | "host", block).

        A paused request's prefix is looked up several times an iteration (is it lost, what to pin, what to
        copy), so the answer is kept until either tier's names change; a name stands for its whole prefix."""
        versions = (self.device.version, self.host.version)
        if versions != self._held_versions:
            self._held_memo, self._held_versions = {}, versions
        key = names[-1] if names else b""
        if key not in self._held_memo:
            self._held_memo[key] = self._walk(names)
        return list(self._held_memo[key])

    def _walk(self, names: list[bytes]) -> list[tuple[str, int]]:
        held = []
        for name in names:
            block, where = self.device.find(name), "device"
            if block is None:
                block, where = self.host.find(name), "host"
            if block is None:
                break
            held.append((where, block))
        return held

    def pause_trade(self, request: Request) -> tuple[int, int, float]:
        """What pausing a running request by swap would do that recomputing it would not: (blocks copied, out
        and back in; tokens that recomputation would compute instead; tokens of cached history the swap's
        host blocks would evict that a later turn is likely to recompute: as many as the host's evictions
        lately turned out to be wanted again).

        Tiered, both keep its full blocks in the device cache and write-back puts them on the host, so they
        differ by the partial block (and, without write-back, the full blocks the host lacks): once the host
        has no free block left, that block displaces a cached one. Otherwise a swap copies the stale blocks
        out and every block back, and recomputation computes every token."""
        computed, block = request.num_computed_tokens, self.block_size
        if not self.tiered:
            n_blocks = -(-computed // block)
            valid = n_blocks if request.host_tokens == computed else request.host_tokens // block
            return n_blocks - valid + n_blocks, computed, 0
        partial = computed % block
        stale = sum(self.host.find(name) is None for name in self._names(request)[: computed // block])
        lost = 0 if self.write_back else stale
        extra = lost + (partial > 0)  # host blocks the swap takes that recomputation's write-back does not
        free = max(0, self.host.allocator.num_free - (stale if self.write_back else 0))
        return 2 * extra, lost * block + partial, max(0, extra - free) * block * self.host.regret_rate

    # -- the tiered path: a paused request's KV lives in the caches of both tiers -----------------

    def _pause(self, request: Request) -> bool:
        """Copy what the host lacks of a request's KV there, and release its device blocks into the cache.

        Full blocks go to the host as named, cached blocks (evictable like any history; a paused request
        pins none), the partly filled last one as the request's own; what the host has no room for is
        recomputed on resume if the device evicts it meanwhile. Always succeeds."""
        self._trim(request)
        if not self.ready(request):  # a swap-in still writing these device blocks must land first
            self._settle(request.swap)
        computed, full = request.num_computed_tokens, request.num_computed_tokens // self.block_size
        names = self._names(request)[:full]
        on_host = [b for name in names if (b := self.host.find(name)) is not None]
        self.host.take(on_host)  # before allocating, which could evict them
        stale = [j for j, name in enumerate(names) if self.host.find(name) is None]
        if computed % self.block_size:
            stale.append(full)  # the partial block
        fits = stale[: self.host.num_available]
        if len(fits) < len(stale):
            self.stats.recompute_fallbacks += 1
        self.stats.reuse_saved_blocks += len(names) - len([j for j in stale if j < full])
        host_blocks = self.host.allocate(len(fits)) if fits else []
        sources = [request.block_ids[j] for j in fits]
        handle = self._plan("out", plan_copies(sources, host_blocks), request)
        self._read_by(handle, sources)
        self._time_swap(request, handle)
        named = [(b, names[j]) for j, b in zip(fits, host_blocks) if j < full]
        partial = [b for j, b in zip(fits, host_blocks) if j == full]
        self._after_success(handle, lambda: [self.host.name(block, name) for block, name in named])
        self._after(handle, lambda: self.host.drop([b for b, _ in named]))
        self.host.drop(on_host)
        self._release_device(request, handle)
        request.host_block_ids, request.host_tokens = partial, computed if partial else 0
        request.swap = handle
        return True

    def _resume(self, request: Request, budget: int) -> tuple[int, int] | None:
        """Take back the blocks the device still caches, copy in what only the host has, and leave the rest
        (from the first block neither tier holds) to be recomputed. A pause whose copy to the host is still in
        flight does not hold the resume back: its full blocks are still cached on the device (evicting one
        settles that copy first), and its partly filled block, not yet on the host, is recomputed."""
        copying_out = request.swap in self._pending
        computed, full = request.num_computed_tokens, request.num_computed_tokens // self.block_size
        names = self._names(request)[:full]
        source = self._held(names)
        self.host.missed(names[len(source) :])
        if len(source) == full and request.host_tokens == computed and request.host_block_ids and not copying_out:
            source.append(("host", request.host_block_ids[0]))  # the partial block, the request's own
        cached = [b for where, b in source if where == "device"]
        to_copy = [j for j, (where, _) in enumerate(source) if where == "host"]
        tokens = min(computed, len(source) * self.block_size)
        n = min(request.num_tokens - tokens, budget)
        at_once = not to_copy or self.swapper.synchronous(len(to_copy))  # its KV back before this step
        chunk_blocks = max(0, -(-(tokens + n) // self.block_size) - len(source)) if at_once else 0
        if not self._fits(len(to_copy) + chunk_blocks + sum(b in self.device.lru for b in cached)):
            return None
        self.device.take(cached)
        host_sources = [source[j][1] for j in to_copy]
        self.host.take(host_sources)  # pinned while they are read
        after = source[to_copy[0] - 1][1] if to_copy and to_copy[0] else None
        fresh = self.device.allocate(len(to_copy), owner=request.request_id, after=after,
                                     expected=self._expected_blocks(request, tokens))
        blocks = dict(enumerate(b for _, b in source)) | dict(zip(to_copy, fresh))
        request.block_ids = [blocks[j] for j in range(len(source))]
        request.swap = self._plan("in", plan_copies(host_sources, fresh), request)
        self._time_swap(request, request.swap)
        renamed = [(b, names[j]) for j, b in zip(to_copy, fresh) if j < full]
        self._after_success(request.swap, lambda: [self.device.name(block, name) for block, name in renamed])
        self._after(request.swap, lambda: self.host.drop(host_sources))
        self._release_host(request, request.swap)
        request.num_named_blocks = request.num_written_through = min(len(source), full)
        self.stats.resume_device_blocks += len(cached)
        self.stats.resume_recomputed_tokens += computed - tokens
        return tokens, self._first_chunk(request, tokens, n)

    # -- finishing -----------------------------------------------------------------------------

    def release(self, request: Request) -> None:
        """Give back every block of a finished, aborted or recomputed request; keep what is worth caching."""
        self._lost.pop(request.request_id, None)
        handle = request.swap
        if self.prefix_caching and self.reuse and self.write_back and self.ready(request):
            handle = self._copy_to_host(request, range(min(request.num_named_blocks, len(request.block_ids)))) or handle
        self._release_device(request, handle)
        self._release_host(request, handle)
        request.swap, request.num_named_blocks, request.num_written_through = None, 0, 0

    def _copy_to_host(self, request: Request, indices: range) -> int | None:
        """Copy these named device blocks of the request that the host lacks to the host tier, as cached
        blocks, as far as room allows; the copy's id."""
        names = self._names(request)
        wanted = [j for j in indices if self.host.find(names[j]) is None][: self.host.num_available]
        if not wanted:
            return None
        host_blocks = self.host.allocate(len(wanted))
        sources = [request.block_ids[j] for j in wanted]
        handle = self._plan("writeback", plan_copies(sources, host_blocks))
        self._read_by(handle, sources)
        self._after_success(handle, lambda: [self.host.name(block, names[j]) for j, block in zip(wanted, host_blocks)])
        self._after(handle, lambda: self.host.drop(host_blocks))
        return handle

    def _release_device(self, request: Request, handle: int | None) -> None:
        """Named blocks go to the device cache now (only copies out can be reading them); the rest once
        `handle`, a copy that may be writing them, is done."""
        self.device.allocator.drop_reserve(request.request_id)
        blocks, request.block_ids = request.block_ids, []
        named = [b for b in blocks if b in self.device.name_of]
        self.device.drop(named)
        unnamed = [b for b in blocks if b not in self.device.name_of]
        self._after(handle, lambda: self.device.drop(unnamed))

    def _read_by(self, handle: int | None, device_blocks: list[int]) -> None:
        """Until the copy `handle` is done, evicting these blocks must wait for it."""
        if handle is None:
            return
        for block in device_blocks:
            self._reading[block] = handle

        def done():
            for block in device_blocks:
                if self._reading.get(block) == handle:
                    del self._reading[block]

        self._after(handle, done)

    def _before_evict(self, block: int) -> None:
        copy_id = self._reading.get(block)
        if copy_id is not None and copy_id in self._pending:
            self._settle(copy_id)

    def _release_host(self, request: Request, handle: int | None) -> None:
        self.host.allocator.drop_reserve(request.request_id)
        blocks, request.host_block_ids, request.host_tokens = request.host_block_ids, [], 0
        self._after(handle, lambda: self.host.drop(blocks))

    # -- copies -------------------------------------------------------------------------------

    def take_copies(self) -> list[Copy]:
        """The copies planned since the last call, in order, for the copy engine to start now."""
        copies, self._planned = self._planned, []
        return copies

    def landed(self, copy_ids: list[int], failed_ids: list[int] = ()) -> None:
        """Run the follow-up work of these copies, which the executor has seen done, or failed: then what they
        were writing is released unpublished, and the requests they paused or resumed are lost (`take_lost`)."""
        for copy_id in copy_ids:
            self._end(copy_id, ok=True)
        for copy_id in failed_ids:
            self._end(copy_id, ok=False)

    def take_lost(self) -> list[Request]:
        """Requests whose KV a failed copy left incomplete, since the last call: the scheduler recomputes them."""
        lost, self._lost = list(self._lost.values()), {}
        return lost

    def wait_for_copies(self) -> None:
        """Settle the oldest copy in flight, if any (when nothing else can make progress)."""
        if self._pending:
            self._settle(next(iter(self._pending)))

    def drain(self) -> None:
        """Settle every copy in flight and finish their follow-up work."""
        while self._pending:
            self._settle(next(iter(self._pending)))

    def _plan(self, kind: str, runs: list[Run], owner: Request | None = None) -> int | None:
        """Plan a copy (pausing or resuming `owner`); its id while it is in flight, None if it counts as done at
        once (fenced)."""
        if not runs:
            return None
        copy = Copy(next(self._copy_ids), kind, runs, self.swapper.synchronous(sum(n for _, _, n in runs)))
        self._planned.append(copy)
        if copy.fenced:
            return None
        self._pending[copy.copy_id] = []
        if owner is not None:
            self._owners[copy.copy_id] = owner
        return copy.copy_id

    def _settle(self, copy_id: int) -> None:
        """Make a copy done now: fence it if it is still only planned, else wait for it."""
        planned = next((c for c in self._planned if c.copy_id == copy_id), None)
        if planned is not None:
            planned.fenced = True
        self._end(copy_id, ok=planned is not None or self.swapper.wait(copy_id))

    def _end(self, copy_id: int, ok: bool) -> None:
        owner = self._owners.pop(copy_id, None)
        self._writing_through.discard(copy_id)
        if copy_id not in self._pending:
            return
        if not ok:
            log.error("KV copy %d failed: nothing it wrote is used; %s", copy_id,
                      f"{owner.request_id} is recomputed" if owner is not None else "it was a write-back")
            self.stats.copy_failures += 1
            self._failed.add(copy_id)
            if owner is not None:
                self._lost[owner.request_id] = owner
        for fn in self._pending.pop(copy_id):
            fn()
        self._failed.discard(copy_id)

    def _after(self, copy_id: int | None, fn: Callable[[], None]) -> None:
        if copy_id in self._pending:
            self._pending[copy_id].append(fn)
        else:
            fn()

    def _after_success(self, copy_id: int | None, fn: Callable[[], None]) -> None:
        """Publishing what the copy wrote: skipped if it failed."""
        self._after(copy_id, lambda: None if copy_id in self._failed else fn())

    def _time_swap(self, request: Request, copy_id: int | None) -> None:
        """Add the copy's duration (as observed: until the iteration that finds it done) to the request's."""
        start = self.clock.now()

        def done():
            request.metrics.swap_s += self.clock.now() - start

        self._after(copy_id, done)

    def _trim(self, request: Request) -> int:
        """Give back blocks grown for a chunk the request will not compute now; the blocks its KV fills."""
        n_blocks = -(-request.num_computed_tokens // self.block_size)
        if len(request.block_ids) > n_blocks:
            extra, request.block_ids = request.block_ids[n_blocks:], request.block_ids[:n_blocks]
            self._after(request.swap, lambda: self.device.drop(extra))
        return n_blocks

    def _names(self, request: Request) -> list[bytes]:
        if len(request.block_names) < request.num_tokens // self.block_size:
            request.block_names = block_hashes(request.token_ids, self.block_size, request.block_names)
        return request.block_names

    def _grow_to(self, request: Request, tokens: int) -> None:
        need = self.blocks_needed(request, tokens)
        if need <= 0:  # most decode steps: the last block has room
            return
        request.block_ids += self.device.allocate(
            need, owner=request.request_id,
            after=request.block_ids[-1] if request.block_ids else None, expected=self._expected_blocks(request, tokens))

    def _expected_blocks(self, request: Request, tokens: int) -> int:
        """Blocks a request holding `tokens` tokens' KV is expected to grow by."""
        to_come = request.num_tokens - tokens
        to_come += min(GROWTH_HORIZON, (request.params.max_tokens or GROWTH_HORIZON) - request.num_output_tokens)
        return -(-to_come // self.block_size)
