"""Plain-torch reference for committing chosen tokens per span (SPEC section 5).

:func:`commit_spans_ref`: per span, decide which of its masked positions take their token now (policies
``threshold``, ``schedule``, ``pd_threshold``) and update the per-span counters in :class:`SpanState`. The
tokens and confidences come from :func:`pd_kernels.reference.token_confidence.token_confidence_ref`.

The schedule arithmetic and the tie rules are written here once; the Triton and CUDA code use the same integer
formulas.

Defined edge cases (the same in every backend): a NaN confidence ranks like ``-inf`` (ties broken by the lower
``row_dst``) and never passes ``tau``; a span with masks still commits its top-1, so every step makes progress.
A row whose token is negative (no valid token) is never committed and stays masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

POLICIES = ("threshold", "schedule", "pd_threshold")
"""The commit policies, in id order. A policy's id is its index here (:data:`POLICY_ID`): the one home of the ids,
which the Triton kernel reads (``POLICY``) and ``pdk::CommitPolicy`` in ``csrc/commit_spans.h`` is checked against
(``tests/test_commit_spans.py``)."""
POLICY_ID = {p: i for i, p in enumerate(POLICIES)}


@dataclass
class SpanState:
    """Per-span decoding counters, int32 ``[S]`` device tensors (one entry per span id).

    * ``masks_left``: mask tokens still in the span (0 = finished, or never started);
    * ``step``: diffusion steps the span has taken this round (k in SPEC section 5);
    * ``num_steps``: the round's original step count for the span (``steps`` in SPEC section 5);
    * ``deferred``: tokens ``pd_threshold`` deferred at the span's last step;
    * ``arrivals``: int64 ``[1]``, the commit kernels' arrival counter (each program of a launch adds to it,
      the last one folds ``all_done`` and sets it back to 0): 0 between calls, never read by the host.
      Created zeroed when not given.
    """

    masks_left: torch.Tensor
    step: torch.Tensor
    num_steps: torch.Tensor
    deferred: torch.Tensor
    arrivals: torch.Tensor | None = None

    def __post_init__(self):
        if self.arrivals is None:
            self.arrivals = torch.zeros(1, dtype=torch.int64, device=self.masks_left.device)

    @classmethod
    def new(cls, num_spans: int, device=None) -> "SpanState":
        z = lambda: torch.zeros(num_spans, dtype=torch.int32, device=device)  # noqa: E731
        st = cls(z(), z(), z(), z())
        st.num_steps.fill_(1)
        return st

    @property
    def num_spans(self) -> int:
        return self.masks_left.shape[0]

    @property
    def device(self) -> torch.device:
        return self.masks_left.device

    def reset(self, span_ids, masks, num_steps) -> None:
        """Start a round for ``span_ids``: masks_left = masks, step = 0, num_steps = num_steps, deferred = 0.

        Each argument is a list or a tensor (lists are copied to the device: one host->device copy each).
        ``num_steps`` must be >= 1 (checked for host values; a device tensor is taken as is, no sync).
        """
        dev = self.device
        if not isinstance(num_steps, torch.Tensor):
            host = torch.as_tensor(num_steps)
            if host.numel() and (host.dtype.is_floating_point or host.dtype == torch.bool or int(host.min()) < 1):
                raise ValueError(f"SpanState.reset: num_steps must be integers >= 1, got {num_steps!r}")
        ids = torch.as_tensor(span_ids, dtype=torch.int64, device=dev).reshape(-1)
        masks = torch.as_tensor(masks, dtype=torch.int32, device=dev).reshape(-1).expand(ids.shape[0])
        steps = torch.as_tensor(num_steps, dtype=torch.int32, device=dev).reshape(-1).expand(ids.shape[0])
        self.masks_left.index_copy_(0, ids, masks.contiguous())
        self.step.index_fill_(0, ids, 0)
        self.num_steps.index_copy_(0, ids, steps.contiguous())
        self.deferred.index_fill_(0, ids, 0)

    def clone(self) -> "SpanState":
        return SpanState(self.masks_left.clone(), self.step.clone(), self.num_steps.clone(),
                         self.deferred.clone(), self.arrivals.clone())


def schedule_count(m: int, k: int, steps: int) -> int:
    """Tokens the ``schedule`` policy commits in a span with ``m`` masks at step ``k`` of ``steps``.

    SPEC: top ``max(1, int(m * (1 - s/t)))`` with t, s = values k, k+1 of ``linspace(1, 1e-3, steps+1)``;
    the last step (and any later one) commits everything. With eps = 1/1000 exactly,
    ``1 - s/t = 999 / (1000 * steps - 999 * k)``, so the count is the integer
    ``floor(999 m / (1000 steps - 999 k))``: identical in every backend. (The fp32 linspace of the PD
    reference can round the other way only where ``m (1 - s/t)`` is within an ulp of an integer.)
    """
    if m <= 0:
        return 0
    if k >= steps - 1:
        return m
    return min(m, max(1, (999 * m) // (1000 * steps - 999 * k)))


def pd_threshold_budget(m: int, k: int, steps: int, deferred: int) -> int:
    """SPEC ``pd_threshold`` budget: ``min(m, max(1, m // (steps - k)) + deferred)``; after the last
    original step (k >= steps) the per-step part is 1 (the reference's ``m // (steps - k)`` is 0 there)."""
    per_step = m // (steps - k) if k < steps else 0
    return min(m, max(1, per_step) + deferred)


def span_row_range(first: int, count: int, num_rows: int) -> range:
    """Rows of a span given its ``span_rows`` entry ``(first, count)``, clipped to ``[0, num_rows)``: what
    every backend reads (a bad entry never makes a kernel read outside the row tensors)."""
    lo = min(max(first, 0), num_rows)
    hi = min(max(first + max(count, 0), lo), num_rows)
    return range(lo, hi)


def commit_spans_ref(token: torch.Tensor, conf: torch.Tensor, row_dst: torch.Tensor, span_rows: torch.Tensor,
                     tokens: torch.Tensor, state: SpanState, policy: str = "threshold", tau: float = 0.9,
                     mask_id: int = 151666) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit tokens per span, in place (SPEC section 5). Shapes as :func:`pd_kernels.commit_spans`.

    Span j owns the rows ``span_row_range(*span_rows[j], N)`` (contiguous; rows of different spans do not
    overlap; rows of no span are ignored). Among them:

    * its *masked rows*: ``row_dst`` inside ``[0, tokens.numel())`` and ``tokens[row_dst] == mask_id``
      (a destination outside ``tokens`` is never read or written); m = their number;
    * its *candidates*: the masked rows whose ``token >= 0``. A masked row with a negative token (a row where
      :func:`token_confidence` found no valid token) is never committed: it keeps its MASK, counts in m
      (so in ``masks_left``) and takes no place in the ranking.

    Spans with m = 0 are left untouched. For the others:

    1. rank the candidates by confidence, highest first; NaN ranks as -inf; ties -> lower ``row_dst`` first;
    2. choose the committed set (``b`` is computed from m; when fewer than ``b`` candidates exist, all of
       them are the "top b"):
       * threshold: the top-1, and every candidate with ``conf >= tau``;
       * schedule: the top ``b = schedule_count(m, step, num_steps)`` candidates;
       * pd_threshold: b = ``pd_threshold_budget(m, step, num_steps, deferred)``; among the top b,
         the top-1 and every candidate with ``conf >= tau``; the other ``b - committed`` are deferred;
    3. write their tokens into ``tokens[row_dst]``; ``masks_left = m - committed``, ``step += 1``,
       ``deferred`` = the deferred count (0 for the other policies).

    Every step commits at least one token in a span with a candidate. A span whose masked rows all lack a
    valid token commits nothing (``committed`` 0, ``masks_left`` unchanged, ``step`` still advances): the
    caller decides what to do with it (the decoder ends such a span, see :mod:`pd_kernels.decoder.loop`).

    Returns ``committed`` int32 ``[S]`` (this call) and ``all_done`` bool ``[1]``
    (``masks_left == 0`` for every span of the state).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    S = state.num_spans
    N = token.shape[0]
    flat = tokens.view(-1)
    committed = torch.zeros(S, dtype=torch.int32, device=tokens.device)
    tau32 = float(torch.tensor(tau, dtype=torch.float32))  # the kernels compare in fp32
    tok_l = token.tolist()
    conf_l = conf.float().tolist()
    dst_l = row_dst.tolist()
    ranges = span_rows.reshape(-1, 2).tolist()
    inside = (row_dst >= 0) & (row_dst < flat.numel())
    cur_l = torch.where(inside, flat[row_dst.clamp(0, max(flat.numel() - 1, 0))], mask_id + 1).tolist() \
        if row_dst.numel() and flat.numel() else [mask_id + 1] * len(dst_l)
    for j in range(S):
        rows = [r for r in span_row_range(ranges[j][0], ranges[j][1], N) if cur_l[r] == mask_id]
        m = len(rows)
        if m == 0:
            continue
        key = lambda r: (-(float("-inf") if conf_l[r] != conf_l[r] else conf_l[r]), dst_l[r])  # noqa: E731
        order = sorted((r for r in rows if tok_l[r] >= 0), key=key)
        k = int(state.step[j])
        steps = int(state.num_steps[j])
        deferred = 0
        if policy == "threshold":
            take = order[:1] + [r for r in order[1:] if conf_l[r] >= tau32]
        elif policy == "schedule":
            take = order[:schedule_count(m, k, steps)]
        else:
            budget = pd_threshold_budget(m, k, steps, int(state.deferred[j]))
            take = order[:1] + [r for r in order[1:budget] if conf_l[r] >= tau32]
            deferred = budget - len(take)
        for r in take:
            flat[dst_l[r]] = tok_l[r]
        committed[j] = len(take)
        state.masks_left[j] = m - len(take)
        state.step[j] = (k + 1 + 2**31) % 2**32 - 2**31   # the kernels' int32 counter (wraps at 2^31 - 1)
        state.deferred[j] = deferred
    all_done = (state.masks_left == 0).all().reshape(1)
    return committed, all_done
