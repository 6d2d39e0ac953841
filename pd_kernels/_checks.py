"""Input validation shared by the ops (metadata only, never a device sync), the environment flags they read on
every call, and the ceiling division they size things with."""
from __future__ import annotations

import os
import sys

import torch


# Environment variables read on every op call (``PD_KERNELS_DEBUG``, ``PD_KERNELS_BACKEND``). ``os.environ.get``
# costs 0.3 us for a set variable and 0.8 us for an unset one (two exceptions inside ``Mapping.get``); reading
# ``_ENV``, the values read so far, costs under 0.1 us. An audit hook (``sys.addaudithook``) keeps ``_ENV`` in
# step with the environment: every change through ``os.environ`` (assignment, ``del``, ``pop``, ``update``,
# ``clear``) goes through ``os.putenv`` / ``os.unsetenv``, which raise the audited events ``os.putenv`` /
# ``os.unsetenv`` with the new value, so the next read from any thread sees it (a first read stores what it read
# with ``setdefault``: a change whose hook ran meanwhile is kept). The hook, installed when pd_kernels is imported,
# costs about 0.15 us per audited event of the process (imports, ``open``, ``sys._getframe``, ...).
_ENV: dict[str, str | None] = {}
_UNREAD = object()


def _env_audit(event: str, args) -> None:
    if event == "os.putenv":
        _ENV[os.fsdecode(args[0])] = os.fsdecode(args[1])
    elif event == "os.unsetenv":
        _ENV[os.fsdecode(args[0])] = None


sys.addaudithook(_env_audit)


def getenv(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, cheaper (under 0.1 us)."""
    v = _ENV.get(name, _UNREAD)
    if v is _UNREAD:
        v = _ENV.setdefault(name, os.environ.get(name))
    return default if v is None else v


def env_flag(name: str) -> bool:
    """True when the variable is set to something other than empty or ``0``."""
    v = _ENV.get(name, _UNREAD)
    if v is _UNREAD:
        v = _ENV.setdefault(name, os.environ.get(name))
    return v is not None and v != "" and v != "0"


def debug_enabled() -> bool:
    """``PD_KERNELS_DEBUG=1`` turns on checks that read device values (they sync with the host)."""
    return env_flag("PD_KERNELS_DEBUG")


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
    if last_contig and t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a unit stride in its last dim, got strides {t.stride()}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def memory_span(t: torch.Tensor) -> tuple[int, int]:
    """``[first byte, last byte + 1)`` a non-empty tensor (non-negative strides) may touch. Reads the data
    pointer: real tensors only (the eager path or an op's implementation, never a traced call)."""
    p = t.data_ptr()
    if t.is_contiguous():
        return p, p + t.nbytes
    return p, p + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges of two tensors (:func:`memory_span`) intersect; False when either is empty.
    Exact for contiguous tensors, conservative otherwise (interleaved views count as sharing)."""
    if a.is_contiguous() and b.is_contiguous():   # the common case, kept cheap (an empty one has 0 bytes)
        pa, pb = a.data_ptr(), b.data_ptr()
        return pa < pb + b.nbytes and pb < pa + a.nbytes
    if not (a.numel() and b.numel()):
        return False
    (a0, a1), (b0, b1) = memory_span(a), memory_span(b)
    return a0 < b1 and b0 < a1


def internal_overlap(t: torch.Tensor) -> bool:
    """Whether some elements of ``t`` share memory (an expanded view, stride 0)."""
    return not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, ``b > 0``."""
    return -(-a // b)
