"""Greedy fp32 generation is token-identical to transformers, however the engine batches the work, on every
attention backend."""

import logging

import pytest
import torch

from fastswitch import LLM, SamplingParams
from fastswitch.messages import NewRequest, ScheduledRequest, SchedulerOutput
from tests.conftest import MODELS
from tests.reference import hf_greedy, hf_logits

MAX_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
BACKENDS = ["cpu", "torch"]

RUNS = {
    "roomy": dict(),
    # 22 blocks of 16 tokens hold the longest request (332 tokens) alone, not all eight: requests wait and
    # some are paused (swapped to the host: forced, as auto's choice follows measured timings) and resumed
    "tight-kv": dict(num_kv_blocks=22, preemption_mode="swap"),
    # a 300-token prompt takes five iterations of 64 tokens while the others decode
    "chunked": dict(max_num_batched_tokens=64),
    "tight-and-chunked": dict(num_kv_blocks=24, max_num_batched_tokens=40, max_num_seqs=3, preemption_mode="recompute"),
}


@pytest.fixture(scope="module")
def references(model_dirs, prompts):
    return {name: [hf_greedy(model_dirs[name], p, MAX_TOKENS) for p in prompts] for name in MODELS}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("model", MODELS)
def test_greedy_matches_transformers(model, run, backend, model_dirs, prompts, references):
    llm = LLM(model_dirs[model], dtype="float32", device="cpu", attention_backend=backend, **RUNS[run])
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out, expected in zip(prompts, outputs, references[model]):
        assert out.token_ids == expected, f"prompt of {len(prompt)} tokens diverged"
        assert out.finish_reason == "length"
    if "tight" in run:
        assert sum(o.metrics.num_preemptions for o in outputs) > 0, "the tight pool should force preemption"
        stats = llm.engine.stats
        if RUNS[run]["preemption_mode"] == "swap":
            assert stats.swap_out_blocks > 0, "preemption under memory pressure should swap"
        else:
            assert stats.swap_preemptions == 0 and stats.recompute_preemptions > 0
    assert llm.engine.core.kv.device.num_available == llm.engine.core.kv.num_blocks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", ["llama", "qwen3"])
def test_greedy_matches_transformers_over_cached_prefixes(model, backend, model_dirs, prompts, references):
    """Second turns: each prompt again plus its reply, served from the prefix cache, then extended."""
    llm = LLM(model_dirs[model], dtype="float32", device="cpu", attention_backend=backend, num_kv_blocks=64,
              max_num_batched_tokens=128)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    turns = [p + o.token_ids for p, o in zip(prompts, first)]
    second = llm.generate(turns, GREEDY, use_tqdm=False)
    for turn, out in zip(turns, second):
        assert out.token_ids == hf_greedy(model_dirs[model], turn, MAX_TOKENS)
    assert sum(o.num_cached_tokens for o in second) > 0


def _prefill_logits(engine, prompt: list[int], chunks: list[int]) -> torch.Tensor:
    """Prompt logits at every position, computing the prompt in the given chunk sizes."""
    blocks = engine.core.kv.device.allocate(-(-len(prompt) // engine.config.block_size))
    runner, pieces, computed = engine.core.executor.runner, [], 0
    runner.execute(SchedulerOutput(0, [], [NewRequest("r", prompt, len(prompt), SamplingParams())], [], [], []))
    with torch.inference_mode():
        for n in chunks:
            step = SchedulerOutput(0, [ScheduledRequest("r", computed, n, blocks, True)], [], [], [], [])
            ids, positions, batch, _, _ = runner._prepare(step)
            hidden = runner.model(runner._tensor(ids), runner._tensor(positions), runner.kv_layers,
                                  runner.attention.prepare(batch))
            pieces.append(runner.model.compute_logits(hidden))
            computed += n
    engine.core.kv.device.drop(blocks)
    return torch.cat(pieces)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", MODELS)
def test_prefill_logits_match_transformers(model, backend, model_dirs, prompts):
    llm = LLM(model_dirs[model], dtype="float32", device="cpu", num_kv_blocks=64, attention_backend=backend)
    prompt = prompts[-1]
    expected = hf_logits(model_dirs[model], prompt)
    whole = _prefill_logits(llm.engine, prompt, [len(prompt)])
    chunked = _prefill_logits(llm.engine, prompt, [100, 37, 1, 162])  # cached context, odd block offsets
    torch.testing.assert_close(whole, expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(chunked, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prepacked_projections_compute_what_plain_matmuls_do(dtype, model_dirs, caplog):
    """On a CPU the loader packs every projection and the LM head for oneDNN, or, where oneDNN cannot pack
    that dtype (bf16 without avx512bw or avx_ne_convert), none of them, with one warning; the results do
    not change."""
    from fastswitch.model.config import ModelConfig
    from fastswitch.model.llama import Linear
    from fastswitch.model.loader import load_model

    with caplog.at_level(logging.WARNING, logger="fastswitch.model.loader"):
        model = load_model(ModelConfig.from_folder(model_dirs["qwen2"]), dtype, torch.device("cpu"), 256)
    projections = [m for m in model.modules() if isinstance(m, Linear)]
    packed = [m.weight.is_mkldnn for m in projections]
    assert projections and (all(packed) or (not any(packed) and "not prepacked" in caplog.text))
    tol = 0.0 if dtype == torch.bfloat16 else 1e-4  # bf16: the same oneDNN kernel either way
    for m in projections[:4]:
        x = torch.randn(5, m.weight.shape[1]).to(dtype)
        dense = m.weight.to_dense() if m.weight.is_mkldnn else m.weight
        expected = torch.nn.functional.linear(x, dense, m.bias)
        torch.testing.assert_close(m(x), expected, rtol=tol, atol=tol)
    hidden = torch.randn(5, model.embed_tokens.shape[1]).to(dtype)
    expected = torch.nn.functional.linear(hidden, model.embed_tokens).float()
    torch.testing.assert_close(model.compute_logits(hidden), expected, rtol=tol, atol=tol)
