"""Public ops. Each module defines the ``pd_kernels::<op>`` torch.library op(s), the public function
(validation + backend choice) and the list of backends it implements."""
from __future__ import annotations

from typing import Callable

# (qualified name of a C++-declared op, fake implementation); registered once the extension loads.
_CUDA_FAKES: list[tuple[str, Callable]] = []


def cuda_fake(qualname: str):
    """Decorator: fake (meta) implementation for an op whose schema lives in ``csrc/bindings``."""
    def deco(fn):
        _CUDA_FAKES.append((qualname, fn))
        return fn
    return deco


def _register_cuda_fakes() -> None:
    import torch

    for name, fn in _CUDA_FAKES:
        torch.library.register_fake(name, fn)


from .kv_cache import paged_kv_write  # noqa: E402
from .span_attention import span_attention  # noqa: E402
from .unmask import SpanState, commit_spans, token_confidence  # noqa: E402

__all__ = ["paged_kv_write", "span_attention", "token_confidence", "commit_spans", "SpanState"]
