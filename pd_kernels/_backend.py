"""Backend selection: which implementation of an op runs for a given call.

Every op has up to three implementations:

* ``torch``  - the plain reference in :mod:`pd_kernels.reference` (any device, slow, the semantics);
* ``triton`` - Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``);
* ``cuda``   - the CUDA C++ extension built from ``csrc/`` (CUDA tensors).

The backend is chosen, from strongest to weakest: the ``backend=`` argument of the call, the innermost
``with pd_kernels.use_backend(...)`` block, :func:`set_backend`, the ``PD_KERNELS_BACKEND`` environment
variable, and finally ``"auto"``: on CUDA tensors the CUDA extension if the op has a CUDA kernel and the
extension loads, else Triton; on CPU tensors the torch reference.

Asking explicitly for a backend that cannot run (not implemented for the op, Triton missing, CPU
tensors without the interpreter, extension that fails to build) raises :class:`BackendUnavailable` that
says what is missing. It never silently falls back.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)

# op name -> backends implemented for it. Filled by each op module at import time.
_IMPLEMENTED: dict[str, set[str]] = {}

_state = threading.local()
_process_backend: str | None = None


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on these inputs; the message says why."""


def register_op_backends(op: str, backends: set[str] | tuple[str, ...]) -> None:
    """Declare which backends implement ``op`` (called by the op modules)."""
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r} for op {op!r}")
    _IMPLEMENTED[op] = set(backends)


def implemented_backends(op: str) -> set[str]:
    return set(_IMPLEMENTED.get(op, ()))


def _check_choice(name: str) -> str:
    name = name.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"unknown pd_kernels backend {name!r}; choose one of {_CHOICES}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` returns to ``PD_KERNELS_BACKEND`` / auto)."""
    global _process_backend
    _process_backend = None if name is None else _check_choice(name)


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("triton"): ...`` runs every pd_kernels op in the block on that backend."""
    name = _check_choice(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def current_backend() -> str:
    """The backend a call without ``backend=`` asks for (may be ``"auto"``)."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _process_backend is not None:
        return _process_backend
    env = os.environ.get("PD_KERNELS_BACKEND")
    return _check_choice(env) if env else "auto"


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_problem(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a dependency on Linux
        return f"Triton is not importable ({e})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter():
        return None
    if device.type == "cpu":
        return ("Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "pd_kernels is imported (the Triton interpreter, slow, meant for tests)")
    return f"Triton kernels do not run on device type {device.type!r}"


def _cuda_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors, got tensors on {device.type!r}"
    from . import _cuda_ext

    return _cuda_ext.load_problem()


_warned_auto: set[str] = set()


def resolve(op: str, requested: str | None, device: torch.device) -> str:
    """Return the concrete backend (``torch``/``triton``/``cuda``) that runs ``op`` on ``device``."""
    name = _check_choice(requested) if requested is not None else current_backend()
    impl = _IMPLEMENTED.get(op, set())
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        if "cuda" in impl:
            problem = _cuda_problem(device)
            if problem is None:
                return "cuda"
            if op not in _warned_auto:
                _warned_auto.add(op)
                warnings.warn(f"pd_kernels: CUDA backend unavailable for {op} ({problem}); using Triton",
                              stacklevel=3)
        if "triton" in impl and _triton_problem(device) is None:
            return "triton"
        return "torch"
    if name not in impl:
        raise BackendUnavailable(
            f"pd_kernels.{op} has no {name!r} implementation (implemented: {sorted(impl)})")
    if name == "triton":
        problem = _triton_problem(device)
    elif name == "cuda":
        problem = _cuda_problem(device)
    else:
        problem = None
    if problem is not None:
        raise BackendUnavailable(f"pd_kernels.{op}: backend {name!r} unavailable: {problem}")
    return name
