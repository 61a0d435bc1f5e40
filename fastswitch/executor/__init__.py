"""The device side of the engine: what runs the model and moves KV, behind the `Executor` seam."""

from fastswitch.config import EngineConfig
from fastswitch.interfaces import Executor
from fastswitch.stats import EngineStats


def start_executor(config: EngineConfig, stats: EngineStats) -> Executor:
    """One worker in this process, or (tensor_parallel_size > 1) one process per rank; KV pools sized and made."""
    if config.node_rank != 0:
        raise ValueError(f"node_rank={config.node_rank}: the engine runs on node 0; on the other nodes, "
                         "`fastswitch ranks` runs their ranks")
    if config.tensor_parallel_size > 1:
        from fastswitch.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config, stats)
    from fastswitch.executor.worker import Worker

    worker = Worker(config, stats, cores=config.cpu_set())
    worker.allocate_kv(worker.kv_blocks_fit())
    return worker
