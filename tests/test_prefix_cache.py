"""KV reuse across turns: a conversation's next turn finds its history instead of recomputing it."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastswitch import LLM, SamplingParams
from fastswitch.kv.allocator import BlockAllocator
from fastswitch.kv.prefix import GHOST_POOLS, BlockCache, block_hashes
from tests.model_free import evict_history_wanted_again

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
BLOCK = 16


def test_block_names_chain_over_the_whole_prefix():
    a = block_hashes(list(range(40)), 16, [])
    assert len(a) == 2  # two full blocks; the 8 leftover tokens have no name
    assert block_hashes(list(range(40)), 16, a[:1]) == a  # extends what is known
    b = block_hashes([99] + list(range(1, 40)), 16, [])
    assert a[0] != b[0] and a[1] != b[1]  # same tokens in block 1, different history: different name


def turns(rng: random.Random, first_len: int) -> tuple[list[int], list[int]]:
    return [rng.randrange(3, 4000) for _ in range(first_len)], [rng.randrange(3, 4000) for _ in range(23)]


def second_turn(llm: LLM, history: list[int], question: list[int]):
    engine = llm.engine
    before = engine.stats.computed_tokens
    out = llm.generate([history + question], GREEDY, use_tqdm=False)[0]
    return out, engine.stats.computed_tokens - before


@pytest.fixture(scope="module")
def conversation():
    return turns(random.Random(7), 150)


def reference(llama_dir, first, question):
    plain = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64, enable_prefix_caching=False)
    reply = plain.generate([first], GREEDY, use_tqdm=False)[0].token_ids
    return reply, plain.generate([first + reply + question], GREEDY, use_tqdm=False)[0].token_ids


def test_second_turn_reuses_the_history_from_the_device_cache(llama_dir, conversation):
    first, question = conversation
    expected_reply, expected_answer = reference(llama_dir, first, question)
    llm = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64)
    reply = llm.generate([first], GREEDY, use_tqdm=False)[0]
    assert reply.token_ids == expected_reply and reply.num_cached_tokens == 0
    history = first + reply.token_ids  # 166 tokens, of which 165 have KV: 10 full blocks
    answer, computed = second_turn(llm, history, question)
    assert answer.token_ids == expected_answer
    assert answer.num_cached_tokens == 10 * BLOCK
    assert llm.engine.stats.prefix_device_hit_blocks == 10
    prompt_len = len(history) + len(question)
    assert computed == (prompt_len - 10 * BLOCK) + (GREEDY.max_tokens - 1)  # only the new tokens are prefilled


def test_second_turn_gets_an_evicted_history_from_the_host_tier(llama_dir, conversation):
    first, question = conversation
    expected_reply, expected_answer = reference(llama_dir, first, question)
    llm = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=24)
    reply = llm.generate([first], GREEDY, use_tqdm=False)[0]
    assert reply.token_ids == expected_reply
    assert llm.engine.stats.writeback_blocks == 10  # the finished turn's full blocks went to the host
    filler = [[random.Random(i).randrange(3, 4000) for _ in range(300)] for i in range(2)]
    llm.generate(filler, GREEDY, use_tqdm=False)  # needs the whole pool: the history leaves the device
    history = first + reply.token_ids
    answer, computed = second_turn(llm, history, question)
    stats = llm.engine.stats
    assert answer.token_ids == expected_answer
    assert stats.prefix_host_hit_blocks == 10 and answer.num_cached_tokens == 10 * BLOCK
    assert computed == (len(history) + len(question) - 10 * BLOCK) + (GREEDY.max_tokens - 1)


def test_concurrent_requests_share_a_common_prompt_prefix(llama_dir):
    rng = random.Random(3)
    system = [rng.randrange(3, 4000) for _ in range(70)]
    prompts = [system + [rng.randrange(3, 4000) for _ in range(9 + i)] for i in range(4)]
    plain = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64, enable_prefix_caching=False)
    expected = [o.token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    llm = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64)
    engine = llm.engine
    engine.add_request(prompts[0], GREEDY, request_id="first")
    engine.step()  # the first request's prompt is computed and its full blocks are named
    ids = ["first"] + [engine.add_request(p, GREEDY) for p in prompts[1:]]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert [done[i].token_ids for i in ids] == expected
    assert [done[i].num_cached_tokens for i in ids] == [0, 64, 64, 64]  # 4 full blocks of the shared 70 tokens
    engine.core.kv.drain()
    assert engine.core.kv.device.num_available == engine.core.kv.num_blocks and not engine.core.kv.device.refs


ops = st.lists(st.tuples(st.sampled_from(["alloc", "take", "drop", "name", "evict"]), st.integers(0, 30),
                         st.integers(1, 4)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 32), ops=ops)
def test_block_cache_refcounts_never_free_a_block_in_use(num_blocks, ops):
    cache = BlockCache(BlockAllocator(num_blocks))
    held: list[int] = []  # one entry per reference we hold
    for op, x, n in ops:
        if op == "alloc" and n <= cache.num_available:
            held += cache.allocate(n)
        elif op == "take" and cache.lru:
            block = list(cache.lru)[x % len(cache.lru)]
            cache.take([block])
            held.append(block)
        elif op == "drop" and held:
            cache.drop([held.pop(x % len(held))])
        elif op == "name" and held:
            cache.name(held[x % len(held)], bytes([x % 7]))
        elif op == "evict":
            cache.evict(n)
        free = {b for start, order in cache.allocator.chunks() for b in range(start, start + (1 << order))}
        assert set(held) == set(cache.refs) and all(cache.refs[b] == held.count(b) for b in cache.refs)
        assert not free & set(held) and not free & set(cache.lru) and not set(cache.lru) & set(held)
        assert len(free) + len(cache.lru) + len(set(held)) == num_blocks
        assert all(cache.find(cache.name_of[b]) == b for b in cache.lru)
    cache.drop(held)
    cache.evict(num_blocks)
    assert cache.allocator.num_free == num_blocks


def test_an_arriving_turn_knows_how_much_of_it_the_cache_holds(llama_dir, conversation):
    """The slo policy's estimate of a waiting request's prefill counts only what the cache does not hold."""
    llm = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64, policy="slo")
    prompt, question = conversation
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    engine, turn = llm.engine, prompt + first.token_ids + question
    request_id = engine.add_request(turn, GREEDY)
    request = engine.core.scheduler.requests[request_id]
    assert request.cached_at_arrival == (len(prompt) + len(first.token_ids) - 1) // BLOCK * BLOCK > 0
    costs = engine.core.scheduler.costs
    assert costs.next_token_s(request) == pytest.approx((len(turn) - request.cached_at_arrival - 1)
                                                        / costs.prefill_tokens_per_s + costs.step_s)
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert outputs[0].num_cached_tokens == request.cached_at_arrival  # the estimate was what admission reused


def test_a_cache_counts_how_often_what_it_evicted_is_wanted_again():
    cache = BlockCache(BlockAllocator(8), ghost_pools=GHOST_POOLS)
    assert cache.regret_rate == 0.0
    evict_history_wanted_again(cache, wanted=1, evicted=4)
    cache.missed([b"history 0", b"never cached"])  # a regret counts once; a name never cached is none
    assert cache.regret_rate == 0.25 and cache.allocator.num_free == 8
