"""Runs one iteration's batch through the model: flat inputs and attention metadata in, tokens out.

It owns the model, the device KV pool and the sampler, and knows nothing about scheduling policy.
"""

import torch

from fastswitch.engine.request import Request
from fastswitch.kv.layout import KVPool
from fastswitch.model.attention import StepBatch, select_backend
from fastswitch.model.config import ModelConfig
from fastswitch.model.loader import load_model
from fastswitch.model.sampler import Sample, SampleInput, Sampler


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int,
                 block_size: int, seed: int, attention_backend: str = "auto"):
        self.cfg, self.dtype, self.device, self.block_size = model_cfg, dtype, device, block_size
        self.model = load_model(model_cfg, dtype, device, max_model_len)
        self.sampler = Sampler(device, seed)
        self.attention = select_backend(attention_backend, device)

    def allocate_kv(self, num_blocks: int) -> None:
        """Called once the weights are loaded, so a GPU budget can be measured from what is left."""
        self.kv = KVPool(num_blocks, self.cfg.num_layers, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim,
                         self.dtype, self.device)
        self.kv_layers = self.kv.layers()

    @torch.inference_mode()
    def run(self, batch: list[tuple[Request, int]], stop_ids: list[int]) -> list[Sample | None]:
        """One forward over the batch; a Sample for each request whose chunk reaches its last token."""
        input_ids, positions, meta, sample_index = self._prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_layers, meta)
        samplers = [i for i, (r, n) in enumerate(batch) if r.num_computed_tokens + n == r.num_tokens]
        results: list[Sample | None] = [None] * len(batch)
        if not samplers:
            return results
        logits = self.model.compute_logits(hidden[torch.tensor(sample_index, device=self.device)])
        rows = [self._sample_input(batch[i][0], stop_ids) for i in samplers]
        for i, sample in zip(samplers, self.sampler(logits, rows)):
            results[i] = sample
        return results

    def _sample_input(self, request: Request, stop_ids: list[int]) -> SampleInput:
        p = request.params
        stops = [*([] if p.ignore_eos else stop_ids), *p.stop_token_ids]
        needs_history = p.has_penalties
        return SampleInput(request.request_id, p,
                           request.token_ids[: request.num_prompt_tokens] if needs_history else [],
                           request.output_token_ids if needs_history or p.min_tokens else [],
                           stops)

    def _prepare(self, batch: list[tuple[Request, int]]):
        bs = self.block_size
        ids, positions, slots, sample_index = [], [], [], []
        query_start_loc, seq_lens, block_tables = [0], [], []
        for request, n in batch:
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            ids += request.token_ids[start:end]
            positions += range(start, end)
            blocks = request.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            query_start_loc.append(len(ids))
            seq_lens.append(end)
            block_tables.append(blocks[: -(-end // bs)])
            if end == request.num_tokens:
                sample_index.append(len(ids) - 1)
        meta = self.attention.prepare(StepBatch(query_start_loc, seq_lens, block_tables, slots, bs))
        return self._tensor(ids), self._tensor(positions), meta, sample_index

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
