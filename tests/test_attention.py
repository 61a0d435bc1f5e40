"""The CPU paged-attention kernel against the torch reference, on the block-major pool's real strides."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastswitch.model.attention import StepBatch, cpu, select_backend, torch_ref
from fastswitch.model.cpu_features import cpu_flags
from tests.attention_cases import make_case, run

pytestmark = pytest.mark.skipif(not cpu.load_kernel(), reason="the CPU attention kernel could not be built here")

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_kernel_matches_reference(data, dtype):
    case = make_case(data, dtype)
    expected, expected_pool = run(torch_ref.TorchAttention(torch.device("cpu")), *case)
    got, got_pool = run(cpu.CpuAttention(), *case)
    assert torch.equal(got_pool, expected_pool)  # the new K/V land in the same slots, nothing else moves
    # the reference computes in the storage dtype where the kernel accumulates in fp32: compare both to fp32
    exact, _ = run(torch_ref.TorchAttention(torch.device("cpu")), *(x.float() if torch.is_tensor(x) else x
                                                                    for x in case))
    tol = TOLERANCE[dtype]
    kernel_error = (got.float() - exact).abs().max().item()
    reference_error = (expected.float() - exact).abs().max().item()
    assert kernel_error <= max(tol, 1.5 * reference_error), (kernel_error, reference_error)


def test_kernel_reads_strided_queries_and_values():
    """q and v straight out of a fused projection are views with a row stride wider than the heads."""
    torch.manual_seed(0)
    pool = torch.randn(8, 2, 2, 16, 2, 64)
    fused = torch.randn(20, 4 * 64 + 2 * 2 * 64)
    q = fused[:, :256].view(20, 4, 64)
    k = fused[:, 256:384].view(20, 2, 64)
    v = fused[:, 384:].view(20, 2, 64)
    batch = StepBatch([0, 19, 20], [40, 30], [[3, 1, 6], [0, 7]], [], 16)
    batch.slot_mapping = [[3, 1, 6][p // 16] * 16 + p % 16 for p in range(21, 40)] + [7 * 16 + 13]
    expected, expected_pool = run(torch_ref.TorchAttention(torch.device("cpu")), pool, 1, q.contiguous(),
                                  k.contiguous(), v.contiguous(), batch)
    got, got_pool = run(cpu.CpuAttention(), pool, 1, q, k, v, batch)
    assert torch.equal(got_pool, expected_pool)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_long_context_is_split_and_merged():
    """One sequence, few items for the threads: the context is split and the partial softmaxes merged."""
    torch.manual_seed(1)
    pool = torch.randn(300, 1, 2, 16, 1, 64)
    tables = [list(range(299, -1, -1))]
    batch = StepBatch([0, 1], [4790], tables, [tables[0][4789 // 16] * 16 + 4789 % 16], 16)
    q, k, v = torch.randn(1, 2, 64), torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    expected, _ = run(torch_ref.TorchAttention(torch.device("cpu")), pool, 0, q, k, v, batch)
    got, _ = run(cpu.CpuAttention(), pool, 0, q, k, v, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_metadata_is_refused():
    meta = cpu.CpuAttention().prepare(StepBatch([0, 1], [1], [[0]], [0], 16))
    pool = torch.zeros(1, 1, 2, 16, 1, 64)
    with pytest.raises(RuntimeError, match="one dtype"):
        meta.attend(torch.zeros(1, 1, 64, dtype=torch.bfloat16), torch.zeros(1, 1, 64), torch.zeros(1, 1, 64),
                    pool[:, 0, 0], pool[:, 0, 1], 0.125)


@pytest.mark.parametrize("isa, needs", [("avx2", "avx2"), ("sse", "sse2")])
def test_narrower_vector_widths_match_the_reference_too(isa, needs, tmp_path):
    """The AVX2 (8 lanes) and SSE (4 lanes) builds run the same properties: a CI machine may have only those."""
    if needs not in cpu_flags().split():
        pytest.skip(f"this CPU has no {needs}")
    tests = [f"{__file__}::{name}" for name in ("test_kernel_matches_reference", "test_long_context_is_split_and_merged")]
    env = {**os.environ, "FASTSWITCH_CPU_ISA": isa}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout


def test_auto_falls_back_to_the_reference_without_a_compiler(tmp_path):
    """A real failed build (no compiler, empty extensions cache): 'auto' logs one line and uses torch."""
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
            "from fastswitch.model.attention import select_backend\n"
            "print('backend', select_backend('auto', torch.device('cpu')).name)\n"
            "try:\n    select_backend('cpu', torch.device('cpu'))\nexcept RuntimeError as e:\n    print('refused', e)\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "backend torch" in result.stdout, result.stderr
    assert "refused attention backend 'cpu'" in result.stdout
    assert result.stderr.count("CPU attention kernel unavailable") == 1


def test_backend_choice(monkeypatch):
    assert select_backend("torch", torch.device("cpu")).name == "torch"
    assert select_backend("auto", torch.device("cpu")).name == "cpu"
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("flash", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="'triton' runs on CUDA"):
        select_backend("triton", torch.device("cpu"))


def test_dtype_auto_follows_what_the_cpu_computes_natively(monkeypatch):
    from fastswitch.model import cpu_features

    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: "sse2 avx2 fma f16c")
    assert cpu_features.cpu_dtype(torch.bfloat16) == torch.float32
    assert cpu_features.cpu_dtype(torch.float16) == torch.float32
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: "avx2 avx512f avx512_bf16")
    assert cpu_features.cpu_dtype(torch.bfloat16) == torch.bfloat16
    assert cpu_features.cpu_dtype(torch.float16) == torch.float32
    assert cpu_features.cpu_dtype(torch.float32) == torch.float32
