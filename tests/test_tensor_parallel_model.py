"""The model's tensor-parallel shards, in two gloo processes on the CPU, compute what the whole model does."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastswitch.kv.layout import KVPool
from fastswitch.model.attention import StepBatch
from fastswitch.model.attention.torch_ref import TorchAttention
from fastswitch.model.config import ModelConfig, ModelError
from fastswitch.model.demo import write_demo_model
from fastswitch.model.loader import load_model
from fastswitch.model.parallel import Shard
from tests.conftest import MODELS

CPU = torch.device("cpu")
BLOCK = 16
# llama-mqa: 1 KV head for 2 ranks; llama-bias: biases on q/k/v and o_proj (dummy weights only: demo.py writes none)
CASES = [(model, dummy) for model in MODELS for dummy in (False, True)] + [("llama-bias", True)]


def _batch(chunks) -> tuple[torch.Tensor, torch.Tensor, StepBatch]:
    """One step: per sequence, (its new token ids, the position of the first, its blocks)."""
    ids, positions, slots, query_start_loc, seq_lens, tables = [], [], [], [0], [], []
    for tokens, start, blocks in chunks:
        end = start + len(tokens)
        ids += tokens
        positions += range(start, end)
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
        query_start_loc.append(len(ids))
        seq_lens.append(end)
        tables.append(blocks[: -(-end // BLOCK)])
    return torch.tensor(ids), torch.tensor(positions), StepBatch(query_start_loc, seq_lens, tables, slots, BLOCK)


@torch.inference_mode()
def _run(path: str, dummy: bool, shard: Shard) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(final hidden states, logits) of a prefill of two prompts, then of a decode step of both."""
    cfg = ModelConfig.from_folder(path, need_weights=not dummy)
    model = load_model(cfg, torch.float32, CPU, 64, dummy=dummy, shard=shard)
    kv = KVPool(4, cfg.num_layers, BLOCK, shard.kv_heads(cfg), cfg.head_dim, torch.float32, CPU)
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in (17, 30))
    steps = [[(first, 0, [0, 1]), (second, 0, [2, 3])], [([5], 17, [0, 1]), ([7], 30, [2, 3])]]
    attention, outputs = TorchAttention(CPU), []
    for step in steps:
        ids, positions, batch = _batch(step)
        hidden = model(ids, positions, kv.layers(), attention.prepare(batch))
        outputs.append((hidden, model.compute_logits(hidden)))
    return outputs


def _worker(rank: int, init_method: str, dirs: dict[str, str], out: str):
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    results = {case: _run(dirs[case[0]], case[1], Shard(rank, 2)) for case in CASES}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dirs(model_dirs, tmp_path_factory):
    biased = write_demo_model(tmp_path_factory.mktemp("llama-bias"), weights=False, attention_bias=True)
    return {**model_dirs, "llama-bias": str(biased)}


@pytest.fixture(scope="module")
def tp2(dirs, tmp_path_factory):
    """Every case's outputs on each of two ranks."""
    out = tmp_path_factory.mktemp("tp2")
    mp.spawn(_worker, args=(f"file://{out}/rendezvous", dirs, str(out)), nprocs=2)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("model,dummy", CASES)
def test_two_ranks_compute_what_one_does(model, dummy, dirs, tp2):
    expected = _run(dirs[model], dummy, Shard())
    for rank, results in enumerate(tp2):
        for (hidden, logits), (want_hidden, want_logits) in zip(results[model, dummy], expected):
            assert logits.shape == want_logits.shape and logits.dtype == torch.float32
            torch.testing.assert_close(hidden, want_hidden, atol=1e-4, rtol=1e-4, msg=f"rank {rank}")
            torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4, msg=f"rank {rank}")
            assert torch.equal(logits.argmax(-1), want_logits.argmax(-1))


def test_shard_counts(model_dirs):
    cfg = ModelConfig.from_folder(model_dirs["llama"])  # 4 heads, 2 KV heads of 64, intermediate size 512
    assert [(Shard(r, 4).heads(cfg), Shard(r, 4).kv_heads(cfg)) for r in range(4)] == [(1, 1)] * 4
    # fewer KV heads than ranks: ranks 2 and 3 both hold KV head 1, which their q heads 2 and 3 read
    assert [Shard(r, 4).part(cfg, "layers.0.self_attn.qkv_proj.weight", 1) for r in range(4)] == \
        [(0, 0, 64), (0, 0, 64), (0, 64, 64), (0, 64, 64)]
    assert Shard(1, 3).part(cfg, "embed_tokens", None) == (0, 1366, 1366)
    assert Shard(2, 3).part(cfg, "embed_tokens", None) == (0, 2732, 1364)  # the last rank's 2 rows are padding
    assert Shard(1, 2).part(cfg, "layers.0.mlp.down_proj.weight", None) == (1, 256, 256)
    assert Shard().part(cfg, "layers.0.mlp.down_proj.weight", None) is None


@pytest.mark.parametrize("size,change,message", [
    (3, {}, "tensor_parallel_size=3 does not divide the model's 4 attention heads"),
    (2, dict(intermediate_size=513), "tensor_parallel_size=2 does not divide the model's intermediate size 513"),
    (4, dict(num_heads=8, num_kv_heads=6), "tensor_parallel_size=4 does not divide the model's 6 KV heads"),
    (4, dict(num_kv_heads=3), "tensor_parallel_size=4 is not a multiple of the model's 3 KV heads"),
])
def test_sizes_that_do_not_fit_the_model_are_refused(size, change, message, model_dirs):
    cfg = dataclasses.replace(ModelConfig.from_folder(model_dirs["llama"]), **change)
    with pytest.raises(ModelError, match=message):
        Shard(0, size).check(cfg)
