"""The static inputs a captured decode replays from, checked on a CPU under the Triton interpreter: a
padded step attends and writes K/V exactly as the step itself does, and padding touches only the
scratch block. (Capture and replay themselves need CUDA: tests/test_gpu.py.)"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU
pytest.importorskip("triton")

from fastswitch.model.attention.triton_paged import TritonAttention  # noqa: E402
from fastswitch.model.cuda_graphs import StaticDecodeInputs, bucket_sizes  # noqa: E402
from tests.attention_cases import make_case  # noqa: E402


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_padded_decode_step_attends_and_writes_as_the_step_does(data):
    pool, layer, q, k, v, batch = make_case(data, torch.float32, block_sizes=(16,), head_dims=(16, 32),
                                            groups=(1, 2, 4, 7), new_lens=(1,), cached_lens=(0, 5, 16, 40))
    scratch, n = pool.shape[0], len(batch.seq_lens)
    pool = torch.cat([pool, torch.randn_like(pool[:1])])  # the block no request owns
    size = data.draw(st.integers(n, n + 7), label="bucket")
    width = max(map(len, batch.block_tables)) + data.draw(st.integers(0, 3), label="spare columns")
    inputs = StaticDecodeInputs(size + data.draw(st.integers(0, 4)), width, batch.block_size, scratch,
                                torch.device("cpu"))
    step = TritonAttention(torch.device("cpu"))
    # split or not alike for both (the interpreter runs each of a split decode's 16 programs per row)
    inputs.split_below = step.split_below = data.draw(st.sampled_from([0, 1 << 20]), label="split below")
    inputs.block_table.random_(0, scratch)  # what an earlier, larger step left behind
    inputs.seq_lens.random_(1, 40)
    ids = data.draw(st.lists(st.integers(0, 99), min_size=n, max_size=n))
    inputs.load(ids, [c - 1 for c in batch.seq_lens], batch, size)
    assert inputs.input_ids[:size].tolist() == ids + [0] * (size - n)
    assert inputs.positions[:n].tolist() == [c - 1 for c in batch.seq_lens]

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.randn(size - n, *x.shape[1:])])

    padded_pool, step_pool = pool.clone(), pool.clone()
    got = inputs.metadata(size).attend(pad(q), pad(k), pad(v), padded_pool[:, layer, 0], padded_pool[:, layer, 1],
                                       q.shape[-1] ** -0.5)
    want = step.prepare(batch).attend(q, k, v, step_pool[:, layer, 0], step_pool[:, layer, 1], q.shape[-1] ** -0.5)
    assert torch.equal(got[:n], want)
    assert torch.equal(padded_pool[:scratch], step_pool[:scratch])  # padding wrote to the scratch block alone
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("max_batch", [1, 3, 8, 9, 256])
def test_buckets_cover_every_batch_with_at_most_seven_rows_of_padding(max_batch):
    sizes = bucket_sizes(max_batch)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_batch
    for n in range(1, max_batch + 1):
        assert min(s for s in sizes if s >= n) - n <= 7
