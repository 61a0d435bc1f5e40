"""What the simulator knows of a machine and of a model: a hardware profile (compute, memory
bandwidth, fixed costs, the host link) and a model's shape. Built-in ones by name, or from files:
a profile JSON (`fastswitch sim calibrate` writes one) and any Hugging Face config.json.

None of the built-in profiles is fitted to a measurement (`calibrate` is how a profile is measured).
Where each constant comes from; "assumed" means no source, a round figure for a measurement to replace:

- a10: 125e12 FLOP/s, 600 GB/s, 24 GiB: the A10 data sheet [1] (bf16 tensor 125 TFLOPS dense, 250 with
  sparsity; 600 GB/s; 24 GB GDDR6).
- a100-80g: 312e12, 2,039 GB/s, 80 GiB: the A100 data sheet [2] (bf16 tensor 312 dense; 2,039 GB/s is the
  80GB SXM4's, the PCIe card's is 1,935).
- h100: 989e12, 3,350 GB/s, 80 GiB: the H100 data sheet [3], SXM5 (bf16 tensor 1,979 with sparsity, so 989
  dense; 3.35 TB/s; the PCIe card: 756 dense, 2 TB/s).
- h200: 989e12, 4,800 GB/s, 141 GiB: NVIDIA's H200 page [4], SXM (the H100's compute; 4.8 TB/s; 141 GB HBM3e).
- Memory in GiB where the data sheets say GB: assumed. CUDA reports less: an A10's 24,146,608,128 bytes
  (22.5 GiB) [5], so this A10's KV pool is about 1.4 GiB larger than a real one's at 90%; nvidia-smi's 81,920
  MiB (80 GiB) for an A100 80GB and 81,559 MiB (79.6 GiB) for an H100; 143,771 MiB (140.4 GiB) for an H200 [6].
- pcie4, 25 GB/s each way: pinned copies measured on PCIe 4.0 x16, whose raw rate is 31.5 GB/s per direction
  (16 GT/s x 16 lanes x 128/130 bits): 25.1 GB/s host to device on an A100 with nvbandwidth [7]; "25 GB/s,
  measured peak" [8].
- pcie5, 50 GB/s each way: partly assumed. PCIe 5.0 x16 is 63 GB/s raw per direction; 50 is the same 79% of
  it as pcie4's 25 of 31.5. One H100 machine measured 52.8 GB/s device to host and 35 GB/s host to device
  (nvbandwidth's SM-copy tests) [9].
- copy_latency_s 5 µs per copy (its launch and DMA set-up): assumed.
- flops_efficiency 0.5 and memory_efficiency 0.8 of those peaks, step_overhead_s 2 ms per iteration,
  sequence_overhead_s 20 µs per request, activation_bytes 1 GiB: assumed, the same for every GPU.

[1] https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/datasheet-new/nvidia-a10-datasheet.pdf
[2] https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
[3] https://resources.nvidia.com/en-us-gpu-resources/h100-datasheet-24306
[4] https://www.nvidia.com/en-us/data-center/h200/
[5] https://github.com/mayooot/detect-gpu/issues/3 (NVML's total for an A10)
[6] https://github.com/NVIDIA/cuda-samples/issues/311 (nvidia-smi on an H200)
[7] https://github.com/NVIDIA/nvbandwidth/issues/42 (A100-SXM4, 512 MiB and 1 GiB buffers)
[8] https://github.com/ZaidQureshi/bam/issues/54 (A100, PCIe 4.0 x16)
[9] https://github.com/NVIDIA/nvbandwidth/issues/24 (H100 cluster, memcpy_sm tests)
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from fastswitch.config import CPU_KV_CACHE_BYTES, EngineConfig
from fastswitch.model.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Link:
    """One direction each way between device and host memory."""

    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    copy_latency_s: float  # fixed cost of one copy: the launch and the DMA set-up
    inline_copy_bytes: float = 0.0  # copies smaller than this are made on the compute path (CPU: 4 MiB)


LINKS = {  # sources in the module docstring: pinned-copy measurements on PCIe 4.0 x16; PCIe 5.0 partly assumed
    "pcie4": Link(h2d_bytes_per_s=25e9, d2h_bytes_per_s=25e9, copy_latency_s=5e-6),  # latency: assumed
    "pcie5": Link(h2d_bytes_per_s=50e9, d2h_bytes_per_s=50e9, copy_latency_s=5e-6),
}


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense, in the model's dtype
    memory_bytes_per_s: float
    memory_bytes: float  # device memory: weights, activations, KV
    link: Link
    # The defaults are assumed (no source), the same for every GPU; a calibrated profile measures its own.
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
HARDWARE = {  # data-sheet dense bf16 tensor FLOP/s, bandwidth and memory (read as GiB): the docstring's [1]-[4]
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


def measured_with(name_or_file: str) -> dict | None:
    """What a profile file that `sim calibrate` wrote was measured with (its "measured" block), or None for a
    built-in profile or a file without one."""
    if name_or_file in HARDWARE:
        return None
    measured = json.loads(Path(name_or_file).read_text()).get("measured")
    return measured if isinstance(measured, dict) else None


def sim_defaults(config: EngineConfig, profile: str) -> tuple[EngineConfig, str]:
    """The model `fastswitch sim` simulates, and the engine options, with what a calibrated profile was measured
    with filling in those not given: its model (a folder, or the tiny demo model), its dtype (for that model),
    and, for a CPU, the CPU engine's default KV pool (what `bench run` there takes). With a built-in profile (or
    a file that records no measurement) the model defaults to llama3-8b."""
    load_hardware(profile)  # a bad --profile is reported as such, before anything else
    measured = measured_with(profile)
    if measured is None:
        return config, config.model or "llama3-8b"
    if "model_path" not in measured:
        if config.model:
            return config, config.model
        raise ValueError(f"--profile {profile} does not record the model it was measured with (calibrated by an "
                         "older fastswitch): give --model")
    recorded = measured["model_path"]
    if recorded is None:  # the tiny demo model
        from fastswitch.model.demo import default_model_path

        recorded = str(default_model_path())
    model = config.model or recorded
    if config.dtype == "auto" and measured.get("dtype") and Path(model).resolve() == Path(recorded).resolve():
        config = dataclasses.replace(config, dtype=measured["dtype"])
    if measured.get("device") == "cpu" and config.num_kv_blocks is None and config.kv_cache_memory_bytes is None:
        config = dataclasses.replace(config, kv_cache_memory_bytes=CPU_KV_CACHE_BYTES)
    return config, model


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
