"""The reference backend, in plain torch: the oracle the kernels are tested against, and the fallback.

Each layer writes its new K/V into the pool at the tokens' slots, then attends. Sequences with one
query token (decodes) are attended together in one call, their blocks gathered and padded to the
longest context; sequences with several (prefills, chunked or not) one at a time with SDPA, over
the gathered prefix with a mask when part of the context is cached.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastswitch.model.attention import StepBatch


@dataclass
class PrefillSeq:
    start: int  # first query token in the flat batch
    end: int
    context_len: int  # tokens attended to, new ones included
    block_ids: torch.Tensor  # blocks holding the context, in order
    mask: torch.Tensor | None  # [q, context_len] causal mask, None when the context is the chunk itself


@dataclass
class DecodeBatch:
    token_index: torch.Tensor  # [B] position of each decode token in the flat batch
    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size], True where a key is in the context


@dataclass
class TorchMetadata:
    slot_blocks: torch.Tensor  # [T] block of each new token's KV
    slot_offsets: torch.Tensor  # [T] offset inside that block
    prefills: list[PrefillSeq]
    decodes: DecodeBatch | None

    def attend(self, q, k, v, k_cache, v_cache, scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, k_cache, v_cache, self, scale)


class TorchAttention:
    name = "torch"

    def __init__(self, device: torch.device):
        self.device = device

    def prepare(self, batch: StepBatch) -> TorchMetadata:
        bs, prefills, decodes = batch.block_size, [], []
        for i, (context, blocks) in enumerate(zip(batch.seq_lens, batch.block_tables)):
            first, end = batch.query_start_loc[i], batch.query_start_loc[i + 1]
            if end - first == 1:
                decodes.append((first, context, blocks))
            else:
                prefills.append(self._prefill_seq(first, end, context, blocks))
        slots = torch.tensor(batch.slot_mapping, dtype=torch.long)
        return TorchMetadata(
            slot_blocks=self._tensor(slots // bs), slot_offsets=self._tensor(slots % bs), prefills=prefills,
            decodes=self._decode_batch(decodes, bs) if decodes else None,
        )

    def _prefill_seq(self, first: int, end: int, context: int, blocks: list[int]) -> PrefillSeq:
        n = end - first
        if context == n:
            return PrefillSeq(first, end, context, self._tensor([]), mask=None)
        query_pos = torch.arange(context - n, context).unsqueeze(1)
        mask = torch.arange(context).unsqueeze(0) <= query_pos
        return PrefillSeq(first, end, context, self._tensor(blocks), mask.to(self.device))

    def _decode_batch(self, rows: list[tuple[int, int, list[int]]], block_size: int) -> DecodeBatch:
        width = max(len(blocks) for _, _, blocks in rows)
        tables = [blocks + [0] * (width - len(blocks)) for _, _, blocks in rows]
        context = torch.tensor([end for _, end, _ in rows]).unsqueeze(1)
        mask = torch.arange(width * block_size).unsqueeze(0) < context
        return DecodeBatch(
            token_index=self._tensor([first for first, _, _ in rows]),
            block_tables=self._tensor(tables),
            mask=mask[:, None, None, :].to(self.device),
        )

    def _tensor(self, values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.long).to(self.device, non_blocking=True)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TorchMetadata):
    """k_cache/v_cache: one layer's [num_blocks, block_size, kv_heads, head_dim] views of the pool."""
    k_cache[meta.slot_blocks, meta.slot_offsets] = k
    v_cache[meta.slot_blocks, meta.slot_offsets] = v


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[..., n] block ids -> [..., n * block_size, kv_heads, head_dim] contiguous keys or values."""
    blocks = cache[block_ids]
    return blocks.flatten(-4, -3)


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim], the new tokens' keys
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: TorchMetadata,
    scale: float,
) -> torch.Tensor:
    write_kv(k_cache, v_cache, k, v, meta)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for seq in meta.prefills:
        qs = q[seq.start : seq.end].transpose(0, 1)
        if seq.mask is None:
            ks, vs = k[seq.start : seq.end], v[seq.start : seq.end]
        else:
            ks = _gather(k_cache, seq.block_ids)[: seq.context_len]
            vs = _gather(v_cache, seq.block_ids)[: seq.context_len]
        o = F.scaled_dot_product_attention(
            qs, ks.transpose(0, 1), vs.transpose(0, 1),
            attn_mask=seq.mask, is_causal=seq.mask is None, scale=scale, enable_gqa=gqa,
        )
        out[seq.start : seq.end] = o.transpose(0, 1)
    if meta.decodes is not None:
        out[meta.decodes.token_index] = _decode_attention(q[meta.decodes.token_index], k_cache, v_cache, meta.decodes, scale)
    return out


def _decode_attention(q: torch.Tensor, k_cache, v_cache, d: DecodeBatch, scale: float) -> torch.Tensor:
    """One query per sequence. Plain batched matmuls: on CPU, several times faster than masked SDPA."""
    batch, heads, head_dim = q.shape
    keys = _gather(k_cache, d.block_tables)  # [B, L, kv_heads, head_dim]
    values = _gather(v_cache, d.block_tables)
    kv_heads = keys.shape[2]
    q = q.view(batch, kv_heads, heads // kv_heads, head_dim)  # query heads grouped by their KV head
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)).float() * scale  # [B, kv_heads, group, L]
    probs = scores.masked_fill(~d.mask, float("-inf")).softmax(dim=-1).to(values.dtype)
    return torch.matmul(probs, values.transpose(1, 2)).view(batch, heads, head_dim)
