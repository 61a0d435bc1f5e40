"""Paged attention over the block-major KV pool, for a mixed batch of prefill chunks and decodes.

The batch is flat: T tokens from several sequences. Each layer writes its new K/V into the pool at
the tokens' slots, then attends each sequence's queries to that sequence's whole context (cached
tokens plus the new ones). Sequences with one query token (decodes) are attended together in one
padded call; sequences with several (prefills, chunked or not) one at a time. `paged_attention` is
the single entry point, so a fused kernel can replace it on CUDA.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block of each new token's KV
    slot_offsets: torch.Tensor  # [T] offset inside that block
    prefills: list[PrefillSeq]
    decodes: DecodeBatch | None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
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
    meta: AttentionMetadata,
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
