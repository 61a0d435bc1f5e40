"""The Triton paged-attention kernel against the torch reference, under the Triton interpreter on a CPU."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU
pytest.importorskip("triton")

from fastswitch.model.attention import StepBatch, torch_ref  # noqa: E402
from fastswitch.model.attention.triton_paged import TritonAttention  # noqa: E402


def case(data, dtype):
    """Sequences with a cached prefix and new tokens, scattered over a block-major pool of 2 layers."""
    block_size = data.draw(st.sampled_from([16, 32]))
    head_dim = data.draw(st.sampled_from([16, 32]))
    kv_heads, group = data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 2, 3]))
    query_lens = data.draw(st.lists(st.sampled_from([1, 1, 3, 17, 20]), min_size=1, max_size=3))
    contexts = [n + data.draw(st.sampled_from([0, 0, 5, 16, 40])) for n in query_lens]
    needed = [-(-c // block_size) for c in contexts]
    order = data.draw(st.permutations(range(sum(needed) + 2)))
    tables = [list(order[sum(needed[:i]):sum(needed[:i + 1])]) for i in range(len(needed))]
    pool = torch.randn(len(order), 2, 2, block_size, kv_heads, head_dim).to(dtype)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    slots = [t[p // block_size] * block_size + p % block_size
             for t, n, c in zip(tables, query_lens, contexts) for p in range(c - n, c)]
    q = torch.randn(qsl[-1], kv_heads * group, head_dim).to(dtype)
    k, v = (torch.randn(qsl[-1], kv_heads, head_dim).to(dtype) for _ in range(2))
    return pool, q, k, v, StepBatch(qsl, contexts, tables, slots, block_size)


def attend(backend, pool, q, k, v, batch):
    pool = pool.clone()
    out = backend.prepare(batch).attend(q, k, v, pool[:, 1, 0], pool[:, 1, 1], q.shape[-1] ** -0.5)
    return out, pool


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_triton_kernel_matches_the_reference_on_the_pools_real_strides(data, dtype):
    pool, q, k, v, batch = case(data, dtype)
    got, got_pool = attend(TritonAttention(torch.device("cpu")), pool, q, k, v, batch)
    exact, exact_pool = attend(torch_ref.TorchAttention(torch.device("cpu")), pool.float(), q.float(), k.float(),
                               v.float(), batch)
    assert torch.equal(got_pool.float(), exact_pool)  # the new K/V in their slots, nothing else moved
    assert (got.float() - exact).abs().max().item() <= (2e-5 if dtype == torch.float32 else 5e-3)


def test_generation_with_the_triton_backend_matches_the_reference_backend(llama_dir, prompts):
    """Greedy tokens of the real model, every layer through the kernel (the interpreter is slow: 3 prompts)."""
    from fastswitch import LLM, SamplingParams

    params, runs = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), {}
    for backend in ("torch", "triton"):
        llm = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64, attention_backend=backend)
        assert llm.engine.core.executor.attention.name == backend
        runs[backend] = [o.token_ids for o in llm.generate(prompts[:3], params, use_tqdm=False)]
    assert runs["triton"] == runs["torch"]
