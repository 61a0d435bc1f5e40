"""What this CPU can do, read at run time: kernels and dtypes are chosen by it, never assumed."""

import logging
import platform

import torch

log = logging.getLogger(__name__)
NATIVE = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def cpu_flags() -> str:
    """The flags line of /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def cpu_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype to run a model stored in `model_dtype` on this CPU: half precision only where the CPU computes
    it natively, as oneDNN's matmuls emulate it otherwise (several times slower than fp32)."""
    if model_dtype not in NATIVE:
        return model_dtype
    flags = set(cpu_flags().split())
    if any(f in flags for f in NATIVE[model_dtype]) or platform.machine() not in ("x86_64", "AMD64"):
        log.info("dtype auto: %s, which this CPU computes natively", model_dtype)
        return model_dtype
    log.info("dtype auto: float32, as this CPU has no native %s (none of %s); KV takes twice the memory",
             model_dtype, ", ".join(NATIVE[model_dtype]))
    return torch.float32
