"""Turns one row of logits per request into its next token, following the request's SamplingParams.

Order, as in vLLM: penalties and min_tokens masking on the raw logits; greedy rows take the argmax;
the others are divided by temperature, cut by top-k, top-p and min-p, and drawn with the request's
own generator when it has a seed. Logprobs are those of the raw model distribution.
"""

from dataclasses import dataclass

import torch

from fastswitch.sampling import SamplingParams


@dataclass
class SampleInput:
    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_ids: list[int]  # masked while fewer than min_tokens tokens exist


@dataclass
class Sample:
    token_id: int
    logprobs: dict[int, float] | None  # the sampled token's and the top-k's, when asked for


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.shared = torch.Generator(device).manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, rows: list[SampleInput]) -> list[Sample]:
        raw = logits
        if any(r.params.has_penalties or len(r.output_token_ids) < r.params.min_tokens for r in rows):
            logits = self._penalize(logits.clone(), rows)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)
            tokens[index] = self._draw(logits[index], [rows[i] for i in random_rows])
        token_list = tokens.tolist()
        logprobs = self._logprobs(raw, tokens, rows)
        return [Sample(t, lp) for t, lp in zip(token_list, logprobs)]

    def _penalize(self, logits: torch.Tensor, rows: list[SampleInput]) -> torch.Tensor:
        vocab = logits.shape[-1]
        for i, r in enumerate(rows):
            p = r.params
            if len(r.output_token_ids) < p.min_tokens and r.stop_ids:
                logits[i, torch.tensor(r.stop_ids, device=logits.device)] = -float("inf")
            if not p.has_penalties:
                continue
            out = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
            if p.repetition_penalty != 1:
                seen = counts > 0
                seen[torch.tensor(r.prompt_token_ids, dtype=torch.long, device=logits.device)] = True
                row = logits[i]
                penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                logits[i] = torch.where(seen, penalized, row)
            logits[i] -= p.presence_penalty * (counts > 0) + p.frequency_penalty * counts
        return logits

    def _draw(self, logits: torch.Tensor, rows: list[SampleInput]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[-1]
        temperature = torch.tensor([r.params.temperature for r in rows], device=device).unsqueeze(1)
        scaled = torch.nan_to_num(logits / temperature)  # a tiny temperature or penalty must not make inf - inf
        if all(r.params.top_k <= 0 and r.params.top_p == 1 and r.params.min_p == 0 for r in rows):
            return self._pick(scaled.softmax(dim=-1), rows)  # nothing to cut: no sort
        top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows],
                             device=device).unsqueeze(1)
        top_p = torch.tensor([r.params.top_p for r in rows], device=device).unsqueeze(1)
        min_p = torch.tensor([r.params.min_p for r in rows], device=device).unsqueeze(1)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        rank = torch.arange(vocab, device=device).unsqueeze(0)
        drop = (rank >= top_k) | (probs.cumsum(dim=-1) - probs > top_p) | (probs < min_p * probs[:, :1])
        return order.gather(1, self._pick(probs.masked_fill(drop, 0.0), rows).unsqueeze(1)).squeeze(1)

    def _pick(self, probs: torch.Tensor, rows: list[SampleInput]) -> torch.Tensor:
        """One draw per row: the rows without a seed in one call on the shared generator, seeded rows each on
        its own, so a seeded request's tokens do not depend on its batch."""
        picks = torch.empty(len(rows), dtype=torch.long, device=probs.device)
        shared = [i for i, r in enumerate(rows) if r.params.seed is None]
        if shared:
            index = torch.tensor(shared, device=probs.device)
            picks[index] = torch.multinomial(probs[index], 1, generator=self.shared).squeeze(1)
        for i, r in enumerate(rows):
            if r.params.seed is not None:
                picks[i] = torch.multinomial(probs[i], 1, generator=self._generator(r))[0]
        return picks

    def _generator(self, row: SampleInput) -> torch.Generator:
        """A seeded request's own generator, made at its first draw."""
        if row.request_id not in self.generators:
            self.generators[row.request_id] = torch.Generator(self.device).manual_seed(row.params.seed)
        return self.generators[row.request_id]

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, rows: list[SampleInput]) -> list[dict | None]:
        wanted = [r.params.logprobs for r in rows]
        if all(k is None for k in wanted):
            return [None] * len(rows)
        logprobs = raw.log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        k_max = max(k or 0 for k in wanted)
        top_values, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
        result = []
        for i, k in enumerate(wanted):
            if k is None:
                result.append(None)
                continue
            entry = dict(zip(top_ids[i, :k].tolist(), top_values[i, :k].tolist())) if k else {}
            entry[int(tokens[i])] = chosen[i]
            result.append(entry)
        return result
