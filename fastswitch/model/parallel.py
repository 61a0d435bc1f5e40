"""Tensor parallelism, Megatron style: which part of each weight a rank holds, and the collectives that join
the parts (over torch.distributed's default group, which the caller creates).

qkv_proj and gate_up_proj are split by output rows (each fused piece separately: a rank's q heads, its k/v
heads, its gate and up rows), o_proj and down_proj by input columns, each followed by one all-reduce;
embed_tokens and the LM head by vocabulary rows, zero-padded to `vocab_rows` per rank. Norms are replicated.
KV heads fewer than the ranks are replicated: rank r holds KV head r // (size // num_kv_heads), the one its
q heads read.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastswitch.model.config import ModelConfig, ModelError


@dataclass(frozen=True)
class Shard:
    """This process's place in a tensor-parallel group: rank `rank` of `size`."""

    rank: int = 0
    size: int = 1

    def check(self, cfg: ModelConfig) -> None:
        size, kv = self.size, cfg.num_kv_heads
        if cfg.num_heads % size:
            raise ModelError(f"tensor_parallel_size={size} does not divide the model's {cfg.num_heads} attention heads")
        if cfg.intermediate_size % size:
            raise ModelError(f"tensor_parallel_size={size} does not divide the model's intermediate size "
                             f"{cfg.intermediate_size}")
        if kv >= size and kv % size:
            raise ModelError(f"tensor_parallel_size={size} does not divide the model's {kv} KV heads")
        if kv < size and size % kv:
            raise ModelError(f"tensor_parallel_size={size} is not a multiple of the model's {kv} KV heads")

    def heads(self, cfg: ModelConfig) -> int:
        return cfg.num_heads // self.size

    def kv_heads(self, cfg: ModelConfig) -> int:
        return max(1, cfg.num_kv_heads // self.size)

    def intermediate_size(self, cfg: ModelConfig) -> int:
        return cfg.intermediate_size // self.size

    def vocab_rows(self, cfg: ModelConfig) -> int:
        return -(-cfg.vocab_size // self.size)

    def part(self, cfg: ModelConfig, name: str, piece: int | None) -> tuple[int, int, int] | None:
        """This rank's part of the whole (TP=1) parameter `name`, or of its fused HF `piece` (qkv_proj: 0 q, 1 k,
        2 v; gate_up_proj: 0 gate, 1 up), as (dim, start, length); None where the rank holds all of it."""
        if self.size == 1 or "norm" in name or name.endswith("o_proj.bias"):  # o_proj's bias: added once, after the sum
            return None
        if name in ("embed_tokens", "lm_head"):
            start = self.rank * self.vocab_rows(cfg)
            return 0, start, max(0, min(self.vocab_rows(cfg), cfg.vocab_size - start))
        if "qkv_proj" in name:
            heads, first = (self.heads(cfg), self.rank * self.heads(cfg)) if piece == 0 else self._kv_part(cfg)
            return 0, first * cfg.head_dim, heads * cfg.head_dim
        if "gate_up_proj" in name:
            return 0, self.rank * self.intermediate_size(cfg), self.intermediate_size(cfg)
        columns = self.heads(cfg) * cfg.head_dim if "o_proj" in name else self.intermediate_size(cfg)  # down_proj
        return 1, self.rank * columns, columns

    def _kv_part(self, cfg: ModelConfig) -> tuple[int, int]:
        """How many KV heads this rank holds, and the first."""
        if cfg.num_kv_heads >= self.size:
            return self.kv_heads(cfg), self.rank * self.kv_heads(cfg)
        return 1, self.rank // (self.size // cfg.num_kv_heads)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's `x`, concatenated along `dim` in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
