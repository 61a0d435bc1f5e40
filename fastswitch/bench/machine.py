"""What a benchmark ran on: CPU model, cores, the vector instructions that decide kernel speed, torch."""

import os
import platform

import torch

from fastswitch.model.cpu_features import cpu_flags

VECTOR_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx512_fp16",
                "amx_tile", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def describe() -> str:
    flags = set(cpu_flags().split())
    vector = " ".join(f for f in VECTOR_FLAGS if f in flags) or "none of " + " ".join(VECTOR_FLAGS)
    return (f"{cpu_model() or platform.machine()}, {os.cpu_count()} cores, CPU flags: {vector}; "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads")
