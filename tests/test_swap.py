"""Swapping KV between device and host: copy plans, bookkeeping, and bytes that survive round trips."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastswitch.kv.allocator import BlockAllocator
from fastswitch.kv.layout import KVPool
from fastswitch.kv.manager import KVManager, plan_copies
from fastswitch.kv.swap import SwapHandle, SwapManager
from fastswitch.request import Request, Status
from fastswitch.sampling import SamplingParams
from fastswitch.stats import EngineStats
from tests.model_free import evict_history_wanted_again

BLOCK, LAYERS = 4, 2
CPU = torch.device("cpu")


def test_plan_copies_coalesces_runs_contiguous_on_both_sides():
    assert plan_copies([4, 5, 6, 9, 10], [0, 1, 2, 3, 4]) == [(4, 0, 3), (9, 3, 2)]
    assert plan_copies([1, 2, 3], [7, 9, 10]) == [(1, 7, 1), (2, 9, 2)]
    assert plan_copies([], []) == []
    with pytest.raises(ValueError):
        plan_copies([1, 2], [3])


def make_kv(mode: str, num_blocks: int, num_host_blocks: int, prefix_caching: bool = False, block_groups: bool = True,
            reuse: bool = True, asynchronous: bool = True, write_through: str = "off") -> KVManager:
    device = KVPool(num_blocks, LAYERS, BLOCK, 1, 2, torch.float32, CPU)
    host = KVPool(num_host_blocks, LAYERS, BLOCK, 1, 2, torch.float32, CPU, host_for=CPU)
    stats = EngineStats()
    swapper = SwapManager(device.data, host.data, mode, stats, asynchronous)
    if asynchronous:
        swapper.inline_bytes = 0  # these pools are tiny: exercise the asynchronous path
    return KVManager(num_blocks, num_host_blocks, BLOCK, stats, swapper, prefix_caching, block_groups, reuse,
                     write_through=write_through)


def kv_of(token: int) -> torch.Tensor:
    """The K/V every layer holds for a token: a function of the token, so equal prefixes mean equal KV."""
    return torch.arange(LAYERS * 2 * 2, dtype=torch.float32).view(LAYERS, 2, 1, 2) + 100.0 * token


def compute(kv: KVManager, request: Request, n: int) -> None:
    """What the model does for n more tokens of `request`: write their K/V, then publish full blocks."""
    pool = kv.swapper.device_pool
    for p in range(request.num_computed_tokens, request.num_computed_tokens + n):
        pool[request.block_ids[p // BLOCK], :, :, p % BLOCK] = kv_of(request.token_ids[p])
    request.num_computed_tokens += n
    kv.commit(request)


def flush(kv: KVManager) -> None:
    """What the engine does with a step's plan before the forward: start the planned copies."""
    kv.swapper.start(kv.take_copies())


def settle(kv: KVManager, request: Request) -> None:
    """Wait for the request's copy in flight, and let the KV manager see it done."""
    flush(kv)
    waited = {} if request.swap is None else {request.swap: kv.swapper.wait(request.swap)}
    done, failed = kv.swapper.finished()
    kv.landed([c for c, ok in waited.items() if ok] + done, [c for c, ok in waited.items() if not ok] + failed)


def read(kv: KVManager, request: Request) -> torch.Tensor:
    pool = kv.swapper.device_pool
    tokens = [pool[request.block_ids[p // BLOCK], :, :, p % BLOCK] for p in range(request.num_computed_tokens)]
    return torch.stack(tokens) if tokens else torch.empty(0, LAYERS, 2, 1, 2)


def new_life(request_id: str, conversation: int) -> Request:
    """A request whose 64 tokens are conversation `conversation`'s: lives of the same one share prefixes."""
    return Request(request_id, [1000 * conversation + t for t in range(64)], SamplingParams(max_tokens=8), 0.0)


ops = st.lists(st.tuples(st.sampled_from(["admit"] * 3 + ["write"] * 4 + ["out"] * 3 + ["in"] * 3 +
                                         ["free"] * 2 + ["evict"] * 2 + ["check"]),
                         st.integers(0, 3), st.integers(1, 12)), min_size=10, max_size=80)


def run_ops(kv: KVManager, ops, recover_lost: bool = False) -> list[Request]:
    """Apply random ops to 4 requests, checking after each that every running request reads back exactly its
    KV and that block refcounts agree with the holders. `recover_lost`: requests a failed copy left
    incomplete are dropped and recomputed from scratch, as the scheduler does."""
    requests = [new_life(f"r{i}", i % 2) for i in range(4)]
    for op, i, n in ops:
        r = requests[i]
        if op == "admit" and r.status == Status.WAITING:
            got = kv.admit(r, n)
            if got is not None:
                r.status, r.num_computed_tokens = Status.RUNNING, got[0]
                compute(kv, r, got[1])
        elif op == "write" and r.status == Status.RUNNING and r.num_computed_tokens + n <= r.num_tokens:
            settle(kv, r)
            if kv.ready(r) and kv.can_grow(r, n):
                kv.grow(r, n)
                compute(kv, r, n)
        elif op == "out" and r.status == Status.RUNNING and r.num_computed_tokens and kv.ready(r):
            if kv.swap_out(r):
                r.status = Status.SWAPPED
            else:  # host full: the request would be recomputed
                kv.release(r)
                requests[i] = new_life(r.request_id, n % 3)
        elif op == "in" and r.status == Status.SWAPPED:
            if n % 3:  # else resumed while its pause may still be copying it out (the tiered path allows it)
                settle(kv, r)
            copied, taken = kv.stats.swap_in_blocks, kv.stats.resume_device_blocks
            resumed = kv.swap_in(r, n if n % 2 else 0)  # with or without its first chunk
            if resumed is not None:
                (r.num_computed_tokens, chunk), r.status = resumed, Status.RUNNING
                flush(kv)  # a resume copies exactly the blocks the device no longer caches
                back = -(-r.num_computed_tokens // BLOCK)
                assert kv.stats.swap_in_blocks - copied == back - (kv.stats.resume_device_blocks - taken)
                assert len(r.block_ids) == (-(-(r.num_computed_tokens + chunk) // BLOCK) if chunk else back)
                compute(kv, r, chunk)
        elif op == "free":
            kv.release(r)
            requests[i] = new_life(r.request_id, n % 3)
        elif op == "evict":
            (kv.device if i % 2 else kv.host).evict(n)
        elif op == "check":
            settle(kv, r)
        flush(kv)
        for lost in kv.take_lost() if recover_lost else []:
            lost.num_named_blocks = 0
            kv.release(lost)
            lost.status, lost.num_computed_tokens = Status.WAITING, 0
        for req in requests:
            if req.status == Status.RUNNING and kv.ready(req):
                expected = torch.stack([kv_of(t) for t in req.token_ids[: req.num_computed_tokens]]) \
                    if req.num_computed_tokens else torch.empty(0, LAYERS, 2, 1, 2)
                assert torch.equal(read(kv, req), expected), f"{req.request_id}'s KV changed"
        held = [b for req in requests for b in req.block_ids]
        assert set(held) == set(kv.device.refs) or kv._pending, "device refcounts disagree with the holders"
        assert not set(held) & set(kv.device.lru), "a block in use is evictable"
    return requests


def check_nothing_leaks(kv: KVManager, requests: list[Request], num_blocks: int, num_host_blocks: int) -> None:
    for r in requests:
        kv.release(r)
    flush(kv)
    kv.drain()
    assert not kv.device.refs and not kv.host.refs
    assert kv.device.num_available == num_blocks and kv.host.num_available == num_host_blocks
    kv.device.evict(num_blocks)
    kv.host.evict(num_host_blocks)
    if isinstance(kv.device.allocator, BlockAllocator):
        assert kv.device.allocator.chunks() == BlockAllocator(num_blocks).chunks(), "the device pool did not coalesce"
    assert sorted(kv.device.allocator.allocate(num_blocks)) == list(range(num_blocks)), "a block was lost or doubled"


@settings(max_examples=300, deadline=None)
@given(mode=st.sampled_from(["fastswitch", "baseline"]), prefix_caching=st.booleans(), num_blocks=st.integers(4, 24),
       num_host_blocks=st.integers(0, 40), switches=st.tuples(st.booleans(), st.booleans(), st.booleans()),
       write_through=st.sampled_from(["off", "prompt", "all", "spare"]), ops=ops)
def test_round_trips_keep_every_byte_and_leak_nothing(mode, prefix_caching, num_blocks, num_host_blocks, switches,
                                                     write_through, ops):
    """Also with each mechanism switched off (block groups, reuse, asynchronous copies), as the ablations run,
    and with every write-through policy."""
    kv = make_kv(mode, num_blocks, num_host_blocks, prefix_caching, *switches, write_through=write_through)
    check_nothing_leaks(kv, run_ops(kv, ops), num_blocks, num_host_blocks)


class FlakyCopies(SwapManager):
    """About a third of the asynchronous copies (chosen by id and seed) fail on the copy thread, after writing
    garbage over part of what they were to write."""

    def __init__(self, *args, seed: int):
        super().__init__(*args)
        self.seed, self.failures = seed, 0

    def _start(self, copy, src, dst, direction):
        if copy.fenced or random.Random(self.seed * 1_000_003 + copy.copy_id).random() >= 0.3:
            return super()._start(copy, src, dst, direction)
        self.failures += 1
        self._handles[copy.copy_id] = SwapHandle(future=self._worker.submit(self._fail, src, dst, copy.runs))

    @staticmethod
    def _fail(src, dst, runs):
        s, d, _ = runs[0]
        dst[d].copy_(src[s] * -1)
        raise RuntimeError("injected copy failure")


@settings(max_examples=200, deadline=None)
@given(prefix_caching=st.booleans(), num_blocks=st.integers(4, 24), num_host_blocks=st.integers(0, 40),
       seed=st.integers(0, 10**6), ops=ops)
def test_failed_copies_are_never_read_and_their_requests_recomputed(prefix_caching, num_blocks, num_host_blocks,
                                                                    seed, ops):
    """A failed swap-out, swap-in or write-back publishes nothing it wrote; its request is recomputed."""
    kv = make_kv("fastswitch", num_blocks, num_host_blocks, prefix_caching)
    device, host = kv.swapper.device_pool, kv.swapper.host_pool
    kv.swapper = FlakyCopies(device, host, "fastswitch", kv.stats, seed=seed)
    kv.swapper.inline_bytes = 0
    check_nothing_leaks(kv, run_ops(kv, ops, recover_lost=True), num_blocks, num_host_blocks)
    assert kv.stats.copy_failures == kv.swapper.failures


def test_second_swap_out_copies_only_the_blocks_written_since():
    kv = make_kv("fastswitch", 16, 16)
    r = Request("r", [1] * 40, SamplingParams(max_tokens=8), 0.0)
    kv.grow(r, 22)
    compute(kv, r, 22)  # 6 blocks, the last one partly filled
    assert kv.swap_out(r)
    flush(kv)
    assert kv.stats.swap_out_blocks == 6 and kv.stats.reuse_saved_blocks == 0
    settle(kv, r)
    assert kv.swap_in(r) is not None
    settle(kv, r)
    assert kv.swap_out(r)  # nothing written since: nothing to copy
    assert kv.stats.swap_out_blocks == 6 and kv.stats.reuse_saved_blocks == 6
    settle(kv, r)
    kv.swap_in(r)
    settle(kv, r)
    kv.grow(r, 6)
    compute(kv, r, 6)  # tokens 22..27: the partial block 5 and a new block 6
    assert kv.swap_out(r)
    flush(kv)
    assert kv.stats.swap_out_blocks == 6 + 2 and kv.stats.reuse_saved_blocks == 6 + 5


def test_baseline_copies_every_block_every_time_one_block_and_layer_at_a_time():
    kv = make_kv("baseline", 16, 16)
    r = Request("r", [1] * 40, SamplingParams(max_tokens=8), 0.0)
    kv.grow(r, 16)
    compute(kv, r, 16)
    for _ in range(2):
        assert kv.swap_out(r) and kv.swap_in(r) is not None
    flush(kv)
    assert kv.stats.swap_out_blocks == 8 and kv.stats.reuse_saved_blocks == 0
    assert kv.stats.copies == 4 * 4 * LAYERS * 2  # 4 swaps of 4 blocks, per layer, K and V
    fast = make_kv("fastswitch", 16, 16)
    r = Request("r", [1] * 40, SamplingParams(max_tokens=8), 0.0)
    fast.grow(r, 16)
    compute(fast, r, 16)
    assert fast.swap_out(r)
    flush(fast)
    assert fast.stats.copies == 1  # one contiguous group: one copy


def test_freed_device_blocks_wait_for_their_copy():
    kv = make_kv("fastswitch", 8, 8)
    r = Request("r", [1] * 40, SamplingParams(max_tokens=8), 0.0)
    kv.grow(r, 32)
    compute(kv, r, 32)
    gate = kv.swapper._worker.submit(lambda: __import__("time").sleep(0.2))  # keep the copy queued
    assert kv.swap_out(r)
    flush(kv)
    assert not kv.ready(r)
    assert kv.device.num_available == 0  # still being read by the copy
    other = Request("o", [1] * 40, SamplingParams(max_tokens=8), 0.0)
    assert kv.can_grow(other, 8)  # waits for the copy rather than refusing ...
    assert kv.ready(r) and kv.stats.stall_s > 0  # ... and counts the wait as stall
    gate.result()


def test_pausing_frees_named_blocks_at_once_and_evicting_one_waits_for_its_copy():
    kv = make_kv("fastswitch", 8, 8, prefix_caching=True)
    r = Request("r", list(range(40)), SamplingParams(max_tokens=8), 0.0)
    kv.grow(r, 30)
    compute(kv, r, 30)  # 7 full, named blocks and a partial one
    gate = kv.swapper._worker.submit(lambda: __import__("time").sleep(0.2))  # keep the copy queued
    assert kv.swap_out(r)
    flush(kv)
    assert not kv.ready(r) and kv.device.num_available == 7  # the named blocks are in the cache already
    assert kv.device.allocator.num_free == 0  # but not free: a copy still reads them
    other = Request("o", [7] * 40, SamplingParams(max_tokens=8), 0.0)
    assert kv.can_grow(other, 4 * BLOCK)
    kv.grow(other, 4 * BLOCK)  # evicts 4 of them: the copy must land first
    assert kv.ready(r) and kv.stats.stall_s > 0
    gate.result()
    host = kv.swapper.host_pool  # full blocks cached there by name, the partial one the request's own
    blocks = [kv.host.find(name) for name in r.block_names[:7]] + r.host_block_ids
    assert all(torch.equal(host[blocks[p // BLOCK], :, :, p % BLOCK], kv_of(p)) for p in range(30))


def test_resuming_takes_back_what_the_device_still_caches_and_copies_only_the_rest():
    kv = make_kv("fastswitch", 16, 16, prefix_caching=True)
    r = Request("r", list(range(40)), SamplingParams(max_tokens=8), 0.0)
    kv.grow(r, 30)
    compute(kv, r, 30)
    before = list(r.block_ids)
    assert kv.swap_out(r)
    settle(kv, r)
    assert not kv.lost_history(r)  # looked up before the evictions below: the answer must not be kept past them
    for block in before[5:7]:  # two named blocks lost from the device
        kv.device.lru.move_to_end(block, last=False)
    kv.device.evict(2)
    copied = kv.stats.swap_in_blocks
    assert kv.swap_in(r) is not None
    settle(kv, r)
    assert kv.stats.resume_device_blocks == 5 and kv.stats.swap_in_blocks - copied == 3  # 2 lost + the partial one
    assert r.block_ids[:5] == before[:5]
    assert torch.equal(read(kv, r), torch.stack([kv_of(t) for t in range(30)]))


def test_a_pause_trade_prices_the_history_a_partial_block_would_evict_by_how_often_evicted_history_returns():
    for host_blocks, regret, displaced in ((8, 0.5, 0.0), (7, 0.0, 0.0), (7, 0.5, BLOCK / 2)):
        kv = make_kv("fastswitch", 16, host_blocks, prefix_caching=True)
        evict_history_wanted_again(kv.host, wanted=int(regret * 4), evicted=4)
        r = Request("r", list(range(40)), SamplingParams(max_tokens=8), 0.0)
        kv.grow(r, 30)
        compute(kv, r, 30)  # 7 full blocks to write back, then the partial one: on a 7-block host it evicts
        assert kv.pause_trade(r) == (2, 2, displaced)  # the partial block out and back, or its 2 tokens


def test_a_resume_whose_kv_is_back_at_once_takes_room_for_its_first_chunk_as_admit_does():
    """It runs in the iteration that resumes it, or does not resume yet. One whose KV is still to be copied in
    does not hold room for a chunk it cannot run before that copy lands."""
    for asynchronous in (False, True):
        kv = make_kv("fastswitch", 8, 16, prefix_caching=True, asynchronous=asynchronous)
        r = Request("r", list(range(17)), SamplingParams(max_tokens=8), 0.0)
        kv.grow(r, 16)
        compute(kv, r, 16)  # 4 full blocks: the 17th token needs a fifth
        assert kv.swap_out(r)
        settle(kv, r)
        if asynchronous:
            kv.device.evict(len(kv.device.lru))  # its KV only on the host: a copy in, not made inline
        other = Request("o", [99] * 17, SamplingParams(max_tokens=8), 0.0)
        kv.grow(other, 16)
        compute(kv, other, 16)  # the device's other 4 blocks
        available = kv.device.num_available
        if not asynchronous:  # r's blocks, cached, are all the device has left: none for its next token
            assert kv.swap_in(r, budget=1) is None and not r.block_ids and kv.device.num_available == available
            kv.release(other)
        expected = (16, 0) if asynchronous else (16, 1)  # (tokens back, first chunk)
        assert kv.swap_in(r, budget=1) == expected and len(r.block_ids) == 4 + expected[1]
        settle(kv, r)
        assert torch.equal(read(kv, r), torch.stack([kv_of(t) for t in range(16)]))


def test_a_resume_does_not_wait_for_its_pause_to_reach_the_host():
    kv = make_kv("fastswitch", 16, 16, prefix_caching=True)
    r = Request("r", list(range(40)), SamplingParams(max_tokens=8), 0.0)
    kv.grow(r, 30)
    compute(kv, r, 30)  # 7 full blocks and a partial one
    before = list(r.block_ids)
    gate = kv.swapper._worker.submit(lambda: __import__("time").sleep(0.2))  # keep the copy-out queued
    assert kv.swap_out(r)
    flush(kv)
    assert not kv.ready(r) and kv.resumable(r)
    copied = kv.stats.swap_in_blocks
    r.num_computed_tokens, chunk = kv.swap_in(r, budget=8)
    assert r.num_computed_tokens == 7 * BLOCK  # the full blocks back from the device cache; the partial one recomputed
    assert kv.stats.swap_in_blocks == copied and r.block_ids[:7] == before[:7] and kv.ready(r)
    assert chunk == 8 and len(r.block_ids) == 9  # and, as nothing was copied, its first chunk's blocks at once
    assert torch.equal(read(kv, r), torch.stack([kv_of(t) for t in range(28)]))
    gate.result()
    kv.drain()
    blocks = [kv.host.find(name) for name in r.block_names[:7]]  # the pause's copy landed all the same
    assert all(torch.equal(kv.swapper.host_pool[blocks[p // BLOCK], :, :, p % BLOCK], kv_of(p)) for p in range(28))
    kv.release(r)
    kv.drain()
    assert not kv.device.refs and kv.device.num_available == 16


def test_spare_write_through_takes_only_free_host_blocks_and_waits_for_its_last_copy():
    kv = make_kv("fastswitch", 16, 6, prefix_caching=True, write_through="spare")
    old = Request("old", [9] * 8, SamplingParams(max_tokens=8), 0.0)
    kv.grow(old, 8)
    compute(kv, old, 8)  # written through: two blocks of cached history on the host
    flush(kv)
    kv.drain()
    history = [kv.host.find(name) for name in old.block_names[:2]]
    r = Request("r", list(range(40)), SamplingParams(max_tokens=8), 0.0)
    kv.grow(r, 12)
    gate = kv.swapper._worker.submit(lambda: __import__("time").sleep(0.2))  # keep the copy in flight
    compute(kv, r, 12)
    flush(kv)  # three blocks written through, still in flight
    kv.grow(r, 8)
    compute(kv, r, 8)
    assert r.num_written_through == 3  # the link is busy: the next two wait
    gate.result()
    flush(kv)
    kv.drain()
    kv.grow(r, 4)
    compute(kv, r, 4)  # six full blocks now, but the host has one free block: no history is evicted for them
    flush(kv)
    kv.drain()
    assert [kv.host.find(name) for name in old.block_names[:2]] == history
    assert sum(kv.host.find(name) is not None for name in r.block_names[:6]) == 4 and kv.host.allocator.num_free == 0
    host = kv.swapper.host_pool
    assert all(torch.equal(host[kv.host.find(r.block_names[p // BLOCK]), :, :, p % BLOCK], kv_of(p)) for p in range(16))


def kv_ready_at_once(kv: KVManager, request: Request) -> bool:
    return request.swap is None and kv.ready(request)


def round_trip_twice(kv: KVManager) -> Request:
    """A 6-block request swapped out, in, and out again with one more token written in between."""
    r = Request("r", [1] * 40, SamplingParams(max_tokens=8), 0.0)
    kv.grow(r, 22)
    compute(kv, r, 22)
    assert kv.swap_out(r)
    settle(kv, r)
    assert kv.swap_in(r) is not None
    settle(kv, r)
    kv.grow(r, 1)
    compute(kv, r, 1)
    assert kv.swap_out(r)
    flush(kv)
    return r


def test_each_ablation_switches_off_its_own_mechanism():
    full = make_kv("fastswitch", 16, 16)
    round_trip_twice(full)
    assert full.stats.swap_out_blocks == 6 + 1 and full.stats.copies == 3  # one copy per swap

    no_reuse = make_kv("fastswitch", 16, 16, reuse=False)
    round_trip_twice(no_reuse)
    assert no_reuse.stats.swap_out_blocks == 6 + 6 and no_reuse.stats.reuse_saved_blocks == 0

    no_groups = make_kv("fastswitch", 16, 16, block_groups=False)
    round_trip_twice(no_groups)
    assert no_groups.stats.swap_out_blocks == 6 + 1 and no_groups.stats.copies == 6 + 6 + 1  # one copy per block

    synchronous = make_kv("fastswitch", 16, 16, asynchronous=False)
    r = round_trip_twice(synchronous)
    assert kv_ready_at_once(synchronous, r) and synchronous.stats.copies == 3  # copied on the compute path
