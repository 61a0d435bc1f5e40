"""Runs one iteration's batch through the model: flat inputs and attention metadata in, tokens out.

It owns the model, the device KV pool and the sampler, and knows nothing about scheduling policy.
"""

import torch

from fastswitch.engine.request import Request
from fastswitch.kv.layout import KVPool
from fastswitch.model.attention import AttentionMetadata, DecodeBatch, PrefillSeq
from fastswitch.model.config import ModelConfig
from fastswitch.model.loader import load_model
from fastswitch.model.sampler import Sample, SampleInput, Sampler


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int,
                 block_size: int, seed: int):
        self.cfg, self.dtype, self.device, self.block_size = model_cfg, dtype, device, block_size
        self.model = load_model(model_cfg, dtype, device, max_model_len)
        self.sampler = Sampler(device, seed)

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
        ids, positions, slot_blocks, slot_offsets, sample_index = [], [], [], [], []
        prefills, decode_rows = [], []
        for request, n in batch:
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            first = len(ids)
            ids += request.token_ids[start:end]
            positions += range(start, end)
            slot_blocks += [request.block_ids[p // bs] for p in range(start, end)]
            slot_offsets += [p % bs for p in range(start, end)]
            if end == request.num_tokens:
                sample_index.append(first + n - 1)
            if n == 1:
                decode_rows.append((first, end, request.block_ids[: -(-end // bs)]))
            else:
                prefills.append(self._prefill_seq(first, start, end, request.block_ids))
        meta = AttentionMetadata(
            slot_blocks=self._tensor(slot_blocks),
            slot_offsets=self._tensor(slot_offsets),
            prefills=prefills,
            decodes=self._decode_batch(decode_rows) if decode_rows else None,
        )
        return self._tensor(ids), self._tensor(positions), meta, sample_index

    def _prefill_seq(self, first: int, start: int, end: int, block_ids: list[int]) -> PrefillSeq:
        n = end - start
        if start == 0:
            return PrefillSeq(first, first + n, end, self._tensor([]), mask=None)
        query_pos = torch.arange(start, end).unsqueeze(1)
        mask = torch.arange(end).unsqueeze(0) <= query_pos
        blocks = block_ids[: -(-end // self.block_size)]
        return PrefillSeq(first, first + n, end, self._tensor(blocks), mask.to(self.device))

    def _decode_batch(self, rows: list[tuple[int, int, list[int]]]) -> DecodeBatch:
        width = max(len(blocks) for _, _, blocks in rows)
        tables = [blocks + [0] * (width - len(blocks)) for _, _, blocks in rows]
        context = torch.tensor([end for _, end, _ in rows]).unsqueeze(1)
        mask = torch.arange(width * self.block_size).unsqueeze(0) < context
        return DecodeBatch(
            token_index=self._tensor([first for first, _, _ in rows]),
            block_tables=self._tensor(tables),
            mask=mask[:, None, None, :].to(self.device),
        )

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
