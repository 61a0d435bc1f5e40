"""What the scheduler knows of the engine's speed, measured as it runs: a step, a prefill token, a
copied byte. `auto` preemption weighs swapping against recomputing with it; the `slo` policy
estimates how soon each request could have its next token."""

from dataclasses import dataclass

from fastswitch.request import Request, Status


@dataclass
class CostModel:
    block_bytes: int = 0
    block_size: int = 16
    copy_bytes_per_s: float = 10e9  # replaced by a measurement at start-up
    prefill_tokens_per_s: float = 1000.0  # replaced by measurements as the engine runs
    step_s: float = 0.0  # a step of the model, measured as the engine runs

    def copy_s(self, blocks: int) -> float:
        return blocks * self.block_bytes / self.copy_bytes_per_s

    def recompute_s(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def next_token_s(self, request: Request) -> float:
        """From now until the request could have its next token: its KV copied back if paused, the
        tokens it has no KV for computed (less, before it first starts, the prefix the cache held when
        it arrived), and one step."""
        copy_in = self.copy_s(-(-request.num_computed_tokens // self.block_size))  # at most: the device may cache some
        fresh = request.status == Status.WAITING and not request.num_output_tokens
        reused = request.cached_at_arrival if fresh else request.num_computed_tokens
        to_compute = request.num_tokens - reused - 1
        paused = copy_in if request.status == Status.SWAPPED else 0.0
        return paused + to_compute / self.prefill_tokens_per_s + self.step_s

    def observe_step(self, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        self.step_s = 0.8 * self.step_s + 0.2 * seconds if self.step_s else seconds
        if tokens >= 64:
            self.prefill_tokens_per_s = 0.8 * self.prefill_tokens_per_s + 0.2 * tokens / seconds
