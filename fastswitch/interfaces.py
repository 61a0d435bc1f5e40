"""The parts an engine core is given rather than builds: what runs the model, what copies KV, what
tells the time. Torch-free, so a simulated executor and clock can stand in for the real ones."""

import time
from typing import Protocol

from fastswitch.messages import Copy, ModelOutput, SchedulerOutput


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


class Executor(Protocol):
    def execute(self, step: SchedulerOutput) -> ModelOutput:
        """Run the step's forward (its copies have been started) and sample."""


class CopyEngine(Protocol):
    """Carries out the KV manager's copy plans and says when they are done."""

    mode: str  # "fastswitch" or "baseline"
    block_bytes: int

    def synchronous(self, num_blocks: int) -> bool:
        """Whether a copy of this size is made on the compute path (so the plan may count it done)."""

    def start(self, copies: list[Copy]) -> None:
        """Issue copies in order; a fenced one completes before anything issued after it."""

    def done(self, copy_id: int) -> bool:
        """Never blocks."""

    def wait(self, copy_id: int) -> None:
        """Block until the copy is done, counting the time as stall."""

    def close(self) -> None: ...
