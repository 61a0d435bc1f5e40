"""The sampler follows each request's parameters; seeded sampling is reproducible."""

import math

import pytest
import torch

from fastswitch import LLM, SamplingParams
from fastswitch.model.sampler import SampleInput, Sampler


def sample(logits, params: SamplingParams, output=(), prompt=(), stop_ids=(), request_id="r", sampler=None):
    sampler = sampler or Sampler(torch.device("cpu"), seed=0)
    row = SampleInput(request_id, params, list(prompt), list(output), list(stop_ids))
    return sampler(torch.tensor([logits], dtype=torch.float), [row])[0]


def draws(logits, params: SamplingParams, n=400, seed=0) -> list[int]:
    sampler = Sampler(torch.device("cpu"), seed=seed)
    return [sample(logits, params, sampler=sampler).token_id for _ in range(n)]


LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0]


def test_greedy_takes_the_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0)).token_id == 0


def test_temperature_sampling_covers_the_distribution():
    n = 2000
    for temperature in (1.0, 2.0):
        counts = torch.bincount(torch.tensor(draws(LOGITS, SamplingParams(temperature=temperature), n=n)), minlength=6)
        p = (torch.tensor(LOGITS) / temperature).softmax(0)
        sd = (n * p * (1 - p)).sqrt()
        assert ((counts - n * p).abs() < 5 * sd).all(), (temperature, counts, n * p)


def test_top_k_keeps_only_the_k_likeliest():
    assert set(draws(LOGITS, SamplingParams(top_k=2))) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor(LOGITS).softmax(0)  # 0.39, 0.24, 0.14, ...
    top_p = float(probs[0] + probs[1]) - 0.01  # needs tokens 0 and 1
    assert set(draws(LOGITS, SamplingParams(top_p=top_p))) == {0, 1}
    assert set(draws(LOGITS, SamplingParams(top_p=1e-6))) == {0}


def test_min_p_drops_tokens_below_the_scaled_maximum():
    probs = torch.tensor(LOGITS).softmax(0)
    min_p = float(probs[2] / probs[0]) - 0.01  # tokens 0, 1, 2 survive
    assert set(draws(LOGITS, SamplingParams(min_p=min_p))) == {0, 1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = [3.0, 2.9, 0.5]
    # token 0 appeared in the prompt: 3.0 / 2 < 2.9, so token 1 wins
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0]).token_id == 1
    # 3.0 / 10 and 2.9 / 10 fall below 0.5
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=10.0), output=[0, 1]).token_id == 2
    # a negative logit is multiplied: -0.5 * 10 < -0.6
    assert sample([-0.5, -0.6], SamplingParams(temperature=0, repetition_penalty=10.0), output=[0]).token_id == 1


def test_presence_and_frequency_penalties_follow_openai():
    logits = [3.0, 2.5, 0.0]
    # presence subtracts once: 3.0 - 1.0 < 2.5
    assert sample(logits, SamplingParams(temperature=0, presence_penalty=1.0), output=[0, 0, 0]).token_id == 1
    # frequency subtracts per occurrence: one occurrence (3.0 - 0.4) still wins, two (3.0 - 0.8) do not
    assert sample(logits, SamplingParams(temperature=0, frequency_penalty=0.4), output=[0]).token_id == 0
    assert sample(logits, SamplingParams(temperature=0, frequency_penalty=0.4), output=[0, 0]).token_id == 1
    # penalties look at generated tokens only, not the prompt
    assert sample(logits, SamplingParams(temperature=0, presence_penalty=1.0), prompt=[0]).token_id == 0


@pytest.mark.parametrize("params", [SamplingParams(temperature=1e-300), SamplingParams(repetition_penalty=1e-180),
                                    SamplingParams(temperature=1e-300, top_p=0.5, repetition_penalty=1e-180)])
def test_extreme_but_valid_parameters_still_draw_a_likely_token(params):
    """Found by fuzzing the server: logits / penalty overflowing to inf made inf - inf, and a NaN draw. A
    temperature under 1e-5 is greedy, as in vLLM."""
    assert sample([1.0, 3.0, -2.0, 2.5], params, prompt=[1]).token_id == 1


def test_min_tokens_masks_stop_tokens_until_reached():
    logits = [5.0, 1.0, 0.0]
    params = SamplingParams(temperature=0, min_tokens=2)
    assert sample(logits, params, output=[1], stop_ids=[0]).token_id == 1
    assert sample(logits, params, output=[1, 1], stop_ids=[0]).token_id == 0


def test_logprobs_are_those_of_the_raw_distribution():
    out = sample(LOGITS, SamplingParams(temperature=0, logprobs=2, presence_penalty=2.0), output=[0])
    raw = torch.tensor(LOGITS).log_softmax(0)
    assert out.token_id == 1  # the penalty moved the choice ...
    assert set(out.logprobs) == {0, 1}  # ... but logprobs are the model's
    assert math.isclose(out.logprobs[0], raw[0].item(), rel_tol=1e-5)
    assert math.isclose(out.logprobs[1], raw[1].item(), rel_tol=1e-5)
    only_sampled = sample(LOGITS, SamplingParams(temperature=0, logprobs=0))
    assert list(only_sampled.logprobs) == [0]


def test_a_seeded_request_draws_the_same_tokens_in_any_batch():
    params = SamplingParams(temperature=1.0, seed=7)
    alone = Sampler(torch.device("cpu"), seed=0)
    crowded = Sampler(torch.device("cpu"), seed=123)
    logits = torch.tensor([LOGITS] * 3)
    solo, mixed = [], []
    for _ in range(50):
        solo.append(alone(logits[:1], [SampleInput("a", params, [], [], [])])[0].token_id)
        rows = [SampleInput(rid, p, [], [], []) for rid, p in
                (("x", SamplingParams(temperature=1.0)), ("a", params), ("y", SamplingParams(temperature=1.0, seed=8)))]
        mixed.append(crowded(logits, rows)[1].token_id)
    assert solo == mixed
    assert len(set(solo)) > 1


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
     dict(min_p=1.5), dict(repetition_penalty=0.0), dict(presence_penalty=3.0), dict(frequency_penalty=-2.5),
     dict(max_tokens=0), dict(min_tokens=-1), dict(min_tokens=5, max_tokens=4), dict(logprobs=21), dict(stop=[""]),
     dict(stop_token_ids=[-1]), dict(seed="x")],
)
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_seeded_generation_is_reproducible_end_to_end(llama_dir, prompts):
    llm = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=128)
    seeded = [SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=16, ignore_eos=True) for i in range(4)]
    first = llm.generate(prompts[:4], seeded, use_tqdm=False)
    again = llm.generate(prompts[:4][::-1], seeded[::-1], use_tqdm=False)[::-1]  # other order, other batch slots
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    other_seed = llm.generate(prompts[:1], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16,
                                                           ignore_eos=True), use_tqdm=False)
    assert other_seed[0].token_ids != first[0].token_ids
