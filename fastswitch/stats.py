"""Engine-wide counters, cumulative since start: what benchmarks and metrics read (torch-free, below every package)."""

from dataclasses import dataclass


@dataclass
class EngineStats:
    iterations: int = 0
    step_time_s: float = 0.0  # wall time inside step()
    model_time_s: float = 0.0  # of which: forward pass and sampling
    computed_tokens: int = 0  # tokens run through the model: prompts, recomputation, decodes
    generated_tokens: int = 0
    swap_preemptions: int = 0  # requests paused by swap
    recompute_preemptions: int = 0  # and by recomputation (fallbacks included)
    swap_out_blocks: int = 0
    swap_in_blocks: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    copies: int = 0  # copy operations issued (per block and layer in baseline mode, per run in fastswitch mode)
    reuse_saved_blocks: int = 0  # blocks a swap-out did not copy: still valid on the host, or cached there by name
    writeback_blocks: int = 0  # finished requests' blocks copied to the host tier for later turns
    prefix_device_hit_blocks: int = 0  # prompt blocks found in the device prefix cache
    prefix_host_hit_blocks: int = 0  # prompt blocks found in the host tier and swapped in instead of prefilled
    resume_device_blocks: int = 0  # blocks a swap-in found still cached on the device: taken back, not copied
    resume_recomputed_tokens: int = 0  # tokens a swap-in found in neither tier: recomputed
    rejected_requests: int = 0  # shed by admission control before their first token
    recompute_fallbacks: int = 0  # swap preemptions turned into recomputation because the host was full
    copy_failures: int = 0  # asynchronous KV copies that failed: what they moved is recomputed
    stall_s: float = 0.0  # time the compute path waited on copies

    def count_copy(self, kind: str, blocks: int, block_bytes: int, operations: int) -> None:
        self.copies += operations
        if kind == "writeback":
            self.writeback_blocks += blocks
        elif kind == "out":
            self.swap_out_blocks += blocks
            self.swap_out_bytes += blocks * block_bytes
        else:
            self.swap_in_blocks += blocks
            self.swap_in_bytes += blocks * block_bytes

    @property
    def preemptions(self) -> int:
        return self.swap_preemptions + self.recompute_preemptions

    @property
    def overhead_per_iteration_s(self) -> float:
        """Engine time outside the model (scheduling, bookkeeping, detokenizing) per iteration."""
        return (self.step_time_s - self.model_time_s) / max(self.iterations, 1)
