"""Paged attention backends, one per file, behind one seam.

The model runner describes each step's batch once, as flat data (`StepBatch`); the chosen backend
turns it into its own metadata once per step (`prepare`), and every layer calls `meta.attend(...)`,
which writes the new tokens' K/V into the pool at their slots and attends each sequence's queries to
its whole context (cached tokens plus the new ones, causal inside a prefill chunk).

- `torch_ref.py`: the reference in plain torch (gathers the blocks, pads decodes); the oracle and the
  fallback.
- `cpu.py`: a C++ kernel that reads the block-major pool in place through the block table.
- `triton_paged.py`: a Triton kernel for CUDA that does the same (on a CPU only under
  TRITON_INTERPRET=1, for the tests).
"""

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "torch", "triton")


@dataclass
class StepBatch:
    """One step's sequences, in batch order; sequence i owns flat tokens query_start_loc[i]:[i + 1]."""

    query_start_loc: list[int]  # [B + 1]
    seq_lens: list[int]  # [B] tokens attended to, the new ones included
    block_tables: list[list[int]]  # [B] the blocks holding each context, in order
    slot_mapping: list[int]  # [T] block * block_size + offset of each new token's K/V
    block_size: int

    def padded_block_table(self) -> torch.Tensor:
        """int32 [B, max_blocks], padded with block 0 (never read past seq_lens)."""
        width = max(len(t) for t in self.block_tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in self.block_tables], dtype=torch.int32)


def select_backend(name: str, device: torch.device):
    """The backend for `name` on `device`; 'auto' is the CPU kernel on a CPU when it builds, else the reference."""
    from fastswitch.model.attention import cpu, torch_ref

    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"attention backend 'cpu' runs on the CPU, not on {device.type}")
    if name == "triton":
        return _triton(device)
    if name == "torch" or device.type != "cpu":
        return torch_ref.TorchAttention(device)
    if cpu.load_kernel():
        return cpu.CpuAttention()
    if name == "cpu":
        raise RuntimeError("attention backend 'cpu': the kernel could not be built here (see the log)")
    return torch_ref.TorchAttention(device)


def _triton(device: torch.device):
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention backend 'triton' runs on CUDA (on a CPU only under TRITON_INTERPRET=1)")
    try:
        from fastswitch.model.attention.triton_paged import TritonAttention
    except ImportError as e:
        raise ValueError(f"attention backend 'triton' needs the triton package ({e})") from None
    return TritonAttention(device)
