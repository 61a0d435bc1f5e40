"""What the simulator knows of a machine and of a model: a hardware profile (compute, memory
bandwidth, fixed costs, the host link) and a model's shape. Built-in ones by name, or from files:
a profile JSON (`fastswitch sim calibrate` writes one) and any Hugging Face config.json.

The built-in GPUs are their data-sheet peaks (dense bf16 tensor FLOP/s, HBM bandwidth, memory) with
the same assumed efficiencies and fixed costs for all; the links are what pinned copies reach on
PCIe 4.0 and 5.0 x16. None is fitted to a measurement: `calibrate` is how a profile is measured.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from fastswitch.model.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Link:
    """One direction each way between device and host memory."""

    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    copy_latency_s: float  # fixed cost of one copy: the launch and the DMA set-up
    inline_copy_bytes: float = 0.0  # copies smaller than this are made on the compute path (CPU: 4 MiB)


LINKS = {
    "pcie4": Link(h2d_bytes_per_s=25e9, d2h_bytes_per_s=25e9, copy_latency_s=5e-6),
    "pcie5": Link(h2d_bytes_per_s=50e9, d2h_bytes_per_s=50e9, copy_latency_s=5e-6),
}


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense, in the model's dtype
    memory_bytes_per_s: float
    memory_bytes: float  # device memory: weights, activations, KV
    link: Link
    flops_efficiency: float = 0.5  # of peak, reached by the model's matmuls and attention
    memory_efficiency: float = 0.8  # of peak bandwidth, reached streaming weights and KV
    step_overhead_s: float = 2e-3  # every iteration: scheduling, input preparation, sampling, launches
    sequence_overhead_s: float = 2e-5  # and per request in the batch
    activation_bytes: float = 2**30  # kept back from the KV pool for activations

    def kv_blocks(self, weight_bytes: int, block_bytes: int, memory_utilization: float) -> int:
        """The device KV pool in blocks: what is left of the engine's share of memory after the weights and
        activations."""
        free = self.memory_bytes * memory_utilization - weight_bytes - self.activation_bytes
        if free < block_bytes:
            raise ValueError(f"{self.name}: {self.memory_bytes / 2**30:.0f} GiB leaves no room for KV after "
                             f"{weight_bytes / 2**30:.1f} GiB of weights")
        return int(free // block_bytes)

    def with_link(self, link: str) -> "Hardware":
        if link not in LINKS:
            raise ValueError(f"unknown link {link!r}; choose from {', '.join(LINKS)}")
        return dataclasses.replace(self, link=LINKS[link])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Hardware":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"measured"}
        if unknown:
            raise ValueError(f"unknown hardware profile fields: {', '.join(sorted(unknown))}")
        fields = {k: v for k, v in data.items() if k in names}
        return cls(**fields | {"link": Link(**fields["link"])})


GiB = 2**30
HARDWARE = {
    "a10": Hardware("a10", peak_flops=125e12, memory_bytes_per_s=600e9, memory_bytes=24 * GiB, link=LINKS["pcie4"]),
    "a100-80g": Hardware("a100-80g", peak_flops=312e12, memory_bytes_per_s=2039e9, memory_bytes=80 * GiB,
                         link=LINKS["pcie4"]),
    "h100": Hardware("h100", peak_flops=989e12, memory_bytes_per_s=3350e9, memory_bytes=80 * GiB, link=LINKS["pcie5"]),
    "h200": Hardware("h200", peak_flops=989e12, memory_bytes_per_s=4800e9, memory_bytes=141 * GiB,
                     link=LINKS["pcie5"]),
}


def load_hardware(name_or_file: str) -> Hardware:
    if name_or_file in HARDWARE:
        return HARDWARE[name_or_file]
    path = Path(name_or_file)
    if not path.is_file():
        raise ValueError(f"--profile: {name_or_file!r} is neither a built-in profile ({', '.join(HARDWARE)}) "
                         "nor a file")
    try:
        return Hardware.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"--profile: {path} is not a hardware profile ({error})") from None


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a step's FLOPs and bytes, and a KV block's size."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tied_embeddings: bool = False
    dtype: str = "bfloat16"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def layer_params(self) -> int:
        """Weights of every layer's matmuls: q, k, v, o and the gated MLP."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.num_layers * (2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size)

    @property
    def head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    @property
    def weight_bytes(self) -> int:
        """Weights held on the device: the layers, the embedding and the LM head (one matrix if tied)."""
        return (self.layer_params + self.head_params * (1 if self.tied_embeddings else 2)) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: str | None = None) -> "ModelShape":
        return cls(Path(config.path).name, config.num_layers, config.hidden_size, config.intermediate_size,
                   config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size,
                   config.max_position_embeddings, config.tie_word_embeddings, dtype or config.torch_dtype)


SHAPES = {
    "llama3-8b": ModelShape("llama3-8b", num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32,
                            num_kv_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192),
    "qwen2.5-32b": ModelShape("qwen2.5-32b", num_layers=64, hidden_size=5120, intermediate_size=27648, num_heads=40,
                              num_kv_heads=8, head_dim=128, vocab_size=152064, max_position_embeddings=32768),
}


def load_shape(name_or_folder: str, dtype: str = "auto") -> ModelShape:
    """A built-in shape by name, or the shape of a model folder's config.json (weights not needed)."""
    shape = SHAPES.get(name_or_folder) or ModelShape.from_config(ModelConfig.from_folder(name_or_folder,
                                                                                         need_weights=False))
    return shape if dtype == "auto" else dataclasses.replace(shape, dtype=dtype)
