"""The device KV pool in block-major layout: [num_blocks, num_layers, 2, block_size, kv_heads, head_dim].

One block holds K and V of `block_size` tokens for every layer, side by side, so a run of contiguous
blocks is one contiguous byte range: a swap of it is a single copy for the whole model.
"""

import math
import mmap

import torch


class KVPool:
    def __init__(self, num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, host_for: torch.device | None = None):
        """A device pool, or with `host_for` the host tier of that device (pinned when it is a GPU)."""
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
        if host_for is not None:  # only ever read where a swap-out wrote: no need to fill it
            self.data = torch.empty(shape, dtype=dtype, pin_memory=host_for.type == "cuda")
        elif device.type == "cpu":
            self.data = _zeros_on_huge_pages(shape, dtype)
        else:  # zeros: padded attention reads unused slots, and 0 * NaN would poison the output
            self.data = torch.zeros(shape, dtype=dtype, device=device)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (K, V) views shaped [num_blocks, block_size, kv_heads, head_dim]."""
        return [(self.data[:, i, 0], self.data[:, i, 1]) for i in range(self.data.shape[1])]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize


def _zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeroed host memory, on transparent huge pages where the OS allows them: attention reads blocks scattered
    over the whole pool, and with 4 KiB pages each block read would cost a TLB miss and a page walk."""
    size = math.prod(shape) * dtype.itemsize
    if size < 2 << 20 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled by the OS
    buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)  # the tensor keeps the mapping alive
