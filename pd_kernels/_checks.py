"""Input validation shared by the ops: metadata only, never a device sync."""
from __future__ import annotations

import os

import torch


def debug_enabled() -> bool:
    """``PD_KERNELS_DEBUG=1`` turns on checks that read device values (they sync with the host)."""
    return os.environ.get("PD_KERNELS_DEBUG", "0") not in ("", "0")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(t, name: str, *, dim: int | None = None, dtypes=None, device=None,
                 last_contig: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all inputs on one device)")
    if last_contig and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dim, got strides {t.stride()}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
