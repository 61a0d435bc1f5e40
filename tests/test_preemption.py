"""Requests paused and resumed at random steps produce exactly the tokens of an undisturbed run."""

import logging
import random

import pytest

from fastswitch import LLM, SamplingParams
from tests.test_swap import FlakyCopies

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
TINY_HOST_GIB = 8 * 65536 / 2**30  # 8 blocks of the tiny fp32 Llama: too few for the longer prompts


def run_with_random_preemptions(llm: LLM, prompts, seed: int, mode: str = "swap") -> list[list[int]]:
    engine, rng = llm.engine, random.Random(seed)
    if engine.config.async_swap:
        executor = engine.core.executor  # a worker's copy engine, or tensor parallelism's executor, which plans for the ranks
        getattr(executor, "swapper", executor).inline_bytes = 0  # these swaps are small: exercise the asynchronous path
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        running = [r.request_id for r in engine.core.scheduler.running]
        if running and rng.random() < 0.4:
            engine.preempt(rng.choice(running), mode)
            if rng.random() < 0.5:  # else it may be resumed while its pause is still copying it out
                engine.core.kv.drain()
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    engine.core.kv.drain()
    assert engine.core.kv.device.num_available == engine.core.kv.num_blocks, "device blocks leaked"
    assert engine.core.kv.host.num_available == engine.core.kv.host.allocator.num_blocks, "host blocks leaked"
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def undisturbed(model_dirs, prompts):
    return {m: [o.token_ids for o in LLM(model_dirs[m], dtype="float32", device="cpu", num_kv_blocks=128)
                .generate(prompts, GREEDY, use_tqdm=False)] for m in ("llama", "qwen3")}


@pytest.mark.parametrize("swap_mode", ["fastswitch", "baseline"])
@pytest.mark.parametrize("model", ["llama", "qwen3"])
def test_swapped_out_and_back_in_at_random_steps(model, swap_mode, model_dirs, prompts, undisturbed):
    llm = LLM(model_dirs[model], dtype="float32", device="cpu", num_kv_blocks=128, swap_mode=swap_mode)
    assert run_with_random_preemptions(llm, prompts, seed=1) == undisturbed[model]
    stats = llm.engine.stats
    assert stats.preemptions >= 5 and stats.swap_out_blocks > 0 and stats.swap_in_blocks > 0
    assert stats.recompute_fallbacks == 0
    if swap_mode == "fastswitch":
        assert stats.reuse_saved_blocks > 0, "a request paused twice should reuse its host copy"
        assert stats.copies < stats.swap_out_blocks + stats.swap_in_blocks, "groups should coalesce copies"
    else:
        assert stats.reuse_saved_blocks == 0


@pytest.mark.parametrize("off", ["block_groups", "kv_reuse", "async_swap"])
def test_each_ablation_keeps_the_tokens(off, model_dirs, prompts, undisturbed):
    llm = LLM(model_dirs["llama"], dtype="float32", device="cpu", num_kv_blocks=128, **{off: False})
    assert run_with_random_preemptions(llm, prompts, seed=4) == undisturbed["llama"]
    stats = llm.engine.stats
    assert stats.swap_out_blocks > 0 and (stats.reuse_saved_blocks == 0) == (off == "kv_reuse")


@pytest.mark.parametrize("swap_mode", ["fastswitch", "baseline"])
def test_a_full_host_tier_falls_back_to_recomputation(swap_mode, model_dirs, prompts, undisturbed, caplog):
    llm = LLM(model_dirs["llama"], dtype="float32", device="cpu", num_kv_blocks=128, swap_mode=swap_mode,
              swap_space=TINY_HOST_GIB)
    with caplog.at_level(logging.WARNING, logger="fastswitch.engine.scheduler"):
        assert run_with_random_preemptions(llm, prompts, seed=2) == undisturbed["llama"]
    assert llm.engine.stats.recompute_fallbacks > 0 and llm.engine.stats.swap_out_blocks > 0
    assert len([r for r in caplog.records if "host KV tier full" in r.message]) == 1  # one line, however many


def test_preemption_by_recomputation(model_dirs, prompts, undisturbed):
    llm = LLM(model_dirs["llama"], dtype="float32", device="cpu", num_kv_blocks=128)
    assert run_with_random_preemptions(llm, prompts, seed=3, mode="recompute") == undisturbed["llama"]
    assert llm.engine.stats.swap_out_blocks == 0 and llm.engine.stats.preemptions >= 5


def test_aborting_a_request_mid_swap_releases_everything(model_dirs, prompts):
    llm = LLM(model_dirs["llama"], dtype="float32", device="cpu", num_kv_blocks=128)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    engine.step()
    for request_id in ids[::2]:
        assert engine.preempt(request_id)  # swap-outs now in flight
        engine.abort(request_id)
    engine.step()  # resumes nobody it should not
    for request_id in ids[1::2]:
        engine.abort(request_id)
    engine.core.kv.drain()
    assert not engine.has_unfinished_requests()
    assert engine.core.kv.device.num_available == engine.core.kv.num_blocks and engine.core.kv.host.num_available == engine.core.kv.host.allocator.num_blocks


def test_failed_copies_recompute_their_requests_and_change_no_token(model_dirs, prompts, undisturbed):
    """About a third of the asynchronous copies fail on the copy thread, leaving garbage where they wrote: the
    requests they paused or resumed are recomputed, and every request still gets the undisturbed tokens."""
    llm = LLM(model_dirs["llama"], dtype="float32", device="cpu", num_kv_blocks=128)
    worker = llm.engine.core.executor
    worker.swapper = FlakyCopies(worker.swapper.device_pool, worker.swapper.host_pool, "fastswitch",
                                 llm.engine.stats, seed=5)
    assert run_with_random_preemptions(llm, prompts, seed=2) == undisturbed["llama"]
    assert llm.engine.stats.copy_failures == worker.swapper.failures > 0
