"""An executor that runs no model: each step advances the simulated clock by its modeled time and
samples a token wherever a chunk reaches its request's last token, as the model runner would."""

from fastswitch.messages import ModelOutput, SchedulerOutput
from fastswitch.sim.clock import SimClock
from fastswitch.sim.cost import StepCost

TOKEN_ID = 100  # what every simulated sample is: replies are forced to their length, so any id does


class CostModelExecutor:
    def __init__(self, cost: StepCost, clock: SimClock):
        self.cost, self.clock = cost, clock
        self.num_tokens: dict[str, int] = {}  # each live request's tokens so far, as the model runner keeps them

    def execute(self, step: SchedulerOutput) -> ModelOutput:
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
        return ModelOutput(samplers, [TOKEN_ID] * len(samplers), [None] * len(samplers))
