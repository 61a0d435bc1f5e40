"""Paged attention in Triton, for CUDA: one kernel for decodes, prefills and chunked prefills.

It reads the block-major pool in place through the block table, with the pool's real strides (a
layer's view has a block stride of layers x 2 x block_size x kv_heads x head_dim). A program takes
BLOCK_M query tokens of one sequence and one query head, and walks the sequence's KV blocks with an
online softmax, causal inside the new tokens. The new tokens' K/V are written first, with one
indexed copy. On a CPU it runs only under TRITON_INTERPRET=1, which is how the tests check it
against the torch reference.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastswitch.model.attention import StepBatch

BLOCK_M = 16  # query tokens per program; tl.dot needs at least 16


@triton.jit
def _paged_attention(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, query_start_ptr, seq_lens_ptr, scale,
                     stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                     stride_vh, stride_bt, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    seq, head, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    n_q = tl.load(query_start_ptr + seq + 1) - q_start
    if chunk * BLOCK_M < n_q:
        context = tl.load(seq_lens_ptr + seq)
        kv_head = head // GROUP
        rows = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
                    mask=rows[:, None] < n_q, other=0.0)
        q_pos = context - n_q + rows  # padded rows see the whole context: no row is all masked
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        slots = tl.arange(0, BLOCK_SIZE)
        last_block = (tl.minimum(context, context - n_q + chunk * BLOCK_M + BLOCK_M) + BLOCK_SIZE - 1) // BLOCK_SIZE
        for b in range(0, last_block):
            block = tl.load(block_table_ptr + seq * stride_bt + b).to(tl.int64)
            k = tl.load(k_cache_ptr + block * stride_kb + slots[:, None] * stride_ks + kv_head * stride_kh
                        + dims[None, :])
            v = tl.load(v_cache_ptr + block * stride_vb + slots[:, None] * stride_vs + kv_head * stride_vh
                        + dims[None, :])
            k_pos = b * BLOCK_SIZE + slots
            s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale  # fp32: no TF32
            s = tl.where((k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < context), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            total = total * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
            m = m_new
        out = acc / total[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rows[:, None] < n_q)


@dataclass
class TritonMetadata:
    slot_blocks: torch.Tensor  # int64 [T]
    slot_offsets: torch.Tensor  # int64 [T]
    block_table: torch.Tensor  # int32 [B, max_blocks], padded with 0 (never read past seq_lens)
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    max_query_len: int

    def attend(self, q, k, v, k_cache, v_cache, scale: float) -> torch.Tensor:
        k_cache[self.slot_blocks, self.slot_offsets] = k
        v_cache[self.slot_blocks, self.slot_offsets] = v
        out = torch.empty_like(q)
        batch, heads, head_dim = len(self.seq_lens), q.shape[1], q.shape[2]
        grid = (batch, heads, triton.cdiv(self.max_query_len, BLOCK_M))
        _paged_attention[grid](out, q, k_cache, v_cache, self.block_table, self.query_start_loc, self.seq_lens, scale,
                               q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
                               k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
                               v_cache.stride(2), self.block_table.stride(0), GROUP=heads // k.shape[1],
                               BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_M=BLOCK_M)
        return out


class TritonAttention:
    name = "triton"

    def __init__(self, device: torch.device):
        self.device = device

    def prepare(self, batch: StepBatch) -> TritonMetadata:
        slots = torch.tensor(batch.slot_mapping, dtype=torch.long)
        starts = batch.query_start_loc
        to = dict(device=self.device, non_blocking=True)
        return TritonMetadata(
            (slots // batch.block_size).to(**to), (slots % batch.block_size).to(**to),
            batch.padded_block_table().to(**to),
            torch.tensor(starts, dtype=torch.int32).to(**to), torch.tensor(batch.seq_lens, dtype=torch.int32).to(**to),
            max(b - a for a, b in zip(starts, starts[1:])))
