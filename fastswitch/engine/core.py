"""The engine core: requests in as token ids, then one step at a time: schedule -> execute -> update.

It is given its parts (an executor, a copy engine, a clock); `from_config` builds the usual ones:
the model runner on the configured device and the swap manager between the device and host pools.
`fastswitch serve` runs it in a process of its own (`engine/core_process.py`); `Engine` and `LLM`
run it in theirs.
"""

import logging
import os

import torch

from fastswitch.config import CPU_KV_CACHE_BYTES, DTYPES, EngineConfig
from fastswitch.engine.admission import Admission
from fastswitch.engine.costs import CostModel
from fastswitch.engine.policies import make_policy
from fastswitch.engine.scheduler import Scheduler
from fastswitch.interfaces import Clock, CopyEngine, Executor, MonotonicClock
from fastswitch.kv.allocator import runs
from fastswitch.kv.layout import KVPool
from fastswitch.kv.manager import KVManager
from fastswitch.kv.swap import SwapManager
from fastswitch.messages import AddRequest, CoreOutputs, Limits, Snapshot
from fastswitch.model.config import ModelConfig
from fastswitch.model.cpu_features import cpu_dtype
from fastswitch.model.demo import default_model_path
from fastswitch.model.runner import ModelRunner
from fastswitch.request import Request, Status
from fastswitch.stats import EngineStats

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor, swapper: CopyEngine, stats: EngineStats,
                 limits: Limits, num_host_blocks: int, eos_token_ids: tuple[int, ...], clock: Clock | None = None):
        self.config, self.executor, self.swapper, self.stats, self.limits = config, executor, swapper, stats, limits
        self.clock = clock or MonotonicClock()
        self.description = ""  # for the log: model, dtype, device, attention, KV blocks
        self.kv = KVManager(limits.num_kv_blocks, num_host_blocks, config.block_size, stats, swapper,
                            config.enable_prefix_caching, config.block_groups, config.kv_reuse, self.clock,
                            config.host_write_through, config.host_write_back)
        costs = CostModel(block_bytes=swapper.block_bytes, block_size=config.block_size)
        bounds = config.shed_bounds()
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.preemption_mode,
                                   make_policy(config, self.clock, costs), config.thrash_guard, eos_token_ids,
                                   limits.max_model_len, self.clock, costs,
                                   Admission(config.slo(), bounds) if bounds else None)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "EngineCore":
        """The model runner and the swap manager on the configured device, with the KV pools sized."""
        if (cores := config.cpu_set()) is not None:  # before any torch work, so every thread stays on them
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(len(cores))
        dummy = config.load_format == "dummy"
        model = ModelConfig.from_folder(config.model or default_model_path(), need_weights=not dummy)
        max_model_len = _max_model_len(config, model)
        device = torch.device(config.device)
        dtype = _dtype(config.dtype, model.torch_dtype, device)
        runner = ModelRunner(model, dtype, device, max_model_len, config.block_size, config.seed,
                             config.attention_backend, dummy, config.max_num_seqs, config.enforce_eager)
        num_blocks = config.num_kv_blocks or _blocks_for_budget(config, model, dtype, runner)
        runner.allocate_kv(num_blocks)
        stats = EngineStats()
        per_block = runner.kv.data[0].numel() * runner.kv.data.element_size()
        num_host_blocks = int(config.swap_space * 2**30) // per_block
        host_kv = KVPool(num_host_blocks, model.num_layers, config.block_size, model.num_kv_heads, model.head_dim,
                         dtype, torch.device("cpu"), host_for=device)
        swapper = SwapManager(runner.kv.data, host_kv.data, config.swap_mode, stats, config.async_swap)
        limits = Limits(max_model_len, model.vocab_size, num_blocks, config.block_size)
        core = cls(config, runner, swapper, stats, limits, num_host_blocks, model.eos_token_ids)
        if config.preemption_mode == "auto" or config.policy == "slo":
            core.scheduler.costs.copy_bytes_per_s = swapper.measure_bandwidth()
        core.description = (f"{model.arch}, {dtype} on {device}, {runner.attention.name} attention, {num_blocks} KV "
                            f"blocks of {config.block_size} tokens ({num_host_blocks} on the host), context limit "
                            f"{max_model_len}")
        log.info("engine ready: %s", core.description)
        return core

    def add_request(self, add: AddRequest) -> None:
        """Queue a request already validated by the frontend (`engine/inputs.py`)."""
        self.scheduler.add(Request(add.request_id, add.prompt_token_ids, add.params, add.arrival_time, add.priority,
                                   add.user))

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.scheduler.abort(request_id)
        self.swapper.start(self.kv.take_copies())  # write-backs of what the aborted requests had computed

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a queued or running request's priority (lower is served first); False if it is not here."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"invalid priority {priority!r}: must be an integer")
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            request.priority = priority
        return request is not None

    def preempt(self, request_id: str, mode: str | None = None) -> bool:
        """Pause a running request now (by swap or recompute; default: preemption_mode).

        False if it is not running, or its KV is still being copied in."""
        request = self.scheduler.requests.get(request_id)
        if request is None or request.status != Status.RUNNING or not self.kv.ready(request):
            return False
        self.scheduler.preempt(request, mode)
        self.swapper.start(self.kv.take_copies())
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> CoreOutputs:
        """One iteration: schedule, start its copies, run the model, and take the sampled tokens back."""
        start = self.clock.now()
        step = self.scheduler.schedule()
        self.swapper.start(step.copies)
        model_start = self.clock.now()
        model = self.executor.execute(step)  # also when nothing runs: it learns who finished
        model_time = self.clock.now() - model_start
        refused = self.scheduler.take_refused()
        if not step.scheduled:
            if not refused:
                self.kv.wait_for_copies()  # nothing can run until a copy lands: wait rather than spin
            return CoreOutputs(self.clock.now(), refused)
        outputs = refused + self.scheduler.update_from_output(step, model)
        self.swapper.start(self.kv.take_copies())  # write-backs of the requests that just finished
        self.scheduler.costs.observe_step(step.num_scheduled_tokens, model_time)
        self.stats.iterations += 1
        self.stats.model_time_s += model_time
        now = self.clock.now()
        self.stats.step_time_s += now - start
        return CoreOutputs(now, outputs)

    def snapshot(self) -> Snapshot:
        kv, scheduler = self.kv, self.scheduler
        counters = getattr(scheduler.policy, "counters", None)
        return Snapshot(self.stats, len(scheduler.running), len(scheduler.waiting), len(scheduler.swapped),
                        1 - kv.device.num_available / max(kv.num_blocks, 1),
                        1 - kv.host.num_available / max(kv.host.allocator.num_blocks, 1),
                        None if counters is None else dict(counters))

    def kv_stats(self) -> dict:
        """The KV pools now: free and cached blocks, the largest free group, and contiguity (groups per
        running request, 1 is perfectly contiguous)."""
        running = self.scheduler.running
        return {
            "device_blocks": self.kv.num_blocks,
            "device_free_blocks": self.kv.device.allocator.num_free,
            "device_cached_blocks": len(self.kv.device.lru),
            "device_largest_free_group": self.kv.device.allocator.largest_free_group(),
            "host_blocks": self.kv.host.allocator.num_blocks,
            "host_free_blocks": self.kv.host.allocator.num_free,
            "host_cached_blocks": len(self.kv.host.lru),
            "groups_per_request": sum(runs(r.block_ids) for r in running) / len(running) if running else 0.0,
        }

    def close(self) -> None:
        self.kv.drain()
        self.swapper.start(self.kv.take_copies())
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
    per_block = KVPool.bytes_per_block(model.num_layers, config.block_size, model.num_kv_heads, model.head_dim, dtype)
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
