"""CUDA only (marker `gpu`; benchmarks/gpu/check.sh runs them on a lent device): the compiled Triton kernel,
CUDA-graph decodes and stream swaps, each against a reference on the same GPU.

`gpu_smoke` marks the subset check.sh runs first, in about a minute (one architecture with each engine,
pinned host tier, one host sync per step): a compile or capture error shows there, before the benchmarks.
The rest run in file order: the cheap tests first, the parity matrix last."""

import functools
import gc
import itertools
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastswitch import LLM, SamplingParams
from tests.conftest import MODELS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
MAX_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Pools sized here: the default (90% of the GPU) would be taken again by every engine of the module.
POOLS = dict(kv_cache_memory_bytes=1 << 30, swap_space=0.5)
RUNS = {"roomy": POOLS, "tight-kv": dict(POOLS, num_kv_blocks=22), "chunked": dict(POOLS, max_num_batched_tokens=64)}
ENGINES = {"torch": dict(attention_backend="torch"),
           "triton-eager": dict(attention_backend="triton", enforce_eager=True),
           "triton-graphs": dict(attention_backend="triton")}
SMOKE = pytest.mark.gpu_smoke


@functools.lru_cache(maxsize=None)
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()


@functools.lru_cache(maxsize=None)
@torch.inference_mode()
def _hf_greedy(path: str, prompt: tuple[int, ...]) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = _hf_model(path).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                   min_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_compiled_triton_kernel_matches_the_reference(data, dtype):
    from fastswitch.model.attention import torch_ref
    from fastswitch.model.attention.triton_paged import TritonAttention
    from tests.attention_cases import make_case, run

    cuda = torch.device("cuda")
    pool, layer, q, k, v, batch = make_case(data, dtype, block_sizes=(16,), head_dims=(96, 128),
                                            groups=(1, 4, 7))  # each shape compiles: few
    got, got_pool = run(TritonAttention(cuda), pool.cuda(), layer, q.cuda(), k.cuda(), v.cuda(), batch)
    exact, exact_pool = run(torch_ref.TorchAttention(cuda), pool.cuda().double(), layer, q.cuda().double(),
                            k.cuda().double(), v.cuda().double(), batch)
    assert torch.equal(got_pool.double(), exact_pool)
    error = (got.double() - exact).norm() / exact.norm()
    assert error <= (1e-5 if dtype == torch.float32 else 1e-2), error.item()


@SMOKE
def test_host_tier_is_pinned_and_swaps_run_off_the_compute_stream(llama_dir):
    llm = LLM(llama_dir, dtype="float32", device="cuda", num_kv_blocks=22, swap_space=0.5)
    swapper = llm.engine.core.executor.swapper
    assert swapper.host_pool.is_pinned()
    assert all(s != torch.cuda.current_stream() for s in swapper._streams.values())


def test_the_kv_budget_is_what_gpu_memory_utilization_leaves(llama_dir):
    gc.collect()  # the engines of earlier tests
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    llm = LLM(llama_dir, dtype="float32", device="cuda", gpu_memory_utilization=0.3, swap_space=0.5)
    free = torch.cuda.mem_get_info()[0]
    assert total - free <= 0.3 * total + (256 << 20)  # the graphs' pool and the allocator's rounding: slack
    assert llm.engine.core.kv.num_blocks * llm.engine.core.executor.swapper.block_bytes > 0.1 * total
    with pytest.raises(ValueError, match="leaves no memory for the KV pool"):
        LLM(llama_dir, dtype="float32", device="cuda", gpu_memory_utilization=0.001, swap_space=0.5)


@SMOKE
def test_sampling_a_mixed_batch_syncs_with_the_host_once():
    from fastswitch.model.sampler import SampleInput, Sampler

    sampler, logits = Sampler(torch.device("cuda"), seed=0), torch.randn(5, 4096, device="cuda")
    rows = [SampleInput("greedy", SamplingParams(temperature=0), [], [], []),
            SampleInput("hot", SamplingParams(temperature=1.2), [], [], []),
            SampleInput("cut", SamplingParams(top_p=0.8, top_k=50, min_p=0.01, seed=3), [], [], []),
            SampleInput("penalized", SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=4),
                        [5, 6], [7, 7], [2]),
            SampleInput("logprobs", SamplingParams(logprobs=5), [], [], [])]
    sampler(logits, rows)  # warm-up: the generators are made
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            samples = sampler(logits, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert samples[0].token_id == logits[0].argmax().item() and len(samples[4].logprobs) >= 5


@SMOKE
@pytest.mark.parametrize("engine", ["triton-eager", "triton-graphs"])
def test_a_decode_step_syncs_with_the_host_once(engine, llama_dir):
    llm = LLM(llama_dir, dtype="float32", device="cuda", **ENGINES[engine], **POOLS)
    core = llm.engine
    for i in range(4):
        core.add_request([5 + i] * 20, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(3):  # the prefill, then decodes
        core.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs = [core.step() for _ in range(5)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(len(o) == 4 for o in outputs)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 5, [f"{w.filename}:{w.lineno} {w.message}" for w in syncs]


@pytest.mark.parametrize("model,run,engine", [
    pytest.param(*case, id="-".join(case), marks=[SMOKE] if case[:2] == ("llama", "roomy") else [])
    for case in itertools.product(MODELS, RUNS, ENGINES)])
def test_greedy_fp32_on_cuda_matches_transformers_on_cuda(model, run, engine, model_dirs, prompts):
    llm = LLM(model_dirs[model], dtype="float32", device="cuda", **ENGINES[engine], **RUNS[run])
    assert (llm.engine.core.executor.runner.graphs is not None) == (engine == "triton-graphs")
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == _hf_greedy(model_dirs[model], tuple(prompt)), f"prompt of {len(prompt)} tokens diverged"
    if run == "tight-kv":
        assert llm.engine.stats.swap_out_blocks > 0 and llm.engine.stats.swap_in_blocks > 0
    assert llm.engine.core.kv.device.num_available == llm.engine.core.kv.num_blocks
