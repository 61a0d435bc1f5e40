"""Paged attention in Triton, for CUDA: one kernel for decodes, prefills and chunked prefills.

It reads the block-major pool in place through the block table, with the pool's real strides (a
layer's view has a block stride of layers x 2 x block_size x kv_heads x head_dim). A program takes a
tile of query rows of one sequence and one KV head: a few new tokens, each with every query head of
that KV head's group, so a decode reads each KV block once for its whole group. It walks the
sequence's KV blocks with an online softmax, causal inside the new tokens. The new tokens' K/V are
written first, with one indexed copy.

A decode step with too few (sequence, KV head) programs to fill the GPU (a small batch: the long
contexts of a few users) is split: each of SPLITS programs per sequence walks a share of its KV
blocks and writes an unnormalised partial output with its running max and sum, and `_merge_splits`
combines them (flash-decoding). On a CPU it runs only under TRITON_INTERPRET=1, which is how
the tests check it against the torch reference.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastswitch.model.attention import StepBatch

SPLITS = 16  # KV partitions of a decode when the batch alone would leave most of the GPU idle


@triton.jit
def _paged_attention(out_ptr, part_ptr, part_max_ptr, part_sum_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr,
                     query_start_ptr, seq_lens_ptr, scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_pt,
                     stride_ph, stride_ps, stride_mt, stride_mh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                     stride_vh, stride_bt, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEAD_DIM_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                     NUM_SPLITS: tl.constexpr):
    seq, kv_head = tl.program_id(0), tl.program_id(1)
    if NUM_SPLITS > 1:  # a decode: the third axis splits its KV
        chunk, split = 0, tl.program_id(2)
    else:  # the third axis walks the new tokens
        chunk, split = tl.program_id(2), 0
    q_start = tl.load(query_start_ptr + seq)
    n_q = tl.load(query_start_ptr + seq + 1) - q_start
    if chunk * BLOCK_Q < n_q:
        context = tl.load(seq_lens_ptr + seq)
        row = tl.arange(0, BLOCK_M)  # row = (token, query head of this KV head's group)
        token = chunk * BLOCK_Q + row // GROUP
        head = kv_head * GROUP + row % GROUP
        valid = (row < BLOCK_Q * GROUP) & (token < n_q)
        dims = tl.arange(0, HEAD_DIM_POW2)  # tl.arange takes powers of two: a head of 96 is padded to 128
        in_head = dims[None, :] < HEAD_DIM
        q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=valid[:, None] & in_head, other=0.0)
        q_pos = context - n_q + token  # padded rows see the whole context: no row is all masked
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_POW2], tl.float32)
        slots = tl.arange(0, BLOCK_SIZE)
        last_block = (tl.minimum(context, context - n_q + chunk * BLOCK_Q + BLOCK_Q) + BLOCK_SIZE - 1) // BLOCK_SIZE
        per_split = tl.cdiv(last_block, NUM_SPLITS)
        first_block = split * per_split
        for b in range(first_block, tl.minimum(last_block, first_block + per_split)):
            block = tl.load(block_table_ptr + seq * stride_bt + b).to(tl.int64)
            k = tl.load(k_cache_ptr + block * stride_kb + slots[:, None] * stride_ks + kv_head * stride_kh
                        + dims[None, :], mask=in_head, other=0.0)
            v = tl.load(v_cache_ptr + block * stride_vb + slots[:, None] * stride_vs + kv_head * stride_vh
                        + dims[None, :], mask=in_head, other=0.0)
            k_pos = b * BLOCK_SIZE + slots
            s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale  # fp32: no TF32
            s = tl.where((k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < context), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            total = total * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
            m = m_new
        if NUM_SPLITS > 1:  # this split's share, unnormalised, with its running max and sum: _merge_splits
            t = q_start + token
            tl.store(part_ptr + t[:, None] * stride_pt + head[:, None] * stride_ph + split * stride_ps + dims[None, :],
                     acc, mask=valid[:, None] & in_head)
            tl.store(part_max_ptr + t * stride_mt + head * stride_mh + split, m, mask=valid)
            tl.store(part_sum_ptr + t * stride_mt + head * stride_mh + split, total, mask=valid)
        else:
            out = acc / total[:, None]
            tl.store(out_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & in_head)


@triton.jit
def _merge_splits(out_ptr, part_ptr, part_max_ptr, part_sum_ptr, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps,
                  stride_mt, stride_mh, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_POW2: tl.constexpr):
    """One (token, query head): the splits' shares, each rescaled to the overall max, summed and normalised."""
    t, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_POW2)
    in_head = dims < HEAD_DIM
    m = tl.load(part_max_ptr + t * stride_mt + head * stride_mh + splits)
    total = tl.load(part_sum_ptr + t * stride_mt + head * stride_mh + splits)
    acc = tl.load(part_ptr + t * stride_pt + head * stride_ph + splits[:, None] * stride_ps + dims[None, :],
                  mask=in_head[None, :], other=0.0)
    weight = tl.exp(m - tl.max(m, 0))  # an empty split (max -inf) weighs 0
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
    tl.store(out_ptr + t * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=in_head)


def block_rows(group: int, decode_only: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): rows of a program's query tile, and the tokens they cover (each with its GROUP heads).

    tl.dot needs at least 16 rows; a decode has one token, so its tile is the group's heads (padded), and a
    prefill's is larger, for fewer passes over the KV."""
    rows = max(16 if decode_only else 64, triton.next_power_of_2(group))
    return rows, rows // group


def split_below(device: torch.device) -> int:
    """Decodes are split when fewer than this many (sequence, KV head) programs would run: twice the GPU's
    multiprocessors (a CPU, under the interpreter, stands in for a GPU of 64)."""
    return 2 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 64)


@dataclass
class TritonMetadata:
    slot_blocks: torch.Tensor  # int64 [T]
    slot_offsets: torch.Tensor  # int64 [T]
    block_table: torch.Tensor  # int32 [B, max_blocks], padded with 0 (never read past seq_lens)
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    max_query_len: int
    split_below: int  # see split_below()

    def attend(self, q, k, v, k_cache, v_cache, scale: float) -> torch.Tensor:
        k_cache[self.slot_blocks, self.slot_offsets] = k
        v_cache[self.slot_blocks, self.slot_offsets] = v
        out = torch.empty_like(q)
        batch, heads, kv_heads, head_dim = len(self.seq_lens), q.shape[1], k.shape[1], q.shape[2]
        decode_only = self.max_query_len == 1
        block_m, block_q = block_rows(heads // kv_heads, decode_only)
        splits = SPLITS if decode_only and batch * kv_heads < self.split_below else 1
        dims = triton.next_power_of_2(head_dim)
        if splits > 1:  # each split's share of the output, and its running max and sum, per (token, head)
            part = q.new_empty((q.shape[0], heads, splits, dims), dtype=torch.float32)
            part_max, part_sum = (q.new_empty((q.shape[0], heads, splits), dtype=torch.float32) for _ in range(2))
            part_strides, max_strides = part.stride()[:3], part_max.stride()[:2]
        else:  # unused: the kernel writes the output directly
            part = part_max = part_sum = out
            part_strides, max_strides = (0, 0, 0), (0, 0)
        grid = (batch, kv_heads, splits if splits > 1 else triton.cdiv(self.max_query_len, block_q))
        _paged_attention[grid](out, part, part_max, part_sum, q, k_cache, v_cache, self.block_table,
                               self.query_start_loc, self.seq_lens, scale, q.stride(0), q.stride(1), out.stride(0),
                               out.stride(1), *part_strides, *max_strides, k_cache.stride(0), k_cache.stride(1),
                               k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                               self.block_table.stride(0), GROUP=heads // kv_heads, BLOCK_SIZE=k_cache.shape[1],
                               HEAD_DIM=head_dim, HEAD_DIM_POW2=dims, BLOCK_M=block_m, BLOCK_Q=block_q,
                               NUM_SPLITS=splits)
        if splits > 1:
            _merge_splits[(q.shape[0], heads)](out, part, part_max, part_sum, out.stride(0), out.stride(1),
                                               *part_strides, *max_strides, NUM_SPLITS=splits,
                                               HEAD_DIM=head_dim, HEAD_DIM_POW2=dims)
        return out


class TritonAttention:
    name = "triton"

    def __init__(self, device: torch.device):
        self.device, self.split_below = device, split_below(device)

    def prepare(self, batch: StepBatch) -> TritonMetadata:
        slots = torch.tensor(batch.slot_mapping, dtype=torch.long)
        starts = batch.query_start_loc
        to = dict(device=self.device, non_blocking=True)
        return TritonMetadata(
            (slots // batch.block_size).to(**to), (slots % batch.block_size).to(**to),
            batch.padded_block_table().to(**to),
            torch.tensor(starts, dtype=torch.int32).to(**to), torch.tensor(batch.seq_lens, dtype=torch.int32).to(**to),
            max(b - a for a, b in zip(starts, starts[1:])), self.split_below)
