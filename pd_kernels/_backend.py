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

Dispatch (:func:`eager`): every op is a registered ``torch.library`` op (fake implementation, opcheck,
``torch.compile``), but a registered Python custom op costs tens of microseconds per call before any work
(its autograd / ADInplaceOrView / dynamo-disable wrappers). So a public op function calls its
implementation directly when nothing above eager execution needs to see the op (plain tensors, no
compilation, no dispatch mode, no functorch transform) and goes through ``torch.ops.pd_kernels.*`` otherwise.
Both paths run the same implementation function.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import warnings

import torch

from ._checks import env_flag, getenv

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
    env = getenv("PD_KERNELS_BACKEND")
    return _check_choice(env) if env else "auto"


@functools.cache
def triton_module(op_module: str):
    """``pd_kernels.ops.triton.<op_module>``, imported on first use (``import pd_kernels`` never needs Triton)
    and cached: an import statement inside the hot path would cost about a microsecond per call."""
    return importlib.import_module(f"pd_kernels.ops.triton.{op_module}")


_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active


def eager(t: torch.Tensor) -> bool:
    """True when an op call on ``t`` (its first tensor argument) may run the op's implementation directly:
    ``t`` is a plain, non-meta tensor, and no ``torch.compile`` trace, ``TorchDispatchMode`` (fake tensors,
    functionalization, user modes) or functorch transform is active. Otherwise the call goes through the
    registered op so that those layers see it. Costs well under a microsecond.

    The direct path skips what only autograd and tracing need from the registered op: it does not bump the
    version counters of the tensors a kernel mutates (ops are inference-only: none has a backward)."""
    return (type(t) is torch.Tensor and not t.is_meta and not _is_compiling() and _dispatch_modes() == 0
            and not _functorch_active())


def triton_interpreter() -> bool:
    return env_flag("TRITON_INTERPRET")


_triton_import_error: str | None = None
_triton_checked = False


def _triton_problem(device: torch.device) -> str | None:
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        try:
            import triton  # noqa: F401
        except Exception as e:  # pragma: no cover - triton is a dependency on Linux
            _triton_import_error = f"Triton is not importable ({e})"
        _triton_checked = True
    if _triton_import_error is not None:
        return _triton_import_error
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
