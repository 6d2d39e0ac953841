"""Triton kernels. Imported lazily by the op modules so that ``import pd_kernels`` never needs Triton."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); the grid-size heuristics target it.

    For CPU tensors (the interpreter) a small stand-in, 2, keeps tests fast while still exercising the
    split paths where a kernel has them."""
    if device.type != "cuda":
        return 2
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
