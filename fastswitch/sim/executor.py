"""An executor that runs no model: each step starts its copies on the simulated copy engine, advances
the simulated clock by the step's modeled time and samples a token wherever a chunk reaches its
request's last token, as the model runner would."""

from fastswitch.messages import ExecutorSpec, ModelOutput, SchedulerOutput
from fastswitch.sim.clock import SimClock
from fastswitch.sim.copies import SimCopyEngine
from fastswitch.sim.cost import StepCost

TOKEN_ID = 100  # what every simulated sample is: replies are forced to their length, so any id does


class CostModelExecutor:
    def __init__(self, cost: StepCost, clock: SimClock, copies: SimCopyEngine, spec: ExecutorSpec):
        self.cost, self.clock, self.copies, self.spec = cost, clock, copies, spec
        self.mode, self.block_bytes = copies.mode, copies.block_bytes
        self.num_tokens: dict[str, int] = {}  # each live request's tokens so far, as the model runner keeps them

    def execute(self, step: SchedulerOutput) -> ModelOutput:
        self.copies.start(step.copies)
        for request_id in step.finished_ids:
            self.num_tokens.pop(request_id, None)
        for new in step.new_requests:
            self.num_tokens[new.request_id] = len(new.token_ids)
        batch, samplers = [], []
        for s in step.scheduled:
            samples = s.num_computed_tokens + s.num_new_tokens == self.num_tokens[s.request_id]
            batch.append((s.num_computed_tokens, s.num_new_tokens, samples))
            if samples:
                samplers.append(s.request_id)
                self.num_tokens[s.request_id] += 1
        self.clock.sleep(self.cost.seconds(batch))
        return ModelOutput(samplers, [TOKEN_ID] * len(samplers), [None] * len(samplers), *self.copies.finished())

    def synchronous(self, num_blocks: int) -> bool:
        return self.copies.synchronous(num_blocks)

    def wait(self, copy_id: int) -> bool:
        return self.copies.wait(copy_id)

    def close(self) -> None:
        self.copies.close()
