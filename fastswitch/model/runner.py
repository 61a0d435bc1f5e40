"""Runs one step through the model: a SchedulerOutput in, the sampled tokens out.

It owns the model, the device KV pool and the sampler, and knows nothing about scheduling policy.
It keeps each live request's tokens (the prompt it was sent, then every token it sampled), so a step
only says who computes how many tokens with which blocks.
"""

from dataclasses import dataclass

import torch

from fastswitch.kv.layout import KVPool
from fastswitch.messages import ModelOutput, SchedulerOutput
from fastswitch.model.attention import StepBatch, select_backend
from fastswitch.model.config import ModelConfig
from fastswitch.model.loader import load_model
from fastswitch.model.sampler import SampleInput, Sampler
from fastswitch.sampling import SamplingParams


@dataclass
class _RequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int,
                 block_size: int, seed: int, attention_backend: str = "auto"):
        self.cfg, self.dtype, self.device, self.block_size = model_cfg, dtype, device, block_size
        self.model = load_model(model_cfg, dtype, device, max_model_len)
        self.sampler = Sampler(device, seed)
        self.attention = select_backend(attention_backend, device)
        self.requests: dict[str, _RequestState] = {}

    def allocate_kv(self, num_blocks: int) -> None:
        """Called once the weights are loaded, so a GPU budget can be measured from what is left."""
        self.kv = KVPool(num_blocks, self.cfg.num_layers, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim,
                         self.dtype, self.device)
        self.kv_layers = self.kv.layers()

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> ModelOutput:
        """One forward over the step's batch; a token for each request whose chunk reaches its last token."""
        for request_id in step.finished_ids:
            self.requests.pop(request_id, None)
            self.sampler.forget(request_id)
        for new in step.new_requests:
            self.requests[new.request_id] = _RequestState(list(new.token_ids), new.num_prompt_tokens, new.params)
        if not step.scheduled:
            return ModelOutput([], [], [])
        input_ids, positions, meta, sample_index, samplers = self._prepare(step)
        hidden = self.model(input_ids, positions, self.kv_layers, meta)
        if not samplers:
            return ModelOutput([], [], [])
        logits = self.model.compute_logits(hidden[torch.tensor(sample_index, device=self.device)])
        samples = self.sampler(logits, [self._sample_input(rid) for rid in samplers])
        for rid, sample in zip(samplers, samples):
            self.requests[rid].token_ids.append(sample.token_id)
        return ModelOutput(samplers, [s.token_id for s in samples], [s.logprobs for s in samples])

    def _sample_input(self, request_id: str) -> SampleInput:
        state = self.requests[request_id]
        p = state.params
        stops = [*([] if p.ignore_eos else self.cfg.eos_token_ids), *p.stop_token_ids]
        needs_history = p.has_penalties
        return SampleInput(request_id, p, state.token_ids[: state.num_prompt_tokens] if needs_history else [],
                           state.token_ids[state.num_prompt_tokens :] if needs_history or p.min_tokens else [],
                           stops)

    def _prepare(self, step: SchedulerOutput):
        bs = self.block_size
        ids, positions, slots, sample_index, samplers = [], [], [], [], []
        query_start_loc, seq_lens, block_tables = [0], [], []
        for s in step.scheduled:
            tokens = self.requests[s.request_id].token_ids
            start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            ids += tokens[start:end]
            positions += range(start, end)
            blocks = s.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            query_start_loc.append(len(ids))
            seq_lens.append(end)
            block_tables.append(blocks[: -(-end // bs)])
            if end == len(tokens):
                sample_index.append(len(ids) - 1)
                samplers.append(s.request_id)
        meta = self.attention.prepare(StepBatch(query_start_loc, seq_lens, block_tables, slots, bs))
        return self._tensor(ids), self._tensor(positions), meta, sample_index, samplers

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
