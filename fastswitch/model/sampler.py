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
    """Every row at once, in a fixed number of kernels, with one host sync per step (the tokens' copy back):
    per-row parameters travel as tensors, histories as one scatter, and draws are exponential races
    (argmax of p / Exp(1), which is a draw from p) rather than a multinomial."""

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
            index = self._tensor(random_rows)
            tokens[index] = self._draw(logits[index], [rows[i] for i in random_rows])
        wanted = [r.params.logprobs for r in rows]
        if all(k is None for k in wanted):
            return [Sample(t, None) for t in _to_host(tokens)[0]]
        return self._with_logprobs(raw, tokens, wanted)

    def _with_logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, wanted: list[int | None]) -> list[Sample]:
        """Each row's token, and for the rows that asked, the raw distribution's logprob of it and of the top k."""
        logprobs = raw.log_softmax(dim=-1)
        top_values, top_ids = logprobs.topk(max(k or 0 for k in wanted), dim=-1)
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        tokens, chosen, top_values, top_ids = _to_host(tokens, chosen, top_values, top_ids)
        return [Sample(t, None if k is None else {**dict(zip(top_ids[i][:k], top_values[i][:k])), t: chosen[i]})
                for i, (t, k) in enumerate(zip(tokens, wanted))]

    def _penalize(self, logits: torch.Tensor, rows: list[SampleInput]) -> torch.Tensor:
        """min_tokens masking, then the repetition, presence and frequency penalties, for all rows at once."""
        masked = [(i, t) for i, r in enumerate(rows) if len(r.output_token_ids) < r.params.min_tokens
                  for t in r.stop_ids]
        if masked:
            logits[self._pairs(masked)] = -float("inf")
        if not any(r.params.has_penalties for r in rows):
            return logits
        counts = torch.zeros_like(logits)
        counts.index_put_(self._pairs([(i, t) for i, r in enumerate(rows) for t in r.output_token_ids]),
                          torch.ones((), device=logits.device), accumulate=True)
        seen = counts > 0
        seen[self._pairs([(i, t) for i, r in enumerate(rows) for t in r.prompt_token_ids])] = True
        repetition, presence, frequency = (self._column([getattr(r.params, name) for r in rows]) for name in
                                           ("repetition_penalty", "presence_penalty", "frequency_penalty"))
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)  # a penalty of 1 leaves a row as it was
        return logits - presence * (counts > 0) - frequency * counts

    def _draw(self, logits: torch.Tensor, rows: list[SampleInput]) -> torch.Tensor:
        vocab = logits.shape[-1]
        temperature = self._column([r.params.temperature for r in rows])
        scaled = torch.nan_to_num(logits / temperature)  # a tiny temperature or penalty must not make inf - inf
        if all(r.params.top_k <= 0 and r.params.top_p == 1 and r.params.min_p == 0 for r in rows):
            return self._race(scaled.softmax(dim=-1), rows)  # nothing to cut: no sort
        top_k = self._column([r.params.top_k if r.params.top_k > 0 else vocab for r in rows])
        top_p, min_p = self._column([r.params.top_p for r in rows]), self._column([r.params.min_p for r in rows])
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
        drop = (rank >= top_k) | (probs.cumsum(dim=-1) - probs > top_p) | (probs < min_p * probs[:, :1])
        return order.gather(1, self._race(probs.masked_fill(drop, 0.0), rows).unsqueeze(1)).squeeze(1)

    def _race(self, probs: torch.Tensor, rows: list[SampleInput]) -> torch.Tensor:
        """One draw per row: argmax of p / E with E ~ Exp(1). The rows without a seed take E from the shared
        generator, a seeded row from its own, so its tokens do not depend on its batch."""
        noise = torch.empty_like(probs).exponential_(generator=self.shared)
        for i, r in enumerate(rows):
            if r.params.seed is not None:
                noise[i].exponential_(generator=self._generator(r))
        return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)

    def _generator(self, row: SampleInput) -> torch.Generator:
        """A seeded request's own generator, made at its first draw."""
        if row.request_id not in self.generators:
            self.generators[row.request_id] = torch.Generator(self.device).manual_seed(row.params.seed)
        return self.generators[row.request_id]

    def _tensor(self, values: list, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _column(self, values: list[float]) -> torch.Tensor:
        return self._tensor(values, torch.float32).unsqueeze(1)

    def _pairs(self, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, token) pairs as the two index tensors of an index_put."""
        both = self._tensor(pairs).view(-1, 2)
        return both[:, 0], both[:, 1]


def _to_host(*tensors: torch.Tensor) -> list[list]:
    """Python lists of device tensors, after a single wait: all copies are queued before it."""
    host = [t.to("cpu", non_blocking=True) for t in tensors]
    if tensors[0].is_cuda:
        torch.cuda.current_stream(tensors[0].device).synchronize()
    return [h.tolist() for h in host]
