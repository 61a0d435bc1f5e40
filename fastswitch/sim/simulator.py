"""The engine with simulated parts: the real `EngineCore` (scheduler, policies, KV manager,
allocators) given a cost-model executor (with a simulated copy engine) and a simulated clock.

The device KV pool is `num_kv_blocks`, else `kv_cache_memory_bytes`, else what
`gpu_memory_utilization` of the hardware's memory leaves after the weights and activations;
the host tier is `swap_space` GiB, as on a real engine.
"""

from fastswitch.config import EngineConfig
from fastswitch.engine.core import EngineCore
from fastswitch.engine.engine import Engine
from fastswitch.messages import ExecutorSpec, Limits
from fastswitch.model.tokenizer import Tokenizer
from fastswitch.sim.clock import SimClock
from fastswitch.sim.copies import SimCopyEngine
from fastswitch.sim.cost import StepCost
from fastswitch.sim.executor import CostModelExecutor
from fastswitch.sim.profiles import Hardware, ModelShape
from fastswitch.stats import EngineStats


def simulated_core(config: EngineConfig, shape: ModelShape, hardware: Hardware) -> EngineCore:
    clock, stats = SimClock(), EngineStats()
    block_bytes = shape.kv_bytes_per_token * config.block_size
    budget = config.kv_cache_memory_bytes
    num_blocks = config.num_kv_blocks or (budget // block_bytes if budget else
                                          hardware.kv_blocks(shape.weight_bytes, block_bytes,
                                                             config.gpu_memory_utilization))
    num_host_blocks = int(config.swap_space * 2**30) // block_bytes
    max_model_len = min(config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings)
    copies = SimCopyEngine(config.swap_mode, block_bytes, shape.num_layers, hardware.link, stats, clock,
                           config.async_swap)
    spec = ExecutorSpec(Limits(max_model_len, shape.vocab_size, num_blocks, config.block_size), num_host_blocks,
                        block_bytes, [], f"simulated {shape.name} ({shape.dtype}) on {hardware.name}: {num_blocks} KV "
                        f"blocks of {config.block_size} tokens ({num_host_blocks} on the host), context limit "
                        f"{max_model_len}")
    core = EngineCore(config, CostModelExecutor(StepCost(shape, hardware), clock, copies, spec), stats, clock)
    core.scheduler.costs.copy_bytes_per_s = copies.round_trip_bytes_per_s  # what the real engine measures
    return core


def simulated_engine(config: EngineConfig, shape: ModelShape, hardware: Hardware, tokenizer: Tokenizer) -> Engine:
    return Engine(config, simulated_core(config, shape, hardware), tokenizer)
