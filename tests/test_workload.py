"""Benchmark workloads: seeded, shaped like ShareGPT, and with the exact prefix structure of turns."""

import json
import statistics

import numpy as np

from fastswitch.bench.workload import SyntheticSpec, history_prompt, load_sharegpt, synthetic
from fastswitch.model.tokenizer import Tokenizer


def test_the_same_seed_gives_the_same_workload():
    assert synthetic(SyntheticSpec(conversations=30, seed=4)) == synthetic(SyntheticSpec(conversations=30, seed=4))
    assert synthetic(SyntheticSpec(conversations=30, seed=4)) != synthetic(SyntheticSpec(conversations=30, seed=5))


def test_lengths_turns_and_arrivals_follow_the_spec():
    spec = SyntheticSpec(conversations=3000, rate=4.0, max_context=10**9, max_turns=50, seed=1)
    conversations = synthetic(spec)
    turns = [t for c in conversations for t in c.turns]
    assert abs(statistics.mean(len(c.turns) for c in conversations) - 5.5) < 0.15  # 1 + Poisson(4.5)
    assert abs(statistics.mean(len(t.user_tokens) for t in turns) / spec.input_mean - 1) < 0.05
    assert abs(statistics.mean(t.reply_len for t in turns) / spec.output_mean - 1) < 0.05
    gaps = np.diff([0.0] + [c.arrival_s for c in conversations])
    assert abs(gaps.mean() * spec.rate - 1) < 0.06  # Poisson arrivals at the rate
    thinks = [t.think_s for c in conversations for t in c.turns[1:]]
    assert abs(statistics.mean(thinks) / spec.think_mean_s - 1) < 0.05
    assert all(c.turns[0].think_s == 0 for c in conversations)
    assert all(spec.vocab[0] <= tok < spec.vocab[1] for t in turns for tok in t.user_tokens)


def test_a_conversation_fits_its_context_limit():
    spec = SyntheticSpec(conversations=300, max_context=500, seed=2)
    for c in synthetic(spec):
        assert sum(len(t.user_tokens) + t.reply_len for t in c.turns) <= 500


def test_every_turn_starts_with_the_whole_history():
    conversation = next(c for c in synthetic(SyntheticSpec(conversations=50, seed=3)) if len(c.turns) >= 3)
    replies = [[7] * t.reply_len for t in conversation.turns]
    prompts = [history_prompt(conversation, k, replies[:k]) for k in range(len(conversation.turns))]
    assert prompts[0] == conversation.turns[0].user_tokens
    for k in range(1, len(prompts)):
        assert prompts[k][: len(prompts[k - 1])] == prompts[k - 1]  # an exact prefix ...
        assert prompts[k] == prompts[k - 1] + replies[k - 1] + conversation.turns[k].user_tokens  # ... and the rest


def test_sharegpt_loader(tmp_path, llama_dir):
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi! How can I help?"},
                                      {"from": "human", "value": "Tell me a joke"}, {"from": "gpt", "value": "No."}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "starts with the model"}]},  # skipped
        {"id": "c", "conversations": [{"from": "human", "value": "only a question"}]},  # no reply: skipped
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    tokenizer = Tokenizer(llama_dir)
    conversations = load_sharegpt(path, tokenizer, rate=2.0, seed=0)
    assert [c.id for c in conversations] == ["a"]
    turns = conversations[0].turns
    assert [t.user_tokens for t in turns] == [tokenizer.encode("Hello there", add_special_tokens=False),
                                              tokenizer.encode("Tell me a joke", add_special_tokens=False)]
    assert [t.reply_len for t in turns] == [len(tokenizer.encode("Hi! How can I help?", add_special_tokens=False)),
                                            len(tokenizer.encode("No.", add_special_tokens=False))]
    assert turns[0].think_s == 0 and turns[1].think_s > 0
    assert len(load_sharegpt(path, tokenizer, rate=2.0, max_turns=1)[0].turns) == 1
