"""Plain-torch reference for choosing a token per masked position (SPEC section 5).

:func:`token_confidence_ref`: per row of logits ``z`` over the vocabulary, pick a token and a confidence.
(:mod:`pd_kernels.reference.commit_spans` then decides, per span, which positions take their token.)

Everything the kernels must reproduce bit for bit (the random numbers, the tie rules) is written here once; the
Triton and CUDA code use the same integer formulas.

Defined edge cases (the same in every backend):

* Suppressed ids are removed before everything (their logit counts as ``-inf``, even a NaN); the top-k /
  top-p filters (:func:`filter_threshold`) then remove every token below the row's floor.
* NaN logits are never chosen (treated as ``-inf`` for the token choice) and make the row's confidence
  NaN, so a broken model shows up instead of being hidden.
* A row with no usable entry (every logit ``-inf``, suppressed, filtered out or NaN) gets token ``-1`` and
  confidence ``-inf`` (NaN when the row holds a NaN). A row with a ``+inf`` logit gets the first ``+inf`` as
  its greedy token and confidence NaN.
"""
from __future__ import annotations

import torch

CONFIDENCE_KINDS = ("prob", "margin", "neg_entropy")
"""The confidence kinds, in id order. A kind's id is its index here (:data:`CONFIDENCE_KIND_ID`): the one home of
the ids, which the Triton kernels read (``KIND``) and ``pdk::ConfidenceKind`` in ``csrc/token_confidence.h`` is
checked against (``tests/test_token_confidence.py``)."""
CONFIDENCE_KIND_ID = {k: i for i, k in enumerate(CONFIDENCE_KINDS)}

# ---------------------------------------------------------------------------------------------------
# Counter-based random numbers (Gumbel noise for temperature > 0)
# ---------------------------------------------------------------------------------------------------
# The noise of (row r, column v) depends on (seed[r], counter[r], v) only, never on r itself, so a request
# draws the same numbers alone or in any batch when its own seed and counter travel with it:
#
#   h_row = mix(mix(mix(seed_lo, seed_hi), counter_lo), counter_hi)     murmur3 rounds, once per row
#   bits  = fmix32(mix(h_row, v))                                       32 random bits per element
#   g     = gumbel_from_bits(bits)
#
# The same uint32 arithmetic is written in Triton (ops/triton/token_confidence.py) and CUDA
# (csrc/token_confidence.cu); here it runs in int64 with every product kept below 2^63 (no reliance on signed
# overflow).
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


def _words(t: torch.Tensor):
    """Low and high 32-bit words of int64 values (their uint64 bit patterns), as int64 in [0, 2^32)."""
    return t & _M32, (t >> 32) & _M32


def row_state(seed, offset, num_rows: int, device=None) -> torch.Tensor:
    """Hash state of each row, int64 ``[N]`` in ``[0, 2^32)``, from its (seed, counter).

    ``seed``: an int in ``[0, 2^63)`` for every row, or an int64 tensor ``[N]`` (one per row, any value: its
    uint64 bit pattern). ``offset``: an int in ``[0, 2^63)`` or a one-element int64 tensor, giving
    ``counter = offset + row`` (mod 2^64); or an int64 tensor ``[N]``, giving ``counter = offset[row]``.
    (With N = 1 the two tensor forms agree.)
    """
    rows = torch.arange(num_rows, dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        s_lo, s_hi = _words(seed.to(device=device, dtype=torch.int64).reshape(-1).expand(num_rows))
    else:
        s_lo = torch.full((num_rows,), seed & _M32, dtype=torch.int64, device=device)
        s_hi = torch.full((num_rows,), (seed >> 32) & _M32, dtype=torch.int64, device=device)
    if isinstance(offset, torch.Tensor) and offset.numel() != 1:
        c_lo, c_hi = _words(offset.to(device=device, dtype=torch.int64).reshape(-1).expand(num_rows))
    else:
        if isinstance(offset, torch.Tensor):
            b_lo, b_hi = _words(offset.to(device=device, dtype=torch.int64).reshape(1))
        else:
            b_lo, b_hi = offset & _M32, (offset >> 32) & _M32
        lo = b_lo + rows
        c_lo, c_hi = lo & _M32, (b_hi + (lo >> 32)) & _M32
    h = _mix32(s_lo, s_hi)
    h = _mix32(h, c_lo)
    return _mix32(h, c_hi)


def random_bits(h_row: torch.Tensor, num_cols: int) -> torch.Tensor:
    """32 random bits per (row, column): int64 ``[N, V]`` in ``[0, 2^32)`` from the row states ``[N]``."""
    cols = torch.arange(num_cols, dtype=torch.int64, device=h_row.device)
    return _fmix32(_mix32(h_row[:, None], cols[None, :]))


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise in fp32 from 32 random bits (int64 tensor of values in ``[0, 2^32)``).

    The formula every backend uses. With ``r`` = the low 31 bits, ``x = fp32(2r + 1) * 2^-33`` in
    ``(0, 0.5]`` (one rounding of an integer, then an exact power-of-two scale), and the top bit choosing
    the half of the uniform ``u = (bits + 1/2) / 2^32``:

    * top bit 0: ``u = x``, ``E = -log(u) = -log(x)``;
    * top bit 1: ``u = 1 - x``, ``E = -log(u) = -log1p(-x)``: exact near u = 1, where ``-log(u)`` of a
      rounded u would give 0 (then ``-log(E)`` = +inf) or, under approximate logs, even a negative E (NaN);

    and ``g = -log(E)``. Every value is finite: ``g`` lies in about ``[-3.13, 22.87]``
    (:data:`GUMBEL_MAX`), so a token up to about 26 below the top logit (in units of ``z / T``) can still
    be drawn (23-bit uniforms stopped at about 19).
    """
    x = ((bits & 0x7FFFFFFF) * 2 + 1).to(torch.float32) * 2.0**-33
    e = torch.where(bits >= 2**31, -torch.log1p(-x), -torch.log(x))
    return -torch.log(e)


GUMBEL_MAX = float(gumbel_from_bits(torch.tensor([2**31])))
"""The largest noise the generator can produce (bits = 2^31: u = 1 - 2^-33), about 22.8732."""

GUMBEL_REACH = 22.875
"""A bound the kernels use to skip the noise of an element: its key ``y + g`` cannot beat (or tie) the
best key so far when ``y + GUMBEL_REACH <= best``. Above :data:`GUMBEL_MAX` by a margin that covers the
GPU's approximate logarithms (a few ulp of 22.87, about 6e-6)."""


def gumbel_noise(seed, offset, num_rows: int, num_cols: int, device=None) -> torch.Tensor:
    """fp32 Gumbel(0, 1) noise ``[num_rows, num_cols]``; ``seed`` and ``offset`` as in :func:`row_state`."""
    return gumbel_from_bits(random_bits(row_state(seed, offset, num_rows, device), num_cols))


# ---------------------------------------------------------------------------------------------------
# Token and confidence per row
# ---------------------------------------------------------------------------------------------------
def filter_threshold(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0, temperature: float = 0.0,
                     suppress_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per-row floor of the top-k / top-p filters: fp32 ``[N]``, a token is kept iff its logit is ``>=`` it.
    ``None`` when neither filter removes anything (``top_k`` 0 or ``>= V``, ``top_p >= 1``).

    * top-k: the k-th largest logit of the row; every token tied with it is kept.
    * top-p (the nucleus of the PD reference's ``top_p_logits``) under ``softmax(z / T)`` (``z`` itself at
      temperature 0): sorted descending, a token is kept while the probability mass strictly before it is
      ``<= top_p``, so the token that crosses ``top_p`` is kept and so is the top-1. The floor is the logit of
      the last kept token: a token tied with it is kept too (ties are never split by index, so the result
      does not depend on how a sort orders equal values).
    * both: the PD reference applies top-p, then top-k to what is left: the larger of the two floors.

    Suppressed ids are removed before both. NaN ranks above every number (as in ``torch.sort``/``topk``);
    a NaN floor becomes ``-inf`` (keep everything: such a row's confidence is NaN anyway). A row with fewer
    than k usable entries keeps them all. Probabilities are fp32 (the PD reference uses the logits' dtype).
    One ``torch.topk`` (top-k) or one ``torch.sort`` (top-p) of the rows: this pre-pass is not fused.
    """
    N, V = logits.shape
    use_k = 0 < top_k < V
    use_p = top_p < 1.0
    if not (use_k or use_p):
        return None
    dev = logits.device
    sup = None
    if suppress_ids is not None and suppress_ids.numel():
        sup = suppress_ids.to(device=dev, dtype=torch.int64)
    ninf = float("-inf")
    thr = torch.full((N,), ninf, dtype=torch.float32, device=dev)
    if use_k:
        kk = min(V, top_k + (0 if sup is None else sup.numel()))
        vals, idx = torch.topk(logits, kk, dim=-1)
        vals = vals.float()
        if sup is not None:
            vals = vals.masked_fill(torch.isin(idx, sup), ninf).sort(dim=-1, descending=True).values
        thr_k = vals[:, top_k - 1]
        thr = torch.maximum(thr, torch.where(torch.isnan(thr_k), ninf, thr_k))
    if use_p:
        sv, si = torch.sort(logits, dim=-1, descending=True)
        z = sv.float()
        y = z * torch.tensor(1.0 / temperature, dtype=torch.float32) if temperature > 0 else z
        usable = torch.ones_like(y, dtype=torch.bool) if sup is None else ~torch.isin(si, sup)
        y = y.masked_fill(~usable, ninf)
        cum = torch.softmax(y, dim=-1).cumsum(-1)
        kept = torch.ones_like(usable)
        kept[:, 1:] = cum[:, :-1] <= top_p  # mass strictly before the token; NaN (a NaN row) keeps the first
        thr_p = torch.where(kept & usable, z, float("inf")).min(dim=-1).values
        thr = torch.maximum(thr, torch.where(torch.isnan(thr_p), ninf, thr_p))
    return thr


def token_confidence_ref(logits: torch.Tensor, confidence: str = "prob", temperature: float = 0.0,
                         seed=0, offset=0, suppress_ids: torch.Tensor | None = None,
                         compute_dtype: torch.dtype = torch.float32, *, top_k: int = 0, top_p: float = 1.0,
                         filter_greedy: bool = True,
                         threshold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and confidence per row (SPEC section 5).

    Args:
        logits: ``[N, V]`` any float dtype, any strides.
        confidence: ``"prob"`` = p(token); ``"margin"`` = p(top1) - p(top2); ``"neg_entropy"`` = sum p log p.
        temperature: 0 = argmax (ties -> lowest index); > 0 = Gumbel-max sample from ``softmax(z / T)``
            with noise :func:`gumbel_noise` (seed, offset); every confidence kind is then taken under
            ``softmax(z / T)``.
        seed, offset: the random-number keys, as in :func:`row_state` (ints or int64 tensors).
        suppress_ids: int ``[S]`` ids removed before everything (their logit becomes -inf).
        compute_dtype: dtype of the softmax arithmetic (the tests use float64 as the truth). The token
            choice is always made on fp32 values, as the kernels do.
        top_k, top_p: filters of :func:`filter_threshold`, applied after the suppression, before the
            token choice and the confidence (so they change the confidence too).
        filter_greedy: apply the filters at temperature 0 as well (the PD reference does: a row whose top-1
            probability exceeds ``top_p`` keeps only that token, confidence exactly 1 for ``prob``, 0 for
            ``neg_entropy``); False: greedy rows ignore them.
        threshold: fp32 ``[N]`` floor computed already (the ops pass :func:`filter_threshold`'s result);
            excludes ``top_k`` / ``top_p``.

    Returns: ``token`` int64 ``[N]`` (``-1`` for a row with no usable entry), ``conf`` float32 ``[N]``.
    """
    if confidence not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
    N, V = logits.shape
    dev = logits.device
    sample = temperature > 0
    ninf = float("-inf")
    z = logits.float()
    if suppress_ids is not None and suppress_ids.numel():
        sup = suppress_ids.to(device=dev, dtype=torch.int64)
        selectable = torch.ones(V, dtype=torch.bool, device=dev)
        selectable[sup[(sup >= 0) & (sup < V)]] = False
        z = z.masked_fill(~selectable, ninf)
    if threshold is None:
        if sample or filter_greedy:
            threshold = filter_threshold(logits, top_k=top_k, top_p=top_p, temperature=temperature,
                                         suppress_ids=suppress_ids)
    elif top_k or top_p < 1.0:
        raise ValueError("pass either threshold or top_k / top_p, not both")
    if threshold is not None:
        z = torch.where(z < threshold.to(device=dev, dtype=torch.float32)[:, None], ninf, z)  # NaN stays NaN
    nan_row = torch.isnan(z).any(dim=-1)
    z = torch.where(torch.isnan(z), ninf, z)
    # y = z / T as a multiply by the fp32 reciprocal: the kernels do exactly this.
    y32 = z * torch.tensor(1.0 / temperature, dtype=torch.float32) if sample else z

    # token: argmax of the key (first index among equals); -1 when the row has no usable entry
    key = y32 + gumbel_noise(seed, offset, N, V, dev) if sample else y32
    best = key.max(dim=-1, keepdim=True).values
    cols = torch.arange(V, device=dev).expand(N, V)
    token = torch.where(key == best, cols, V).min(dim=-1).values
    none = best.squeeze(1) == ninf
    token = torch.where(none, -1, token)

    # confidence under softmax(y)
    y = z.to(compute_dtype) * (1.0 / temperature) if sample else z.to(compute_dtype)
    if sample and compute_dtype == torch.float32:
        y = y32
    m = y.max(dim=-1, keepdim=True).values
    p = torch.exp(y - m)
    s = p.sum(dim=-1)
    if confidence == "prob":
        conf = torch.exp(y.gather(1, token.clamp(min=0)[:, None]).squeeze(1) - m.squeeze(1)) / s
    elif confidence == "margin":
        if V >= 2:
            t2 = torch.topk(y, 2, dim=-1).values[:, 1]
        else:
            t2 = torch.full((N,), ninf, dtype=y.dtype, device=dev)
        conf = (1.0 - torch.exp(t2 - m.squeeze(1))) / s
    else:
        prob = p / s[:, None]
        conf = torch.special.xlogy(prob, prob).sum(dim=-1)
    finite = torch.isfinite(m.squeeze(1)) & ~nan_row
    conf = torch.where(finite, conf, torch.full_like(conf, float("nan")))
    conf = torch.where(none & ~nan_row, torch.full_like(conf, ninf), conf)
    return token.to(torch.int64), conf.to(torch.float32)
