"""The executor on one device: it owns the model runner, the device and host KV pools and the copy
engine between them, and runs each step message (`SchedulerOutput`): its copies in order, then the
forward and the sampler.

Without tensor parallelism the engine core drives one in its own process; with it, each rank's
process runs one over its shard (`executor/multiproc.py`), and the scheduler's block ids mean the
same in every rank's pools, so one copy plan moves every rank's shard.
"""

import logging
import os

import torch

from fastswitch.config import CPU_KV_CACHE_BYTES, EngineConfig
from fastswitch.kv.layout import KVPool
from fastswitch.kv.swap import SwapManager
from fastswitch.messages import ExecutorSpec, Limits, ModelOutput, SchedulerOutput
from fastswitch.model.config import ModelConfig
from fastswitch.model.cpu_features import cpu_dtype
from fastswitch.model.demo import default_model_path
from fastswitch.model.parallel import Shard
from fastswitch.model.runner import ModelRunner
from fastswitch.stats import EngineStats

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Worker:
    def __init__(self, config: EngineConfig, stats: EngineStats, shard: Shard = Shard(),
                 cores: list[int] | None = None):
        if cores is not None:  # before any torch work, so every thread stays on them
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(len(cores))
        self.config, self.stats, self.shard = config, stats, shard
        self.mode = config.swap_mode
        dummy = config.load_format == "dummy"
        self.model = ModelConfig.from_folder(config.model or default_model_path(), need_weights=not dummy)
        shard.check(self.model)
        self.max_model_len = _max_model_len(config, self.model)
        device = torch.device(config.device)
        if device.type == "cuda" and shard.size > 1:
            device = torch.device("cuda", shard.rank)
        self.dtype = _dtype(config.dtype, self.model.torch_dtype, device)
        self.runner = ModelRunner(self.model, self.dtype, device, self.max_model_len, config.block_size, config.seed,
                                  config.attention_backend, dummy, config.max_num_seqs, config.enforce_eager, shard)

    def kv_blocks_fit(self) -> int:
        """Device KV blocks this worker's memory holds (`num_kv_blocks`, else its budget)."""
        return self.config.num_kv_blocks or _blocks_for_budget(self.config, self.model, self.dtype, self.runner)

    def allocate_kv(self, num_blocks: int) -> ExecutorSpec:
        """The device pool of `num_blocks`, the host tier of `swap_space` GiB and the copy engine between them."""
        runner, model, config = self.runner, self.model, self.config
        runner.allocate_kv(num_blocks)
        self.block_bytes = runner.kv.data[0].numel() * runner.kv.data.element_size()
        num_host_blocks = int(config.swap_space * 2**30) // self.block_bytes
        host_kv = KVPool(num_host_blocks, model.num_layers, config.block_size, runner.num_kv_heads, model.head_dim,
                         self.dtype, torch.device("cpu"), host_for=runner.device)
        self.swapper = SwapManager(runner.kv.data, host_kv.data, self.mode, self.stats, config.async_swap)
        ranks = f" x {self.shard.size} ranks" if self.shard.size > 1 else ""
        self.spec = ExecutorSpec(
            Limits(self.max_model_len, model.vocab_size, num_blocks, config.block_size), num_host_blocks,
            self.block_bytes, list(model.eos_token_ids),
            f"{model.arch}, {self.dtype} on {runner.device}{ranks}, {runner.attention.name} attention, {num_blocks} KV "
            f"blocks of {config.block_size} tokens ({num_host_blocks} on the host), context limit {self.max_model_len}")
        return self.spec

    def execute(self, step: SchedulerOutput) -> ModelOutput:
        self.swapper.start(step.copies)
        output = self.runner.execute(step)
        output.finished_copies, output.failed_copies = self.swapper.finished()
        return output

    def synchronous(self, num_blocks: int) -> bool:
        return self.swapper.synchronous(num_blocks)

    def wait(self, copy_id: int) -> bool:
        return self.swapper.wait(copy_id)

    def measure_copy_bandwidth(self) -> float:
        return self.swapper.measure_bandwidth()

    def close(self) -> None:
        self.swapper.close()


def _max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    limit = model.max_position_embeddings
    if model.sliding_window is not None and model.sliding_window < limit:
        log.info("context limited to the sliding window (%d tokens), inside which attention is exact",
                 model.sliding_window)
        limit = model.sliding_window
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's limit of {limit}")
    return config.max_model_len or limit


def _dtype(requested: str, model_dtype: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    return cpu_dtype(DTYPES[model_dtype]) if device.type == "cpu" else DTYPES[model_dtype]


def _blocks_for_budget(config: EngineConfig, model: ModelConfig, dtype: torch.dtype, runner: ModelRunner) -> int:
    budget = config.kv_cache_memory_bytes
    if budget is None and runner.device.type == "cpu":
        budget = CPU_KV_CACHE_BYTES
    elif budget is None:
        budget = _gpu_kv_budget(config, runner)
    per_block = KVPool.bytes_per_block(model.num_layers, config.block_size, runner.num_kv_heads, model.head_dim, dtype)
    if budget < per_block:
        raise ValueError(f"KV cache budget of {budget} bytes holds no block ({per_block} bytes each)")
    return budget // per_block


def _gpu_kv_budget(config: EngineConfig, runner: ModelRunner) -> int:
    """What the engine's share of the GPU leaves after everything in use now (the weights, the CUDA context,
    other processes) and a forward at the full token budget."""
    activations = runner.profile_forward_bytes(config.max_num_batched_tokens, config.max_num_seqs)
    free, total = torch.cuda.mem_get_info(runner.device)
    budget = int(total * config.gpu_memory_utilization) - (total - free) - activations
    log.info("GPU memory: %.1f GiB in all, %.1f GiB in use, %.1f GiB for activations: %.1f GiB for the KV pool "
             "at gpu_memory_utilization=%g", total / 2**30, (total - free) / 2**30, activations / 2**30,
             budget / 2**30, config.gpu_memory_utilization)
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={config.gpu_memory_utilization} leaves no memory for the KV pool: "
                         f"{(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB are in use and a forward needs "
                         f"{activations / 2**30:.1f} GiB; raise it, or lower max_num_batched_tokens")
    return budget
