"""``pd_kernels::commit_spans``: commit the chosen tokens per span in place and advance the span counters,
on the device, with no host sync (SPEC section 5). The tokens and confidences come from
:func:`pd_kernels.token_confidence`.

Semantics, tie rules and edge cases (NaN confidences, negative tokens, destinations outside the buffer) are those
of :mod:`pd_kernels.reference.commit_spans`.
"""
from __future__ import annotations

from numbers import Real

import torch

from .. import _backend
from .._checks import check, check_tensor, debug_enabled
from ..reference.commit_spans import POLICIES, POLICY_ID, SpanState, commit_spans_ref
from .._cuda_ext import cuda_fake

OP_COMMIT = "commit_spans"
_backend.register_op_backends(OP_COMMIT, ("torch", "triton", "cuda"))


def _commit_spans_impl(token: torch.Tensor, conf: torch.Tensor, row_dst: torch.Tensor, span_rows: torch.Tensor,
                       tokens: torch.Tensor, masks_left: torch.Tensor, step: torch.Tensor, num_steps: torch.Tensor,
                       deferred: torch.Tensor, arrivals: torch.Tensor, committed: torch.Tensor,
                       all_done: torch.Tensor, policy: str, tau: float, mask_id: int, backend: str) -> None:
    if backend == "triton":
        _backend.triton_module("commit_spans").commit_spans_triton(token, conf, row_dst, span_rows, tokens, masks_left,
                                                                   step, num_steps, deferred, arrivals, committed,
                                                                   all_done, policy, tau, mask_id)
    elif backend == "cuda":
        torch.ops.pd_kernels.commit_spans_cuda(token, conf, row_dst, span_rows, tokens, masks_left, step, num_steps,
                                               deferred, arrivals, committed, all_done, POLICY_ID[policy], tau,
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
    (see :func:`pd_kernels.reference.commit_spans.commit_spans_ref`). A span whose masked rows all have a negative
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
        ok = (policy in POLICY_ID and isinstance(state, SpanState) and tokens.dtype is _I64 and tokens.is_contiguous()
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
