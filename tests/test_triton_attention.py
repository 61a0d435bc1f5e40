"""The Triton paged-attention kernel against the torch reference, under the Triton interpreter on a CPU."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU
pytest.importorskip("triton")

from fastswitch.model.attention import torch_ref  # noqa: E402
from fastswitch.model.attention.triton_paged import TritonAttention  # noqa: E402
from tests.attention_cases import make_case, run  # noqa: E402


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_triton_kernel_matches_the_reference_on_the_pools_real_strides(data, dtype):
    # tl.dot needs blocks of 16; the interpreter is slow: short contexts. A decode-only step is split or not.
    decode_only = data.draw(st.booleans(), label="decode only")
    pool, layer, q, k, v, batch = make_case(data, dtype, block_sizes=(16, 32), head_dims=(16, 32, 36, 48),
                                            groups=(1, 2, 3, 4, 7), max_seqs=3,
                                            new_lens=(1,) if decode_only else (1, 1, 3, 17, 20),
                                            cached_lens=(0, 0, 5, 16, 40, 200))
    backend = TritonAttention(torch.device("cpu"))
    backend.split_below = data.draw(st.sampled_from([0, 1 << 20]), label="split below")
    got, got_pool = run(backend, pool, layer, q, k, v, batch)
    exact, exact_pool = run(torch_ref.TorchAttention(torch.device("cpu")), pool.float(), layer, q.float(), k.float(),
                            v.float(), batch)
    assert torch.equal(got_pool.float(), exact_pool)  # the new K/V in their slots, nothing else moved
    assert (got.float() - exact).abs().max().item() <= (2e-5 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("model", ["llama", "qwen3"])  # qwen3: a head of 96, padded inside the kernel
def test_generation_with_the_triton_backend_matches_the_reference_backend(model, model_dirs, prompts):
    """Greedy tokens of the real model, every layer through the kernel (the interpreter is slow: 3 prompts)."""
    from fastswitch import LLM, SamplingParams

    params, runs = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), {}
    for backend in ("torch", "triton"):
        llm = LLM(model_dirs[model], dtype="float32", device="cpu", num_kv_blocks=64, attention_backend=backend)
        assert llm.engine.core.executor.runner.attention.name == backend
        runs[backend] = [o.token_ids for o in llm.generate(prompts[:3], params, use_tqdm=False)]
    assert runs["triton"] == runs["torch"]
