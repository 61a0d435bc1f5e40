"""The CPU backend: `csrc/paged_attention.cpp`, which reads the block-major pool in place.

The kernel is compiled on first use for the machine it runs on (-march=native: AVX-512 where the CPU
has it, else AVX2, else SSE) and cached by torch under its extensions folder, keyed by the CPU's
flags, so a cache built elsewhere is never loaded. `FASTSWITCH_CPU_ISA=avx2` or `sse` builds the
narrower code instead (the tests check every width on a machine that has them). Without a working
compiler it is not there, and 'auto' falls back to the torch reference with one log line.
"""

import hashlib
import logging
import os
import platform
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from fastswitch.model.attention import StepBatch
from fastswitch.model.cpu_features import cpu_flags

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_attention.cpp"
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]  # OpenMP: at::parallel_for is inline
NARROWER = {"native": [], "avx2": ["-mno-avx512f"], "sse": ["-mno-avx512f", "-mno-avx2", "-mno-avx", "-mno-fma"]}


@cache
def load_kernel() -> bool:
    """Builds (first use on this CPU only) and loads the kernel; False, with one log line, if it cannot."""
    from torch.utils import cpp_extension

    isa = os.environ.get("FASTSWITCH_CPU_ISA", "native")
    if isa not in NARROWER:
        raise ValueError(f"FASTSWITCH_CPU_ISA={isa!r}: choose from {', '.join(NARROWER)}")
    tag = hashlib.sha1(f"{cpu_flags() or platform.processor()} {torch.__version__} {isa}".encode()).hexdigest()[:10]
    started = time.perf_counter()
    try:
        cpp_extension.load(f"fastswitch_attention_{tag}", [str(SOURCE)], extra_cflags=CFLAGS + NARROWER[isa],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the reference still works
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("CPU attention kernel unavailable (%s); using the torch reference", reason)
        return False
    log.info("CPU attention kernel ready (%.1f s; compiled for this CPU on first use, then cached)",
             time.perf_counter() - started)
    return True


@dataclass
class CpuMetadata:
    slot_mapping: torch.Tensor  # int64 [T]
    block_table: torch.Tensor  # int32 [B, max_blocks], padded with 0 (never read past seq_lens)
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]

    def attend(self, q, k, v, k_cache, v_cache, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        torch.ops.fastswitch.paged_attention(out, q, k, v, k_cache, v_cache, self.slot_mapping, self.block_table,
                                             self.query_start_loc, self.seq_lens, scale)
        return out


class CpuAttention:
    name = "cpu"

    def prepare(self, batch: StepBatch) -> CpuMetadata:
        return CpuMetadata(
            slot_mapping=torch.tensor(batch.slot_mapping, dtype=torch.long),
            block_table=batch.padded_block_table(),
            query_start_loc=torch.tensor(batch.query_start_loc, dtype=torch.int32),
            seq_lens=torch.tensor(batch.seq_lens, dtype=torch.int32),
        )
