"""Model-free parts for scheduler tests: the engine core's step with token 1 for a model, a clock the
test moves, and policies by name."""

from fastswitch.config import EngineConfig
from fastswitch.engine.costs import CostModel
from fastswitch.engine.policies import Policy, make_policy
from fastswitch.engine.scheduler import Scheduler
from fastswitch.kv.prefix import BlockCache
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


def evict_history_wanted_again(cache: BlockCache, wanted: int, evicted: int) -> None:
    """Cache `evicted` named blocks of history, evict them all, then look the first `wanted` of them up."""
    blocks = cache.allocate(evicted)
    names = [f"history {i}".encode() for i in range(evicted)]
    for block, name in zip(blocks, names):
        cache.name(block, name)
    cache.drop(blocks)
    cache.evict(evicted)
    cache.missed(names[:wanted])
