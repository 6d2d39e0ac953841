"""Plain-torch reference for choosing tokens and committing them (SPEC section 5).

Two steps per diffusion step:

1. :func:`token_confidence_ref` - per masked position (a row of logits ``z`` over the vocabulary) pick a
   token and a confidence.
2. :func:`commit_spans_ref` - per span, decide which of its masked positions take their token now
   (policies ``threshold``, ``schedule``, ``pd_threshold``) and update the per-span counters in
   :class:`SpanState`.

Everything the kernels must reproduce bit for bit (the random numbers, the schedule arithmetic, the
tie rules) is written here once; the Triton and CUDA code use the same integer formulas.

Defined edge cases (the same in every backend):

* NaN logits are never chosen (treated as ``-inf`` for the token choice) and make the row's confidence
  NaN, so a broken model shows up instead of being hidden.
* A row whose largest usable logit is not finite (every logit ``-inf``/suppressed/NaN, or a ``+inf``
  logit) gets confidence NaN; its token is still the argmax as defined (first index among equals).
* In the commit, a NaN confidence ranks like ``-inf`` (ties broken by the lower ``row_dst``) and never
  passes ``tau``; a span with masks still commits its top-1, so every step makes progress. A row whose
  token is negative (no valid token) is never committed and stays masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CONFIDENCE_KINDS = ("prob", "margin", "neg_entropy")
POLICIES = ("threshold", "schedule", "pd_threshold")

# ---------------------------------------------------------------------------------------------------
# Counter-based random numbers (Gumbel noise for temperature > 0)
# ---------------------------------------------------------------------------------------------------
# A murmur3-style 32-bit hash of (seed, offset, row, col). The same uint32 arithmetic is written in
# Triton (ops/triton/unmask.py) and CUDA (csrc/unmask.cu); here it runs in int64 with every product
# kept below 2^63 (no reliance on signed overflow).
_M32 = 0xFFFFFFFF
_C1, _C2, _C3 = 0xCC9E2D51, 0x1B873593, 0xE6546B64
_F1, _F2 = 0x85EBCA6B, 0xC2B2AE35


def _mul32(a: torch.Tensor | int, b: int):
    """``a * b mod 2^32`` for ``0 <= a, b < 2^32`` without int64 overflow (16-bit split of ``a``)."""
    lo = a & 0xFFFF
    hi = (a >> 16) & 0xFFFF
    return (lo * b + (((hi * b) & 0xFFFF) << 16)) & _M32


def _rotl32(x, r: int):
    return ((x << r) & _M32) | (x >> (32 - r))


def _mix32(h, k):
    k = _mul32(k, _C1)
    k = _rotl32(k, 15)
    k = _mul32(k, _C2)
    h = h ^ k
    h = _rotl32(h, 13)
    return (_mul32(h, 5) + _C3) & _M32


def _fmix32(h):
    h = h ^ (h >> 16)
    h = _mul32(h, _F1)
    h = h ^ (h >> 13)
    h = _mul32(h, _F2)
    return h ^ (h >> 16)


def rng_row_state(seed: int, offset: int, row):
    """Per-row hash state: ``row`` an int or an int64 tensor of rows."""
    h = seed & _M32
    h = _mix32(h, (seed >> 32) & _M32)
    h = _mix32(h, offset & _M32)
    h = _mix32(h, (offset >> 32) & _M32)
    return _mix32(h, row)


def uniform01(seed: int, offset: int, num_rows: int, num_cols: int, device=None) -> torch.Tensor:
    """fp32 ``[num_rows, num_cols]`` uniforms in (0, 1): ``((hash >> 9) + 0.5) / 2^23``.

    23 bits so that ``+ 0.5`` stays exact in fp32 (24 significant bits): u is never 0 or 1, so the
    Gumbel noise is always finite."""
    rows = torch.arange(num_rows, dtype=torch.int64, device=device)
    cols = torch.arange(num_cols, dtype=torch.int64, device=device)
    h = _fmix32(_mix32(rng_row_state(seed, offset, rows)[:, None], cols[None, :]))
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def gumbel_noise(seed: int, offset: int, num_rows: int, num_cols: int, device=None) -> torch.Tensor:
    """fp32 Gumbel(0, 1) noise ``-log(-log(u))``, reproducible from (seed, offset, row, col)."""
    u = uniform01(seed, offset, num_rows, num_cols, device)
    return -torch.log(-torch.log(u))


# ---------------------------------------------------------------------------------------------------
# Token and confidence per row
# ---------------------------------------------------------------------------------------------------
def top_p_filter(logits: torch.Tensor, top_p: float, temperature: float = 0.0) -> torch.Tensor:
    """fp32 copy of ``logits`` with every token outside the top-p nucleus of ``softmax(z / T)`` set to -inf.

    The nucleus (as the PD reference's ``top_p_logits``): sort descending, keep a token while the
    probability mass strictly before it is ``<= top_p`` (so the token that crosses ``top_p`` is kept and
    the top-1 always is). Stable sort: ties keep the lower index first. ``-inf`` logits stay ``-inf``.
    """
    z = logits.float()
    y = z / temperature if temperature > 0 else z
    sorted_y, order = torch.sort(y, dim=-1, descending=True, stable=True)
    cum = torch.softmax(sorted_y, dim=-1).cumsum(-1)
    remove_sorted = torch.zeros_like(cum, dtype=torch.bool)
    remove_sorted[..., 1:] = cum[..., :-1] > top_p
    remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
    return z.masked_fill(remove, float("-inf"))


def token_confidence_ref(logits: torch.Tensor, confidence: str = "prob", temperature: float = 0.0,
                         seed: int = 0, offset: int = 0, suppress_ids: torch.Tensor | None = None,
                         compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and confidence per row (SPEC section 5).

    Args:
        logits: ``[N, V]`` any float dtype, any strides.
        confidence: ``"prob"`` = p(token); ``"margin"`` = p(top1) - p(top2); ``"neg_entropy"`` = sum p log p.
        temperature: 0 = argmax (ties -> lowest index); > 0 = Gumbel-max sample from ``softmax(z / T)``
            with noise :func:`gumbel_noise` (seed, offset); every confidence kind is then taken under
            ``softmax(z / T)``.
        suppress_ids: int ``[S]`` ids removed before everything (their logit becomes -inf).
        compute_dtype: dtype of the softmax arithmetic (the tests use float64 as the truth). The token
            choice is always made on fp32 values, as the kernels do.

    Returns: ``token`` int64 ``[N]``, ``conf`` float32 ``[N]``.
    """
    if confidence not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
    N, V = logits.shape
    dev = logits.device
    z = logits.float()
    nan_row = torch.isnan(z).any(dim=-1)
    z = torch.where(torch.isnan(z), torch.full_like(z, float("-inf")), z)
    selectable = torch.ones(V, dtype=torch.bool, device=dev)
    if suppress_ids is not None and suppress_ids.numel():
        sup = suppress_ids.to(device=dev, dtype=torch.int64)
        sup = sup[(sup >= 0) & (sup < V)]
        selectable[sup] = False
        z = z.masked_fill(~selectable, float("-inf"))
    sample = temperature > 0
    # y = z / T as a multiply by the fp32 reciprocal: the kernels do exactly this.
    y32 = z * torch.tensor(1.0 / temperature, dtype=torch.float32) if sample else z

    # token: argmax of the key among selectable ids, first index among equals
    key = y32 + gumbel_noise(seed, offset, N, V, dev) if sample else y32
    key = key.masked_fill(~selectable, float("-inf"))
    best = key.max(dim=-1, keepdim=True).values
    cols = torch.arange(V, device=dev).expand(N, V)
    token = torch.where((key == best) & selectable, cols, V).min(dim=-1).values

    # confidence under softmax(y)
    y = z.to(compute_dtype) * (1.0 / temperature) if sample else z.to(compute_dtype)
    if sample and compute_dtype == torch.float32:
        y = y32
    m = y.max(dim=-1, keepdim=True).values
    p = torch.exp(y - m)
    s = p.sum(dim=-1)
    if confidence == "prob":
        conf = torch.exp(y.gather(1, token[:, None]).squeeze(1) - m.squeeze(1)) / s
    elif confidence == "margin":
        if V >= 2:
            top2 = torch.topk(y, 2, dim=-1).values
            t2 = top2[:, 1]
        else:
            t2 = torch.full((N,), float("-inf"), dtype=y.dtype, device=dev)
        conf = (1.0 - torch.exp(t2 - m.squeeze(1))) / s
    else:
        prob = p / s[:, None]
        conf = torch.special.xlogy(prob, prob).sum(dim=-1)
    finite = torch.isfinite(m.squeeze(1)) & ~nan_row
    conf = torch.where(finite, conf, torch.full_like(conf, float("nan")))
    return token.to(torch.int64), conf.to(torch.float32)


# ---------------------------------------------------------------------------------------------------
# Per-span state and commits
# ---------------------------------------------------------------------------------------------------
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
        ``num_steps`` must be >= 1.
        """
        dev = self.device
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
        state.step[j] = k + 1
        state.deferred[j] = deferred
    all_done = (state.masks_left == 0).all().reshape(1)
    return committed, all_done
