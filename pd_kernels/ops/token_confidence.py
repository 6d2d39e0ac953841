"""``pd_kernels::token_confidence`` and ``pd_kernels::commit_spans``: choose a token per masked position
and commit some of them per span, on the device, with no host sync (SPEC section 5).

A diffusion step is::

    token, conf = token_confidence(logits[mask_rows], confidence="prob")      # one read of the logits
    committed, all_done = commit_spans(token, conf, row_dst, span_rows, seq, state, policy="pd_threshold")

Semantics, tie rules and edge cases (NaN, -inf, suppressed ids) are those of
:mod:`pd_kernels.reference.unmask`.
"""
from __future__ import annotations

from numbers import Real
from typing import Optional

import torch

from .. import _backend
from .._checks import debug_enabled, FLOAT_DTYPES, check, check_tensor, share_memory
from ..reference.token_confidence import (CONFIDENCE_KINDS, POLICIES, SpanState, commit_spans_ref, token_confidence_ref,
                                filter_threshold)
from .._cuda_ext import cuda_fake

OP_TC = "token_confidence"
OP_COMMIT = "commit_spans"
_backend.register_op_backends(OP_TC, ("torch", "triton", "cuda"))
_backend.register_op_backends(OP_COMMIT, ("torch", "triton", "cuda"))

_KIND_ID = {k: i for i, k in enumerate(CONFIDENCE_KINDS)}
_POLICY_ID = {p: i for i, p in enumerate(POLICIES)}


# ---------------------------------------------------------------------------------------------------
# token_confidence
# ---------------------------------------------------------------------------------------------------
def _token_confidence_impl(logits: torch.Tensor, token: torch.Tensor, conf: torch.Tensor,
                           suppress_ids: Optional[torch.Tensor], seed_t: Optional[torch.Tensor],
                           offset_t: Optional[torch.Tensor], threshold: Optional[torch.Tensor], seed: int,
                           offset: int, kind: str, temperature: float, backend: str) -> None:
    if backend == "triton":
        _backend.triton_module("token_confidence").token_confidence_triton(logits, token, conf, suppress_ids, seed_t, offset_t,
                                                                 threshold, seed, offset, kind, temperature)
    elif backend == "cuda":
        torch.ops.pd_kernels.token_confidence_cuda(logits, token, conf, suppress_ids, seed_t, offset_t, threshold,
                                                   seed, offset, _KIND_ID[kind], temperature)
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
            (:func:`pd_kernels.reference.unmask.filter_threshold`); the fused pass applies it (one compare
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
    if not isinstance(confidence, str) or confidence not in _KIND_ID:
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


# ---------------------------------------------------------------------------------------------------
# commit_spans
# ---------------------------------------------------------------------------------------------------
def _commit_spans_impl(token: torch.Tensor, conf: torch.Tensor, row_dst: torch.Tensor, span_rows: torch.Tensor,
                       tokens: torch.Tensor, masks_left: torch.Tensor, step: torch.Tensor, num_steps: torch.Tensor,
                       deferred: torch.Tensor, arrivals: torch.Tensor, committed: torch.Tensor,
                       all_done: torch.Tensor, policy: str, tau: float, mask_id: int, backend: str) -> None:
    if backend == "triton":
        _backend.triton_module("token_confidence").commit_spans_triton(token, conf, row_dst, span_rows, tokens, masks_left, step,
                                                             num_steps, deferred, arrivals, committed, all_done,
                                                             policy, tau, mask_id)
    elif backend == "cuda":
        torch.ops.pd_kernels.commit_spans_cuda(token, conf, row_dst, span_rows, tokens, masks_left, step, num_steps,
                                               deferred, arrivals, committed, all_done, _POLICY_ID[policy], tau,
                                               mask_id)
    elif backend == "torch":
        st = SpanState(masks_left, step, num_steps, deferred, arrivals)
        c, d = commit_spans_ref(token, conf, row_dst, span_rows, tokens, st, policy, tau, mask_id)
        committed.copy_(c)
        all_done.copy_(d)
    else:
        raise ValueError(f"unknown backend {backend!r}")


_commit_op = torch.library.custom_op(
    "pd_kernels::commit_spans", _commit_spans_impl,
    mutates_args=("tokens", "masks_left", "step", "deferred", "arrivals", "committed", "all_done"))


@_commit_op.register_fake
def _(token, conf, row_dst, span_rows, tokens, masks_left, step, num_steps, deferred, arrivals, committed, all_done,
      policy, tau, mask_id, backend):
    return None


@cuda_fake("pd_kernels::commit_spans_cuda")
def _(token, conf, row_dst, span_rows, tokens, masks_left, step, num_steps, deferred, arrivals, committed, all_done,
      policy, tau, mask_id):
    return None


_I32, _I64, _F32, _BOOL = torch.int32, torch.int64, torch.float32, torch.bool
_STATE_FIELDS = ("masks_left", "step", "num_steps", "deferred")


def _commit_check_all(token, conf, row_dst, span_rows, tokens, state, committed, all_done, policy, tau,
                      mask_id) -> None:
    """Every check of :func:`commit_spans`, one by one, with a message naming the argument. Runs only when the
    one-expression check of the hot path failed (so messages are formatted only on failure)."""
    check(policy in POLICIES, f"policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(state, SpanState):
        raise TypeError(f"state must be a SpanState, got {type(state).__name__}")
    check_tensor(tokens, "tokens", dtypes=(_I64,), last_contig=False)
    check(tokens.is_contiguous(), "tokens must be contiguous (row_dst indexes its flat storage)")
    dev = tokens.device
    check_tensor(token, "token", dim=1, dtypes=(_I64,), device=dev, last_contig=False)
    N = token.shape[0]
    check(N < 2**31, f"token has {N} rows; at most 2^31 - 1")
    check_tensor(conf, "conf", dim=1, dtypes=(_F32,), device=dev, last_contig=False)
    check_tensor(row_dst, "row_dst", dim=1, dtypes=(_I64,), device=dev, last_contig=False)
    for name, t in (("conf", conf), ("row_dst", row_dst)):
        check(t.shape[0] == N, f"{name} has {t.shape[0]} entries, token has {N}")
    for name in _STATE_FIELDS:
        check_tensor(getattr(state, name), f"state.{name}", dim=1, dtypes=(_I32,), device=dev)
    S = state.masks_left.shape[0]
    for name in _STATE_FIELDS:
        t = getattr(state, name)
        check(t.shape[0] == S and t.is_contiguous(), f"state.{name} must be contiguous with {S} entries "
                                                     f"(as state.masks_left), got shape {tuple(t.shape)}")
    check_tensor(state.arrivals, "state.arrivals", dim=1, dtypes=(_I64,), device=dev)
    check(state.arrivals.shape[0] == 1, f"state.arrivals must have one entry, got {tuple(state.arrivals.shape)}")
    check_tensor(span_rows, "span_rows", dim=2, dtypes=(_I32,), device=dev, last_contig=False)
    check(tuple(span_rows.shape) == (S, 2), f"span_rows must be [S, 2] = [{S}, 2] (first row, row count per span "
                                            f"id), got {tuple(span_rows.shape)}")
    if committed is not None:
        check_tensor(committed, "out[0] (committed)", dim=1, dtypes=(_I32,), device=dev)
        check_tensor(all_done, "out[1] (all_done)", dim=1, dtypes=(_BOOL,), device=dev)
        check(committed.shape[0] == S and all_done.shape[0] == 1, f"out must be ([{S}], [1]), got "
                                                                  f"({tuple(committed.shape)}, {tuple(all_done.shape)})")
        check(committed.is_contiguous(), "out[0] (committed) must be contiguous")
    check(isinstance(mask_id, int) and -2**31 <= mask_id < 2**31, f"mask_id must be an int32 value, got {mask_id!r}")
    check(isinstance(tau, Real) and tau == tau, f"tau must be a real number, not NaN, got {tau!r}")


def _commit_check_device_values(row_dst: torch.Tensor, span_rows: torch.Tensor, n_tokens: int,
                                arrivals: torch.Tensor) -> None:
    """``PD_KERNELS_DEBUG=1``: the checks that read device values (a sync): span ranges inside the rows and
    disjoint, destinations of the spans' rows inside ``tokens`` and distinct, the arrival counter at 0."""
    if int(arrivals[0]) != 0:
        raise ValueError(f"commit_spans: state.arrivals is {int(arrivals[0])}, must be 0 between calls (the "
                         f"kernels' counter; a nonzero value makes all_done wrong)")
    N = row_dst.shape[0]
    sr = span_rows.cpu().long()
    first, count = sr[:, 0], sr[:, 1]
    bad = (count < 0) | ((count > 0) & ((first < 0) | (first + count > N)))
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise IndexError(f"commit_spans: span_rows[{j}] = ({int(first[j])}, {int(count[j])}) is not a range of rows "
                         f"inside [0, {N}) (first row, row count)")
    used = (count > 0).nonzero().squeeze(1)
    if used.numel() == 0:
        return
    order = used[first[used].argsort()]
    f, c = first[order], count[order]
    if bool((f[1:] < f[:-1] + c[:-1]).any()):
        i = int((f[1:] < f[:-1] + c[:-1]).nonzero()[0])
        raise ValueError(f"commit_spans: the rows of spans {int(order[i])} and {int(order[i + 1])} overlap "
                         f"(span_rows {sr[order[i]].tolist()} and {sr[order[i + 1]].tolist()})")
    covered = torch.zeros(N, dtype=torch.bool)
    for a, n in zip(f.tolist(), c.tolist()):
        covered[a:a + n] = True
    dst = row_dst.cpu()[covered]
    bad = (dst < 0) | (dst >= n_tokens)
    if bool(bad.any()):
        raise IndexError(f"commit_spans: row_dst {dst[bad][:8].tolist()} outside [0, {n_tokens}) (tokens.numel())")
    if dst.unique().numel() != dst.numel():
        raise ValueError("commit_spans: row_dst entries of the spans' rows must be distinct")


def commit_spans(token: torch.Tensor, conf: torch.Tensor, row_dst: torch.Tensor, span_rows: torch.Tensor,
                 tokens: torch.Tensor, state: SpanState, *, policy: str = "threshold", tau: float = 0.9,
                 mask_id: int = 151666, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit chosen tokens per span in place and advance the span counters (SPEC section 5).

    Args:
        token: int64 ``[N]``, conf: float32 ``[N]`` - one row per candidate position (from
            :func:`token_confidence`). A row whose token is negative (no valid token) is never committed.
        row_dst: int64 ``[N]``, flat index of the row's position in ``tokens`` (distinct entries). A row
            whose ``row_dst`` is outside ``[0, tokens.numel())`` is never read or written (ignored).
        span_rows: int32 ``[S, 2]``: per span id, ``(first row, row count)``: span j owns the rows
            ``first .. first + count - 1`` (contiguous); count 0 for spans without rows this step. Rows of
            different spans must not overlap; rows of no span are ignored. Ranges are clipped to ``[0, N)``.
        tokens: int64 buffer of any shape (contiguous), mutated: committed positions get their token. A row
            whose ``tokens[row_dst]`` is not ``mask_id`` is ignored (already committed).
        state: :class:`SpanState` with S spans; ``masks_left``, ``step``, ``deferred`` are updated for the
            spans that had masked rows; spans without rows are untouched.
        policy: ``"threshold"`` (top-1 + every conf >= tau), ``"schedule"`` (top-k with the linspace rule,
            all on the last step), ``"pd_threshold"`` (budget + top-1 + tau + deferral).
        tau: confidence threshold (compared in fp32).
        mask_id: the MASK token id.
        out: optional ``(committed int32 [S], all_done bool [1])`` written in place.

    Returns:
        ``committed`` int32 ``[S]`` (this call) and ``all_done`` bool ``[1]`` (device; True when every
        span of the state has ``masks_left == 0``). No host sync; one kernel launch on triton / cuda, whose
        cost follows each span's own row count, not N.

    Rows with a negative token stay masked and count in ``masks_left``; they take no place in the ranking
    (see :func:`pd_kernels.reference.unmask.commit_spans_ref`). A span whose masked rows all have a negative
    token commits nothing in that call.

    Checked on the host (metadata only): dtypes, shapes, devices, contiguity. With ``PD_KERNELS_DEBUG=1``
    also (reading them on the host: a sync, for debugging only): span ranges outside ``[0, N)`` or
    overlapping, the spans' ``row_dst`` outside ``tokens`` or repeated, and ``state.arrivals`` not 0, raise.
    Without it such inputs give undefined (but never out-of-bounds) results.
    """
    if out is None:
        committed = all_done = None
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        committed, all_done = out
    else:
        raise TypeError(f"out must be a (committed, all_done) pair of tensors, got {type(out).__name__}")
    # the hot path: every check in one expression (no message formatted); on failure, or for a non-tensor
    # argument, the checks run again one by one and raise with the argument's name
    try:
        ml, stp, ns, dfr, arr = state.masks_left, state.step, state.num_steps, state.deferred, state.arrivals
        dev = tokens.device
        ts, ss = token.shape, ml.shape
        S = ss[0]
        ok = (policy in _POLICY_ID and isinstance(state, SpanState) and tokens.dtype is _I64 and tokens.is_contiguous()
              and token.dtype is _I64 and len(ts) == 1 and ts[0] <= 2147483647 and token.device == dev
              and conf.dtype is _F32 and conf.shape == ts and conf.device == dev
              and row_dst.dtype is _I64 and row_dst.shape == ts and row_dst.device == dev
              and span_rows.dtype is _I32 and span_rows.shape == (S, 2) and span_rows.device == dev
              and ml.dtype is _I32 and len(ss) == 1 and ml.device == dev and ml.is_contiguous()
              and stp.dtype is _I32 and stp.shape == ss and stp.device == dev and stp.is_contiguous()
              and ns.dtype is _I32 and ns.shape == ss and ns.device == dev and ns.is_contiguous()
              and dfr.dtype is _I32 and dfr.shape == ss and dfr.device == dev and dfr.is_contiguous()
              and arr.dtype is _I64 and arr.shape == (1,) and arr.device == dev
              and isinstance(mask_id, int) and -2147483648 <= mask_id <= 2147483647
              and (type(tau) is float or isinstance(tau, Real)) and tau == tau)
        if ok and committed is not None:
            ok = (committed.dtype is _I32 and committed.shape == ss and committed.device == dev
                  and committed.is_contiguous() and all_done.dtype is _BOOL and all_done.shape == (1,)
                  and all_done.device == dev)
    except (AttributeError, TypeError, IndexError):
        ok = False
    if not ok:
        _commit_check_all(token, conf, row_dst, span_rows, tokens, state, committed, all_done, policy, tau, mask_id)
        ml, stp, ns, dfr, arr = state.masks_left, state.step, state.num_steps, state.deferred, state.arrivals
        dev, S = tokens.device, ml.shape[0]
    # the row tensors and span ranges are small: copy only when a kernel could not read them as they are
    if not (token.is_contiguous() and conf.is_contiguous() and row_dst.is_contiguous() and span_rows.is_contiguous()):
        token, conf, row_dst, span_rows = (t.contiguous() for t in (token, conf, row_dst, span_rows))
    if committed is None:
        committed = torch.empty(S, dtype=_I32, device=dev)
        all_done = torch.empty(1, dtype=_BOOL, device=dev)
    if debug_enabled():
        _commit_check_device_values(row_dst, span_rows, tokens.numel(), arr)
    b = _backend.resolve(OP_COMMIT, backend, dev)
    args = (token, conf, row_dst, span_rows, tokens, ml, stp, ns, dfr, arr, committed, all_done, policy, float(tau),
            mask_id, b)
    if _backend.eager(tokens):
        _commit_spans_impl(*args)
    else:
        torch.ops.pd_kernels.commit_spans(*args)
    return committed, all_done
