"""The parts an engine core is given rather than builds: what runs the model and copies KV, and what
tells the time. Torch-free, so a simulated executor and clock can stand in for the real ones."""

import time
from typing import Protocol

from fastswitch.messages import ExecutorSpec, ModelOutput, SchedulerOutput


class Clock(Protocol):
    def now(self) -> float:
        """Seconds, monotonic."""

    def sleep(self, seconds: float) -> None:
        """Let this much time pass (a simulated clock jumps)."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class ExecutorDied(RuntimeError):
    """The executor cannot go on (a tensor-parallel rank died or failed): the engine must stop."""


class CopyEngine(Protocol):
    """Carries out the KV manager's copy plans (handed over in each step message)."""

    mode: str  # "fastswitch" or "baseline"
    block_bytes: int

    def synchronous(self, num_blocks: int) -> bool:
        """Whether a copy of this size is made on the compute path (so the plan may count it done)."""

    def wait(self, copy_id: int) -> bool:
        """Block until the copy is done, counting the time as stall; False if it failed."""


class Executor(CopyEngine, Protocol):
    """Owns the device: the model, the KV pools of both tiers and the copy engine between them."""

    spec: ExecutorSpec

    def execute(self, step: SchedulerOutput) -> ModelOutput:
        """Start the step's copies in order, then run its forward and sample; the output names the asynchronous
        copies seen done (or failed) since the last step."""

    def close(self) -> None: ...
