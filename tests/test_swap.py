"""Swapping KV between device and host: copy plans, bookkeeping, and bytes that survive round trips."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastswitch.engine.request import Request, Status
from fastswitch.engine.stats import EngineStats
from fastswitch.kv.layout import KVPool
from fastswitch.kv.manager import KVManager
from fastswitch.kv.swap import SwapManager, plan_copies
from fastswitch.sampling import SamplingParams

BLOCK, LAYERS = 4, 2
CPU = torch.device("cpu")


def test_plan_copies_coalesces_runs_contiguous_on_both_sides():
    assert plan_copies([4, 5, 6, 9, 10], [0, 1, 2, 3, 4]) == [(4, 0, 3), (9, 3, 2)]
    assert plan_copies([1, 2, 3], [7, 9, 10]) == [(1, 7, 1), (2, 9, 2)]
    assert plan_copies([], []) == []
    with pytest.raises(ValueError):
        plan_copies([1, 2], [3])


def make_kv(mode: str, num_blocks: int, num_host_blocks: int) -> KVManager:
    device = KVPool(num_blocks, LAYERS, BLOCK, 1, 2, torch.float32, CPU)
    host = KVPool(num_host_blocks, LAYERS, BLOCK, 1, 2, torch.float32, CPU, host_for=CPU)
    stats = EngineStats()
    swapper = SwapManager(device.data, host.data, mode, stats)
    swapper.inline_bytes = 0  # these pools are tiny: exercise the asynchronous path
    return KVManager(num_blocks, num_host_blocks, BLOCK, stats, swapper)


def write(kv: KVManager, request: Request, values: torch.Tensor) -> None:
    """Compute len(values) more tokens of `request`: their K/V, for every layer, are `values`."""
    pool = kv.swapper.device_pool
    for i, value in enumerate(values):
        p = request.num_computed_tokens + i
        pool[request.block_ids[p // BLOCK], :, :, p % BLOCK] = value
    request.num_computed_tokens += len(values)


def read(kv: KVManager, request: Request) -> torch.Tensor:
    pool = kv.swapper.device_pool
    tokens = [pool[request.block_ids[p // BLOCK], :, :, p % BLOCK] for p in range(request.num_computed_tokens)]
    return torch.stack(tokens) if tokens else torch.empty(0, LAYERS, 2, 1, 2)


ops = st.lists(st.tuples(st.sampled_from(["write", "write", "out", "in", "free", "check"]), st.integers(0, 3),
                         st.integers(1, 9)), max_size=50)


@settings(max_examples=120, deadline=None)
@given(mode=st.sampled_from(["fastswitch", "baseline"]), num_blocks=st.integers(4, 20),
       num_host_blocks=st.integers(0, 24), ops=ops)
def test_round_trips_keep_every_byte_and_leak_nothing(mode, num_blocks, num_host_blocks, ops):
    kv = make_kv(mode, num_blocks, num_host_blocks)
    requests = [Request(f"r{i}", None, [1] * 64, SamplingParams(max_tokens=8), 0.0, None) for i in range(4)]
    for r in requests:
        r.status = Status.RUNNING
    truth = {r.request_id: torch.empty(0, LAYERS, 2, 1, 2) for r in requests}
    gen = torch.Generator().manual_seed(0)
    for op, i, n in ops:
        r = requests[i]
        if op == "write" and r.status == Status.RUNNING and r.num_computed_tokens + n <= r.num_tokens:
            kv.swapper.wait(r.swap) if r.swap is not None else None
            if kv.can_grow(r, n):
                kv.grow(r, n)
                values = torch.randn(n, LAYERS, 2, 1, 2, generator=gen)
                write(kv, r, values)
                truth[r.request_id] = torch.cat([truth[r.request_id], values])
        elif op == "out" and r.status == Status.RUNNING and r.num_computed_tokens:
            if kv.swap_out(r):
                r.status = Status.SWAPPED
            else:  # host full: the request would be recomputed
                kv.release(r)
                r.num_computed_tokens, truth[r.request_id] = 0, truth[r.request_id][:0]
        elif op == "in" and r.status == Status.SWAPPED:
            kv.swapper.wait(r.swap)
            if kv.swap_in(r):
                r.status = Status.RUNNING
        elif op == "free":
            kv.release(r)
            r.status, r.num_computed_tokens, truth[r.request_id] = Status.RUNNING, 0, truth[r.request_id][:0]
        elif op == "check" and r.status == Status.RUNNING and r.swap is not None:
            kv.swapper.wait(r.swap)
        for req in requests:
            if req.status == Status.RUNNING and kv.ready(req):
                assert torch.equal(read(kv, req), truth[req.request_id]), f"{req.request_id}'s KV changed"
        held = [b for req in requests for b in req.block_ids]
        assert len(held) == len(set(held)), "a device block is held twice"
        hosted = [b for req in requests for b in req.host_block_ids]
        assert len(hosted) == len(set(hosted)), "a host block is held twice"
    for r in requests:
        kv.release(r)
    kv.drain()
    assert kv.device.num_available == num_blocks and kv.host.num_available == num_host_blocks


def test_second_swap_out_copies_only_the_blocks_written_since():
    kv = make_kv("fastswitch", 16, 16)
    r = Request("r", None, [1] * 40, SamplingParams(max_tokens=8), 0.0, None)
    kv.grow(r, 22)
    write(kv, r, torch.randn(22, LAYERS, 2, 1, 2))  # 6 blocks, the last one partly filled
    assert kv.swap_out(r) and kv.stats.swap_out_blocks == 6 and kv.stats.reuse_saved_blocks == 0
    kv.swapper.wait(r.swap)
    assert kv.swap_in(r)
    kv.swapper.wait(r.swap)
    assert kv.swap_out(r)  # nothing written since: nothing to copy
    assert kv.stats.swap_out_blocks == 6 and kv.stats.reuse_saved_blocks == 6
    kv.swapper.wait(r.swap)
    kv.swap_in(r)
    kv.swapper.wait(r.swap)
    kv.grow(r, 6)
    write(kv, r, torch.randn(6, LAYERS, 2, 1, 2))  # tokens 22..27: the partial block 5 and a new block 6
    assert kv.swap_out(r)
    assert kv.stats.swap_out_blocks == 6 + 2 and kv.stats.reuse_saved_blocks == 6 + 5


def test_baseline_copies_every_block_every_time_one_block_and_layer_at_a_time():
    kv = make_kv("baseline", 16, 16)
    r = Request("r", None, [1] * 40, SamplingParams(max_tokens=8), 0.0, None)
    kv.grow(r, 16)
    write(kv, r, torch.randn(16, LAYERS, 2, 1, 2))
    for _ in range(2):
        assert kv.swap_out(r) and kv.swap_in(r)
    assert kv.stats.swap_out_blocks == 8 and kv.stats.reuse_saved_blocks == 0
    assert kv.stats.copies == 4 * 4 * LAYERS * 2  # 4 swaps of 4 blocks, per layer, K and V
    fast = make_kv("fastswitch", 16, 16)
    r = Request("r", None, [1] * 40, SamplingParams(max_tokens=8), 0.0, None)
    fast.grow(r, 16)
    write(fast, r, torch.randn(16, LAYERS, 2, 1, 2))
    assert fast.swap_out(r) and fast.stats.copies == 1  # one contiguous group: one copy


def test_freed_device_blocks_wait_for_their_copy():
    kv = make_kv("fastswitch", 8, 8)
    r = Request("r", None, [1] * 40, SamplingParams(max_tokens=8), 0.0, None)
    kv.grow(r, 32)
    write(kv, r, torch.randn(32, LAYERS, 2, 1, 2))
    gate = kv.swapper._worker.submit(lambda: __import__("time").sleep(0.2))  # keep the copy queued
    assert kv.swap_out(r) and not r.swap.done()
    assert kv.device.num_available == 0  # still being read by the copy
    other = Request("o", None, [1] * 40, SamplingParams(max_tokens=8), 0.0, None)
    assert kv.can_grow(other, 8)  # waits for the copy rather than refusing ...
    assert r.swap.done() and kv.stats.stall_s > 0  # ... and counts the wait as stall
    gate.result()
