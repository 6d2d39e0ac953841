"""``pd_kernels::token_confidence``: choose a token per masked position and its confidence, in one read of the
logits, on the device, with no host sync (SPEC section 5). :func:`pd_kernels.commit_spans` then commits some of
them per span; a diffusion step is::

    token, conf = token_confidence(logits[mask_rows], confidence="prob")      # one read of the logits
    committed, all_done = commit_spans(token, conf, row_dst, span_rows, seq, state, policy="pd_threshold")

Semantics, tie rules and edge cases (NaN, -inf, suppressed ids) are those of
:mod:`pd_kernels.reference.token_confidence`.
"""
from __future__ import annotations

from numbers import Real
from typing import Optional

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, check, check_tensor, share_memory
from ..reference.token_confidence import (CONFIDENCE_KIND_ID, CONFIDENCE_KINDS, filter_threshold,
                                          token_confidence_ref)
from .._cuda_ext import cuda_fake

OP_TC = "token_confidence"
_backend.register_op_backends(OP_TC, ("torch", "triton", "cuda"))


def _token_confidence_impl(logits: torch.Tensor, token: torch.Tensor, conf: torch.Tensor,
                           suppress_ids: Optional[torch.Tensor], seed_t: Optional[torch.Tensor],
                           offset_t: Optional[torch.Tensor], threshold: Optional[torch.Tensor], seed: int,
                           offset: int, kind: str, temperature: float, backend: str) -> None:
    if backend == "triton":
        _backend.triton_module("token_confidence").token_confidence_triton(
            logits, token, conf, suppress_ids, seed_t, offset_t, threshold, seed, offset, kind, temperature)
    elif backend == "cuda":
        torch.ops.pd_kernels.token_confidence_cuda(logits, token, conf, suppress_ids, seed_t, offset_t, threshold,
                                                   seed, offset, CONFIDENCE_KIND_ID[kind], temperature)
    elif backend == "torch":
        t, c = token_confidence_ref(logits, kind, temperature, seed if seed_t is None else seed_t,
                                    offset if offset_t is None else offset_t, suppress_ids, threshold=threshold)
        token.copy_(t)
        conf.copy_(c)
    else:
        raise ValueError(f"unknown backend {backend!r}")


_tc_op = torch.library.custom_op("pd_kernels::token_confidence", _token_confidence_impl, mutates_args=("token", "conf"))


@_tc_op.register_fake
def _(logits, token, conf, suppress_ids, seed_t, offset_t, threshold, seed, offset, kind, temperature, backend):
    return None


@cuda_fake("pd_kernels::token_confidence_cuda")
def _(logits, token, conf, suppress_ids, seed_t, offset_t, threshold, seed, offset, kind, temperature):
    return None


_I64 = torch.int64
_F32 = torch.float32
_SUP_DTYPES = (torch.int32, torch.int64)


def _key(t, name: str, N: int, dev: torch.device, one_ok: bool) -> tuple[torch.Tensor, int]:
    """A seed / offset given as a tensor: int64, on ``dev``, 1-D contiguous with N entries (or 1 where
    ``one_ok``); returned with 0 for the int form. Anything else raises, naming the argument."""
    if not isinstance(t, torch.Tensor):
        forms = "an int64 tensor ([1] or [N])" if one_ok else "an int64 tensor [N]"
        raise ValueError(f"{name} must be an int in [0, 2^63) or {forms}, got {t!r}")
    if t.dtype != _I64:
        raise TypeError(f"{name} tensor must be int64, got {t.dtype}")
    if t.device != dev:
        raise ValueError(f"{name} is on {t.device}, expected {dev} (all inputs on one device)")
    n = t.numel()
    if not (n == N or (one_ok and n == 1)) or t.dim() > 1:
        want = f"[{N}] (one per row)" + (" or one element (offset + row)" if one_ok else "")
        raise ValueError(f"{name} tensor must have shape {want}, got {tuple(t.shape)}")
    if t.dim() == 0:
        t = t.reshape(1)
    return (t if t.is_contiguous() else t.contiguous()), 0


def _check_suppress(suppress_ids, dev: torch.device) -> None:
    if not isinstance(suppress_ids, torch.Tensor) or suppress_ids.dim() != 1:
        raise ValueError("suppress_ids must be a 1-D tensor of ids")
    if suppress_ids.dtype not in _SUP_DTYPES:
        raise TypeError(f"suppress_ids must be int32 or int64, got {suppress_ids.dtype}")
    if suppress_ids.device != dev:
        raise ValueError(f"suppress_ids is on {suppress_ids.device}, expected {dev} (all inputs on one device)")


def _check_out(token, conf, N: int, dev: torch.device) -> None:
    check_tensor(token, "out[0] (token)", dim=1, dtypes=(_I64,), device=dev)
    check_tensor(conf, "out[1] (conf)", dim=1, dtypes=(_F32,), device=dev)
    check(token.shape[0] == N and conf.shape[0] == N, f"out tensors must have {N} entries")
    check(token.is_contiguous() and conf.is_contiguous(), "out tensors must be contiguous")


# the kernels multiply by 1 / T in fp32: it must be a finite, normal fp32 (T = inf gave 1 / T = 0, on which the
# backends disagreed; T below about 3e-39 gave 1 / T = inf)
_T_MAX = 2.0**126                    # 1 / T >= 2^-126, the smallest normal fp32
_INV_T_MAX = 3.4028234663852886e38   # fp32 max
_T_MIN = 2.0**-127                   # a quick lower bound (1 / T = 2^127 < fp32 max); check_temperature is exact


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__} {temperature!r}")
    t = float(temperature)
    if not 0 <= t <= _T_MAX:  # NaN fails too
        raise ValueError(f"temperature must be >= 0 and at most 2^126 (finite), got {temperature!r}")
    if 0 < t and 1.0 / t > _INV_T_MAX:
        raise ValueError(f"temperature {temperature!r} is too small: 1 / temperature overflows fp32 (use 0 for "
                         f"greedy decoding)")


def _check_out_memory(logits: torch.Tensor, token: torch.Tensor, conf: torch.Tensor) -> None:
    """``out`` tensors (non-empty) must not share memory with each other or with ``logits`` (a kernel writes
    them while other programs still read; the torch path would read half-written values). Data pointers only."""
    if share_memory(token, conf):
        raise ValueError("out[0] (token) and out[1] (conf) share memory")
    if share_memory(token, logits) or share_memory(conf, logits):
        raise ValueError("out tensors share memory with logits: the kernels read logits while writing out")


def token_confidence(logits: torch.Tensor, *, confidence: str = "prob", temperature: float = 0.0,
                     seed: int | torch.Tensor = 0, offset: int | torch.Tensor = 0,
                     suppress_ids: torch.Tensor | None = None, top_k: int = 0, top_p: float = 1.0,
                     filter_greedy: bool = True, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                     backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and confidence for each row of logits, in one pass over the vocabulary.

    Args:
        logits: ``[N, V]`` fp16/bf16/fp32; unit stride over V, any row stride (e.g. ``logits[rows]``
            views, or rows of a larger ``[T, V]`` buffer taken with slicing). V up to 2^31 - 2.
        confidence: ``"prob"`` = p(token); ``"margin"`` = p(top1) - p(top2); ``"neg_entropy"`` =
            sum p log p (higher = more confident, as for the other two).
        temperature: 0 = argmax, ties to the lowest index (as ``torch.argmax``); > 0 = Gumbel-max sample
            from ``softmax(z / T)`` and every confidence kind is taken under ``softmax(z / T)``. A real number
            in ``{0} U [1 / FLT_MAX, 2^126]`` (``1 / T`` must be a normal fp32: the kernels multiply by it).
            At temperatures so small that ``z / T`` overflows fp32, the confidence is backend-dependent (the
            reference rounds ``z / T`` to inf: NaN; the kernels subtract the row max first: finite); the
            token is the same.
        seed, offset: keys of the counter-based random numbers. The noise of (row r, column v) is a hash of
            (seed[r], counter[r], v) and never depends on r itself (nor on the batch, the split or the
            backend), where:

            * ``seed``: an int in [0, 2^63) for every row, or an int64 tensor ``[N]``, one seed per row;
            * ``offset``: an int in [0, 2^63) or an int64 tensor with one element: ``counter[r] = offset + r``
              (mod 2^64); or an int64 tensor ``[N]``: ``counter[r] = offset[r]``.

            Tensors are read on the device (no host sync; a captured CUDA graph may advance them in place,
            e.g. ``offset.add_(1)``). For batch-invariant sampling give each request its own seed and counter
            (tensors ``[N]``, a request's rows carrying its keys): then its tokens are the same alone or in
            any batch, in any row order. With int / one-element forms the counter depends on the row.
        suppress_ids: int32/int64 ``[S]`` ids that are never chosen (their logit is treated as -inf
            before everything, e.g. MASK inside a span). Out-of-range ids are ignored.
        top_k: keep the k largest logits of each row (ties with the k-th kept; 0 = off).
        top_p: nucleus filter (< 1): keep the smallest prefix of the sorted distribution whose mass before
            its last token is <= top_p (the token crossing top_p is kept, as in the PD reference's
            ``top_p_logits``; ties with the last kept token are kept). Both filters are computed under
            ``softmax(z / T)`` after suppression, top-p before top-k as in the PD reference, and they change
            the confidence: a row whose top-1 probability exceeds ``top_p`` keeps only that token, so its
            ``prob`` is exactly 1 and its ``neg_entropy`` exactly 0 (such rows then tie: ``commit_spans``
            ranks equal confidences by the lower position). **Pre-pass:** a ``torch.topk`` (top-k) or
            ``torch.sort`` (top-p) of the rows computes a floor per row
            (:func:`pd_kernels.reference.token_confidence.filter_threshold`); the fused pass applies it (one compare
            per element, no filtered copy of the logits).
        filter_greedy: at temperature 0, apply ``top_k`` / ``top_p`` too (default, as the PD reference does);
            False: greedy rows ignore them (the Hugging Face convention). The token is the argmax either way.
        out: optional ``(token int64 [N], conf float32 [N])`` written in place (CUDA graphs); contiguous,
            sharing no memory with each other or with ``logits``.
        backend: ``"torch" | "triton" | "cuda" | "auto"``.

    Returns:
        ``token`` int64 ``[N]`` and ``conf`` float32 ``[N]``.

    Edge cases (every backend): NaN logits are never chosen and make the row's confidence NaN; a row with no
    usable entry (all -inf / suppressed / filtered / NaN) gets token ``-1`` and confidence ``-inf`` (NaN if it
    holds a NaN); a ``+inf`` logit gives confidence NaN (the token is the first ``+inf``).
    """
    if type(logits) is not torch.Tensor and not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have 2 dims [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must have dtype in {[str(d) for d in FLOAT_DTYPES]}, got {logits.dtype}")
    N, V = logits.shape
    if logits.stride(1) != 1 and V > 1:
        raise ValueError(f"logits must have a unit stride over V, got strides {logits.stride()}")
    if not 1 <= V < 2**31 - 1:
        raise ValueError(f"logits must have 1 to 2^31 - 2 columns, got {V}")
    if not isinstance(confidence, str) or confidence not in CONFIDENCE_KIND_ID:
        raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
    if not ((type(temperature) is float or type(temperature) is int)
            and (temperature == 0 or _T_MIN <= temperature <= _T_MAX)):
        check_temperature(temperature)   # the exact bounds and the messages
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if type(top_k) is not int or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    dev = logits.device
    seed_t = offset_t = None
    if not (type(seed) is int and 0 <= seed < 2**63):
        seed_t, seed = _key(seed, "seed", N, dev, False)
    if not (type(offset) is int and 0 <= offset < 2**63):
        offset_t, offset = _key(offset, "offset", N, dev, True)
    if suppress_ids is not None:
        if not (type(suppress_ids) is torch.Tensor and suppress_ids.dim() == 1 and suppress_ids.dtype in _SUP_DTYPES
                and suppress_ids.device == dev):
            _check_suppress(suppress_ids, dev)
        if suppress_ids.shape[0] == 0:
            suppress_ids = None
        elif suppress_ids.stride(0) != 1:
            suppress_ids = suppress_ids.contiguous()
    eager = _backend.eager(logits)
    if out is None:
        token = torch.empty(N, dtype=_I64, device=dev)
        conf = torch.empty(N, dtype=_F32, device=dev)
    else:
        if not (type(out) is tuple and len(out) == 2) and not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"out must be a (token, conf) pair of tensors, got {type(out).__name__}"
                            + (f" of {len(out)}" if isinstance(out, (tuple, list)) else ""))
        token, conf = out
        # one cheap test for the common case; the detailed checks (and messages) only when it fails
        if not (type(token) is torch.Tensor and type(conf) is torch.Tensor and token.dtype is _I64
                and conf.dtype is _F32 and token.shape == conf.shape == (N,) and token.is_contiguous()
                and conf.is_contiguous() and token.device == dev and conf.device == dev):
            _check_out(token, conf, N, dev)
        if N and eager:
            _check_out_memory(logits, token, conf)
    if N == 0:
        return token, conf
    threshold = None
    if (top_k or top_p < 1.0) and (temperature > 0 or filter_greedy):
        threshold = filter_threshold(logits, top_k=top_k, top_p=top_p, temperature=temperature,
                                     suppress_ids=suppress_ids)
    b = _backend.resolve(OP_TC, backend, dev)
    args = (logits, token, conf, suppress_ids, seed_t, offset_t, threshold, seed, offset, confidence,
            float(temperature), b)
    if eager:
        _token_confidence_impl(*args)
    else:
        torch.ops.pd_kernels.token_confidence(*args)
    return token, conf
