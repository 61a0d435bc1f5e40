"""The engine core: requests in as token ids, then one step at a time: schedule -> execute -> update.

It is given an executor, which owns the device (the model, both tiers' KV pools, the copy engine), and
a clock; `from_config` starts the usual executor for the configuration: one worker in this process,
or one process per tensor-parallel rank. Each step goes to it as one plain-data message with the
copies to make (copies leave the KV manager only that way), and the copies it saw done come back
with the sampled tokens. The core imports nothing that imports torch. `fastswitch serve` runs it in
a process of its own (`engine/core_process.py`); `Engine` and `LLM` run it in theirs.
"""

import logging

from fastswitch.config import EngineConfig
from fastswitch.engine.admission import Admission
from fastswitch.engine.costs import CostModel
from fastswitch.engine.policies import make_policy
from fastswitch.engine.scheduler import Scheduler
from fastswitch.interfaces import Clock, Executor, MonotonicClock
from fastswitch.kv.allocator import runs
from fastswitch.kv.manager import KVManager
from fastswitch.messages import AddRequest, CoreOutputs, SchedulerOutput, Snapshot
from fastswitch.request import Request, Status
from fastswitch.stats import EngineStats

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor, stats: EngineStats, clock: Clock | None = None):
        self.config, self.executor, self.stats = config, executor, stats
        spec = executor.spec
        self.limits, self.description = spec.limits, spec.description
        self.clock = clock or MonotonicClock()
        self.kv = KVManager(spec.limits.num_kv_blocks, spec.num_host_blocks, config.block_size, stats, executor,
                            config.enable_prefix_caching, config.block_groups, config.kv_reuse, self.clock,
                            config.host_write_through, config.host_write_back)
        costs = CostModel(block_bytes=spec.block_bytes, block_size=config.block_size)
        bounds = config.shed_bounds()
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.preemption_mode,
                                   make_policy(config, self.clock, costs), config.thrash_guard,
                                   tuple(spec.eos_token_ids), spec.limits.max_model_len, self.clock, costs,
                                   Admission(config.slo(), bounds) if bounds else None)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "EngineCore":
        """The executor for the configuration on its device(s), with the KV pools sized."""
        from fastswitch.executor import start_executor  # the device side: torch is imported from here on only

        stats = EngineStats()
        executor = start_executor(config, stats)
        core = cls(config, executor, stats)
        if config.preemption_mode == "auto" or config.policy == "slo":
            core.scheduler.costs.copy_bytes_per_s = executor.measure_copy_bandwidth()
        log.info("engine ready: %s", core.description)
        return core

    def add_request(self, add: AddRequest) -> None:
        """Queue a request already validated by the frontend (`engine/inputs.py`)."""
        self.scheduler.add(Request(add.request_id, add.prompt_token_ids, add.params, add.arrival_time, add.priority,
                                   add.user))

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.scheduler.abort(request_id)
        self._flush_if_idle()

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
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> CoreOutputs:
        """One iteration: schedule, start its copies, run the model, and take the sampled tokens back."""
        start = self.clock.now()
        step = self.scheduler.schedule()
        model_start = self.clock.now()
        model = self.executor.execute(step)  # also when nothing runs: it makes the copies, learns who finished
        model_time = self.clock.now() - model_start
        self.kv.landed(model.finished_copies, model.failed_copies)
        refused = self.scheduler.take_refused()
        if not step.scheduled:
            if not refused:
                self.kv.wait_for_copies()  # nothing can run until a copy lands: wait rather than spin
            return CoreOutputs(self.clock.now(), refused)
        outputs = refused + self.scheduler.update_from_output(step, model)  # write-backs go with the next step
        self._flush_if_idle()
        self.scheduler.costs.observe_step(step.num_scheduled_tokens, model_time)
        self.stats.iterations += 1
        self.stats.model_time_s += model_time
        now = self.clock.now()
        self.stats.step_time_s += now - start
        return CoreOutputs(now, outputs)

    def _flush_if_idle(self) -> None:
        """With nothing left to run there is no next step for the planned write-backs: send them alone."""
        if not self.scheduler.has_unfinished() and (copies := self.kv.take_copies()):
            model = self.executor.execute(SchedulerOutput(self.scheduler.iteration, [], [], [], copies, []))
            self.kv.landed(model.finished_copies, model.failed_copies)

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
        try:
            self.kv.drain()
        finally:
            self.executor.close()
