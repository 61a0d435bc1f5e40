"""Model-free parts for scheduler tests: the engine core's step with token 1 for a model, a clock the
test moves, and policies by name."""

from fastswitch.config import EngineConfig
from fastswitch.engine.costs import CostModel
from fastswitch.engine.policies import Policy, make_policy
from fastswitch.engine.scheduler import Scheduler
from fastswitch.messages import EngineCoreOutput, ModelOutput, SchedulerOutput


class StepClock:
    """Simulated time: the test moves it."""

    def __init__(self):
        self.t = 0.0

    def now(self) -> float:
        return self.t


def policy_named(name: str, clock: StepClock, costs: CostModel | None = None, **options) -> Policy:
    return make_policy(EngineConfig(policy=name, device="cpu", **options), clock, costs or CostModel())


def execute(scheduler: Scheduler, out: SchedulerOutput) -> list[EngineCoreOutput]:
    """What an executor does with the step: start its copies, sample token 1 wherever a chunk reaches its
    request's end; then hand the tokens and the copies done back, as the engine core does."""
    swapper = scheduler.kv.swapper
    if swapper is not None:
        swapper.start(out.copies)
    samplers = [s.request_id for s in out.scheduled
                if s.num_computed_tokens + s.num_new_tokens == scheduler.requests[s.request_id].num_tokens]
    if swapper is not None:
        scheduler.kv.landed(*swapper.finished())
    return scheduler.update_from_output(out, ModelOutput(samplers, [1] * len(samplers), [None] * len(samplers)))
