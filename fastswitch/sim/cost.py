"""The modeled time of one iteration on a device, from its batch.

Two kernel families, each a roofline (the slower of its FLOPs at the effective FLOP rate and its
bytes at the effective memory bandwidth), one after the other, plus fixed costs:

- dense: every layer's matmuls over the step's tokens and the LM head over the sampled ones; the
  weights are read once per step;
- attention: each new token against its context, causal inside a chunk; each request's whole
  context of KV is read once;
- overhead: per iteration, and per request in the batch.

Not modeled: activations' memory traffic, norms, RoPE, sampling's own FLOPs, kernel fusion, tensor
parallelism, and copies slowing compute down (they share neither FLOPs nor, here, HBM bandwidth).
"""

from collections.abc import Iterable

from fastswitch.sim.profiles import Hardware, ModelShape


class StepCost:
    def __init__(self, shape: ModelShape, hardware: Hardware):
        self.shape, self.hardware = shape, hardware
        flops = hardware.peak_flops * hardware.flops_efficiency
        bandwidth = hardware.memory_bytes_per_s * hardware.memory_efficiency
        self._token_s = 2 * shape.layer_params / flops
        self._sample_s = 2 * shape.head_params / flops
        self._weights_s = (shape.layer_params + shape.head_params) * shape.dtype_bytes / bandwidth
        self._pair_s = 4 * shape.num_layers * shape.num_heads * shape.head_dim / flops  # one query-key pair, QK and PV
        self._kv_token_s = shape.kv_bytes_per_token / bandwidth

    def seconds(self, batch: Iterable[tuple[int, int, bool]]) -> float:
        """(tokens with KV already, new tokens, whether it samples) for each request in the step."""
        requests = tokens = sampled = pairs = context = 0
        for computed, new, samples in batch:
            requests += 1
            tokens += new
            sampled += samples
            pairs += new * computed + new * (new + 1) // 2
            context += computed + new
        if not requests:
            return 0.0
        hw = self.hardware
        dense = max(tokens * self._token_s + sampled * self._sample_s, self._weights_s)
        attention = max(pairs * self._pair_s, context * self._kv_token_s)
        return dense + attention + hw.step_overhead_s + requests * hw.sequence_overhead_s
