"""Random paged-attention cases over the block-major pool's real strides, for the kernel tests."""

import torch
from hypothesis import strategies as st

from fastswitch.model.attention import StepBatch


def make_case(data, dtype, block_sizes=(1, 4, 8, 16, 32), head_dims=(16, 48, 64, 80, 96, 128, 36),
              groups=(1, 2, 3, 4, 7), max_seqs=5, new_lens=(1, 1, 2, 5, 17, 40, 70),
              cached_lens=(0, 0, 1, 15, 16, 33, 100, 300, 700)):
    """A pool of random K/V, sequences with a cached prefix and a chunk of new tokens, scattered tables."""
    block_size = data.draw(st.sampled_from(block_sizes))
    head_dim = data.draw(st.sampled_from(head_dims))
    kv_heads = data.draw(st.integers(1, 3))
    group = data.draw(st.sampled_from(groups))
    layers, layer = 3, data.draw(st.integers(0, 2))
    num_seqs = data.draw(st.integers(1, max_seqs))
    query_lens, contexts = [], []
    for _ in range(num_seqs):
        new = data.draw(st.sampled_from(new_lens))
        cached = data.draw(st.sampled_from(cached_lens))
        query_lens.append(new)
        contexts.append(cached + new)
    needed = [-(-c // block_size) for c in contexts]
    num_blocks = sum(needed) + data.draw(st.integers(0, 8))
    order = data.draw(st.permutations(range(num_blocks))) if data.draw(st.booleans()) else list(range(num_blocks))
    tables, used = [], 0
    for n in needed:
        tables.append(list(order[used:used + n]))
        used += n
    pool = torch.randn(num_blocks, layers, 2, block_size, kv_heads, head_dim).to(dtype)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (n, c) in enumerate(zip(query_lens, contexts)) for p in range(c - n, c)]
    total = qsl[-1]
    q = torch.randn(total, kv_heads * group, head_dim).to(dtype)
    k = torch.randn(total, kv_heads, head_dim).to(dtype)
    v = torch.randn(total, kv_heads, head_dim).to(dtype)
    batch = StepBatch(qsl, contexts, tables, slots, block_size)
    return pool, layer, q, k, v, batch


def run(backend, pool, layer, q, k, v, batch):
    pool = pool.clone()
    meta = backend.prepare(batch)
    out = meta.attend(q, k, v, pool[:, layer, 0], pool[:, layer, 1], q.shape[-1] ** -0.5)
    return out, pool
