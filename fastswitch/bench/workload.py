"""Benchmark workloads: multi-round conversations shaped like ShareGPT, synthetic or loaded.

A conversation is a user, an arrival time and turns. Each turn is a new user message (token ids), a
reply length (forced with `max_tokens` + `ignore_eos`, so runs are comparable) and the think time
between the previous reply and this message. Turn k's prompt is the whole history, every earlier
message and the reply actually generated to it, plus the new message (`history_prompt`), so later
turns share an exact token prefix with earlier ones: what KV reuse across turns can exploit.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastswitch.model.tokenizer import Tokenizer


@dataclass
class Turn:
    user_tokens: list[int]
    reply_len: int
    think_s: float  # pause after the previous reply before this turn is sent (0 for the first turn)


@dataclass
class Conversation:
    id: str
    user: str
    arrival_s: float
    turns: list[Turn] = field(default_factory=list)


@dataclass
class SyntheticSpec:
    conversations: int = 100
    rate: float = 1.0  # conversations starting per second (Poisson arrivals)
    extra_turns_mean: float = 4.5  # turns = 1 + Poisson(4.5), capped: 5.5 on average, as in ShareGPT
    max_turns: int = 12
    input_mean: float = 60.0  # tokens per user message (lognormal)
    input_sigma: float = 0.8
    output_mean: float = 120.0  # tokens per reply (lognormal)
    output_sigma: float = 0.6
    think_mean_s: float = 2.0  # exponential
    max_context: int = 4096  # a turn whose prompt plus reply would not fit ends the conversation
    users: int = 10
    vocab: tuple[int, int] = (3, 4000)  # token ids to draw from: the shipped tokenizer's ordinary ones
    seed: int = 0


def synthetic(spec: SyntheticSpec) -> list[Conversation]:
    rng = np.random.default_rng(spec.seed)
    arrival, conversations = 0.0, []
    for i in range(spec.conversations):
        arrival += rng.exponential(1 / spec.rate)
        conversation = Conversation(f"conv-{i}", f"user{i % spec.users}", arrival)
        context = 0
        for k in range(min(1 + rng.poisson(spec.extra_turns_mean), spec.max_turns)):
            message = _lognormal(rng, spec.input_mean, spec.input_sigma)
            reply = _lognormal(rng, spec.output_mean, spec.output_sigma)
            think = float(rng.exponential(spec.think_mean_s)) if k else 0.0
            if context + message + reply > spec.max_context:
                break
            tokens = rng.integers(spec.vocab[0], spec.vocab[1], size=message).tolist()
            conversation.turns.append(Turn(tokens, reply, think))
            context += message + reply
        if conversation.turns:
            conversations.append(conversation)
    return conversations


def load_sharegpt(path: str | Path, tokenizer: Tokenizer, rate: float, seed: int = 0, limit: int | None = None,
                  max_turns: int = 12, max_context: int = 4096, users: int = 10) -> list[Conversation]:
    """ShareGPT-format JSON (`[{"conversations": [{"from": "human"|"gpt", "value": text}, ...]}, ...]`):
    human messages become turns, each followed gpt reply gives that turn's length; arrivals are Poisson."""
    rng = np.random.default_rng(seed)
    arrival, conversations = 0.0, []
    for i, item in enumerate(json.loads(Path(path).read_text())):
        if limit is not None and len(conversations) >= limit:
            break
        messages = item.get("conversations") or []
        turns, context = [], 0
        for human, gpt in zip(messages[::2], messages[1::2]):
            if human.get("from") not in ("human", "user") or gpt.get("from") not in ("gpt", "assistant"):
                break
            tokens = tokenizer.encode(human.get("value", ""), add_special_tokens=False)
            reply = len(tokenizer.encode(gpt.get("value", ""), add_special_tokens=False))
            if not tokens or not reply or context + len(tokens) + reply > max_context or len(turns) == max_turns:
                break
            turns.append(Turn(tokens, reply, float(rng.exponential(2.0)) if turns else 0.0))
            context += len(tokens) + reply
        if turns:
            arrival += rng.exponential(1 / rate)
            conversations.append(Conversation(str(item.get("id", f"conv-{i}")), f"user{i % users}", arrival, turns))
    return conversations


def history_prompt(conversation: Conversation, turn: int, replies: list[list[int]]) -> list[int]:
    """Turn `turn`'s prompt: every earlier message and its actual reply, then the new message."""
    prompt: list[int] = []
    for earlier, reply in zip(conversation.turns[:turn], replies):
        prompt += earlier.user_tokens + reply
    return prompt + conversation.turns[turn].user_tokens


def _lognormal(rng: np.random.Generator, mean: float, sigma: float) -> int:
    """A positive integer length whose distribution is lognormal with the given mean."""
    return max(1, round(rng.lognormal(math.log(mean) - sigma**2 / 2, sigma)))
