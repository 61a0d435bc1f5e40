"""Decode steps as CUDA graphs: the model's forward captured once per bucketed batch size, then replayed
with each step's inputs copied into static buffers. An eager decode step of an 8B model launches about
500 kernels, each a few microseconds of host time; a replay launches them all at once.

A step of n decodes runs in the smallest captured bucket b >= n. Rows n..b-1 are padding: they
attend to one token of a scratch block that no request owns, and write their K/V there. Steps with
a prefill in them run eagerly.
"""

import torch

from fastswitch.model.attention import StepBatch
from fastswitch.model.attention.triton_paged import TritonMetadata, split_below


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8: a step pads at most 7 rows."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch + 8, 8))
    return [s for s in sizes if s < max_batch] + [max_batch]


class StaticDecodeInputs:
    """The buffers a captured decode reads: token ids, positions and the attention metadata, for up to
    `max_batch` rows, every row at first a padding row."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, block_size: int, scratch_block: int,
                 device: torch.device):
        self.max_batch, self.block_size, self.scratch_block = max_batch, block_size, scratch_block
        self.split_below = split_below(device)
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(max_batch, **long)
        self.positions = torch.zeros(max_batch, **long)
        self.slot_blocks = torch.full((max_batch,), scratch_block, **long)
        self.slot_offsets = torch.zeros(max_batch, **long)
        self.block_table = torch.full((max_batch, max_blocks_per_seq), scratch_block, dtype=torch.int32,
                                      device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)

    def metadata(self, size: int) -> TritonMetadata:
        """Views of the first `size` rows, as the attention kernel reads them."""
        return TritonMetadata(self.slot_blocks[:size], self.slot_offsets[:size], self.block_table[:size],
                              self.query_start_loc[: size + 1], self.seq_lens[:size], 1, self.split_below)

    def load(self, input_ids: list[int], positions: list[int], batch: StepBatch, size: int) -> None:
        """Copy a step of len(input_ids) decodes into the first rows, and make rows up to `size` padding."""
        n, pad = len(input_ids), size - len(input_ids)
        slots = torch.tensor(batch.slot_mapping + [self.scratch_block * self.block_size] * pad)
        table = batch.padded_block_table()
        copy = dict(non_blocking=True)
        self.input_ids[:size].copy_(torch.tensor(input_ids + [0] * pad), **copy)
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad), **copy)
        self.slot_blocks[:size].copy_(slots // self.block_size, **copy)
        self.slot_offsets[:size].copy_(slots % self.block_size, **copy)
        self.block_table[:n, : table.shape[1]].copy_(table, **copy)  # columns past a row's length are never read
        self.block_table[n:size, 0] = self.scratch_block
        self.seq_lens[:size].copy_(torch.tensor(batch.seq_lens + [1] * pad, dtype=torch.int32), **copy)


class DecodeGraphs:
    """One captured forward per bucket size, sharing one memory pool; `run` replays the right one."""

    def __init__(self, model, kv_layers, inputs: StaticDecodeInputs):
        self.model, self.kv_layers, self.inputs = model, kv_layers, inputs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        for size in reversed(bucket_sizes(inputs.max_batch)):  # the largest first: the others fit in its pool
            graph, hidden = self._capture(size, pool)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)

    def fits(self, num_decodes: int) -> bool:
        return num_decodes <= self.inputs.max_batch

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], batch: StepBatch) -> torch.Tensor:
        """The final hidden states of the step's rows ([n, hidden]); valid until the next replay."""
        n = len(input_ids)
        size = min(s for s in self.graphs if s >= n)
        self.inputs.load(input_ids, positions, batch, size)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:n]

    @torch.inference_mode()
    def _capture(self, size: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inputs, meta = self.inputs, self.inputs.metadata(size)

        def forward() -> torch.Tensor:
            return self.model(inputs.input_ids[:size], inputs.positions[:size], self.kv_layers, meta)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
            forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = forward()
        return graph, hidden
