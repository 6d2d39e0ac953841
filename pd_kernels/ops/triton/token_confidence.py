"""Triton kernels for the token choice, :func:`pd_kernels.token_confidence` (SPEC section 5).

Row pass (``_row_kernel``): program (row, split) streams its slice of the row once, in chunks of
``BLOCK_V`` logits viewed as ``[BLOCK_V // VEC, VEC]``: one row of that tile is one 16-byte vector (VEC = 8
bf16/fp16, 4 fp32), held by one thread, and is a *lane*. A lane sees its vectors in increasing column order
and keeps an online state (``[R]`` tensors, R = BLOCK_V // VEC): its running max ``m`` and the chunk where
it first reached it (not the column: that is recovered once after the loop by re-reading one vector),
``s = sum 2^t`` with ``t = (x - m) * log2(e) / T`` (log2 units; the subtraction first, so the top term is
exactly 1 and a row that keeps a single token has ``prob`` 1 and ``neg_entropy`` 0 exactly),
``w = sum 2^t t`` for ``neg_entropy``, the second largest ``t2`` for ``margin``, and for sampling the best
key with its column and logit. Per element the steady state costs the upcast (bf16 full chunks are read as
int32 pairs: one shift or mask per element), a share of the vector max, a subtract, a multiply, one
``ex2.approx.ftz`` and an add (plus a clamp and an FFMA for ``neg_entropy``, a top-2 for ``margin``); the
rescale ``2^(m_old - m_new)``, the argmax and the ``t2`` update are per vector. NaN needs no flag: it
reaches ``s`` through ``ex2`` (NaN in, NaN out) and makes the confidence NaN; ``max`` ignores it, so it is
never chosen. A row with no usable entry ends with ``m = -inf``: token -1.

Suppressed ids (decoding always suppresses MASK): only chunks that overlap ``[min id, max id]`` take the
per-id compare (a block-uniform branch, one chunk per row for one id). The top-k / top-p floor
(``HAS_THR``) is one compare-select per element. Full chunks load unmasked (16-byte loads when the row
stride is divisible by 16 elements); the last, partial chunk is peeled out of the loop.

Sampling: the key of an element is ``y + g`` with ``y = x / T`` (an fp32 multiply by the reciprocal) and
``g`` = :func:`pd_kernels.reference.token_confidence.gumbel_from_bits` of a counter-based hash of (row key, column),
the row key being the row's (seed, counter) (``_row_state``), never its position. The noise is computed
only for chunks where some lane can still win: ``max(y) + GUMBEL_REACH > best key`` (one block-wide
``max`` per chunk decides, so the branch is uniform). Where most of a row lies more than about 23 below
the best key (low temperatures, peaked rows, top-k / top-p), chunks cost about what greedy ones do; a
chunk in reach costs about 150 instructions per element (hash, two libdevice logs, the key).

The lanes are merged once, after the loop, with the rules that merge splits: global max; first index among
equal maxima; ``t2 = max(max_l t2_l, max over the other lanes of m_l)``; ``s = sum_l s_l 2^(m_l - m)``,
``w`` likewise. With one split the program writes the token and confidence; with several (few rows: the
grid must still cover the SMs) each program writes its merged partial state and ``_merge_kernel`` (one
program per row) combines them.

Measured by ``tests/test_triton_compile.py`` (sm_90 SASS, not run: no GPU), steady path of the main loop
per bf16 element at V = 152064, BLOCK_V 4096 x 8 warps, one suppressed id, Triton 3.9 (3.6): greedy
``prob`` 7.9 (8.3), ``neg_entropy`` 10.8 (10.6), ``margin`` 12.8 (13.1); sampled ``prob`` 9.9 (10.5),
``neg_entropy`` 12.3 (13.0). Issue 14's goals: <= 12 greedy ``prob`` / ``neg_entropy``, <= 20 sampling; the
previous kernel took 29 / 36 / 106. Registers 61-64 greedy (4 CTAs of 256 threads per SM), 113-128
sampling (2 CTAs), no spills.

Exact arithmetic on a GPU, emulated in the interpreter (``INTERP``): ``ex2.approx.ftz`` is ``tl.exp2``;
the noise uses libdevice ``log``/``log1p`` (accurate, also where ``-log1p(-w)`` is tiny) and ``mul_rn`` /
``add_rn`` so that ``y = x * (1/T)`` and ``y + g`` are rounded as the reference rounds them (no FMA
contraction); the interpreter has no libdevice and uses numpy's log, Kahan's form of ``log1p`` and plain
fp32 arithmetic (already rounded per operation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import sm_count
from ..._backend import triton_interpreter
from ...reference.token_confidence import CONFIDENCE_KIND_ID, GUMBEL_REACH

# the confidence kinds' ids (``KIND``), from their one home
_PROB = tl.constexpr(CONFIDENCE_KIND_ID["prob"])
_MARGIN = tl.constexpr(CONFIDENCE_KIND_ID["margin"])
_NEG_ENTROPY = tl.constexpr(CONFIDENCE_KIND_ID["neg_entropy"])
_REACH = tl.constexpr(GUMBEL_REACH)
_LOG2E = tl.constexpr(1.4426950408889634)
_BIG = tl.constexpr(2147483647)
_FLOOR = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: a lane's shift while it has seen nothing usable
_INTERP = triton_interpreter()  # TRITON_INTERPRET is read once, before Triton is imported


@triton.jit
def _mix32(h, k):
    # murmur3 round on uint32 (products wrap mod 2^32); mirrored in reference/token_confidence.py and
    # csrc/token_confidence.cu
    k = k * 0xCC9E2D51
    k = (k << 15) | (k >> 17)
    k = k * 0x1B873593
    h = h ^ k
    h = (h << 13) | (h >> 19)
    return h * 5 + 0xE6546B64


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _words(v):
    """Low and high 32-bit words of an int64 (its uint64 bit pattern)."""
    return (v & 0xFFFFFFFF).to(tl.uint32), ((v >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _row_state(row, seed_ptr, off_ptr, seed_lo, seed_hi, off_lo, off_hi,
               SEED_T: tl.constexpr, OFF_MODE: tl.constexpr):
    """Hash state of ``row`` from its (seed, counter), as ``reference.token_confidence.row_state``: the seed is a
    per-row tensor (``SEED_T``) or the scalar words; the counter is ``offset[row]`` (``OFF_MODE`` 2) or
    ``offset + row`` with the offset in a one-element tensor (1) or the scalar words (0)."""
    if SEED_T:
        s_lo, s_hi = _words(tl.load(seed_ptr + row))
    else:
        s_lo = seed_lo.to(tl.uint32, bitcast=True)
        s_hi = seed_hi.to(tl.uint32, bitcast=True)
    if OFF_MODE == 2:
        c_lo, c_hi = _words(tl.load(off_ptr + row))
    else:
        if OFF_MODE == 1:
            b_lo, b_hi = _words(tl.load(off_ptr))
        else:
            b_lo = off_lo.to(tl.uint32, bitcast=True)
            b_hi = off_hi.to(tl.uint32, bitcast=True)
        r32 = row.to(tl.uint32)
        c_lo = b_lo + r32
        c_hi = b_hi + (c_lo < r32).to(tl.uint32)  # carry
    h = _mix32(s_lo, s_hi)
    h = _mix32(h, c_lo)
    return _mix32(h, c_hi)


@triton.jit
def _gumbel(bits, INTERP: tl.constexpr):
    """``reference.token_confidence.gumbel_from_bits``: x = fp32(2r + 1) 2^-33 with r the low 31 bits; E = -log(x)
    (top bit 0) or -log1p(-x) (top bit 1, u = 1 - x: exact near u = 1); g = -log(E)."""
    x = ((bits << 1) | 1).to(tl.float32) * 1.16415321826934814453125e-10
    hi = bits >= 0x80000000
    if INTERP:
        u = 1.0 - x  # log1p(-x) = log(u) * (-x) / (u - 1) (Kahan), exact where u rounds to 1
        l1p = tl.where(u == 1.0, -x, tl.log(u) * (-x / (u - 1.0)))
        e = tl.where(hi, -l1p, -tl.log(x))
        g = -tl.log(e)
    else:
        e = tl.where(hi, -libdevice.log1p(-x), -libdevice.log(x))
        g = -libdevice.log(e)
    return g


@triton.jit
def _top2(a1, b1, a2, b2):
    # (largest, second largest of the multiset) of two pairs; NaN-free inputs
    return tl.maximum(a1, a2), tl.maximum(tl.minimum(a1, a2), tl.maximum(b1, b2))


@triton.jit
def _consume(x, cols, c, m, ms, s, w, t2, ci, bk, bi, bx, h_row, inv_t, scale,
             KIND: tl.constexpr, SAMPLE: tl.constexpr, INTERP: tl.constexpr):
    """One chunk ``x`` fp32 ``[R, VEC]`` (suppressed / filtered entries already -inf) into the lane states.

    Every term is ``2^t`` with ``t = (x - ms) * scale`` (log2 units) and ``ms = max(m, -FLT_MAX)`` the lane's
    shift (finite, so -inf entries stay -inf while the lane has seen nothing usable): the subtraction first,
    so the top term is exactly 2^0 = 1 (a row that keeps one token has prob exactly 1 and neg_entropy 0)."""
    NEG_INF = float("-inf")
    if KIND == _MARGIN:
        xc = tl.where(x == x, x, NEG_INF)
        vmax, sec = tl.reduce((xc, tl.full(x.shape, NEG_INF, tl.float32)), 1, _top2)
    else:
        vmax = tl.max(x, axis=1)  # ignores NaN (max.f32 / nanmax)
        sec = vmax
    up = vmax > m
    mn = tl.maximum(m, vmax)
    msn = tl.maximum(mn, _FLOOR)
    # rescale of the old sums, 2^((ms - msn) scale): nothing seen yet (-FLT_MAX) -> 2^-256 = 0; no change -> 1.
    # Clamped before the multiply (no overflow to -inf; the same result)
    dl = tl.maximum(ms - msn, -256.0 / scale) * scale
    alpha = tl.exp2(dl)
    t = (x - msn[:, None]) * scale
    p = tl.exp2(t)
    if KIND == _NEG_ENTROPY:
        # w = sum p t (log2 units): t >= -256 keeps 0 * -inf out (p = 0 there); NaN stays in p
        w = alpha * (w + dl * s) + tl.sum(p * tl.maximum(t, -256.0), axis=1)
    if KIND == _MARGIN:
        t2 = tl.where(up, tl.maximum(m, sec), tl.maximum(t2, vmax))
    s = alpha * s + tl.sum(p, axis=1)
    ci = tl.where(up, c, ci)
    if SAMPLE:
        # noise only where some lane can still win: y + GUMBEL_REACH > best key (one block max decides)
        need = vmax * inv_t + _REACH > bk
        if tl.max(need.to(tl.int32), axis=0) > 0:
            if INTERP:
                key = x * inv_t + _gumbel(_fmix32(_mix32(h_row, cols.to(tl.uint32))), INTERP)
            else:
                key = libdevice.add_rn(libdevice.mul_rn(x, inv_t),
                                       _gumbel(_fmix32(_mix32(h_row, cols.to(tl.uint32))), INTERP))
            kmax = tl.max(key, axis=1)
            kup = kmax > bk  # strict: a lane keeps its first column among equal keys
            kcol = tl.min(tl.where(key == kmax[:, None], cols, _BIG), axis=1)
            kx = tl.max(tl.where(cols == kcol[:, None], x, NEG_INF), axis=1)
            bk = tl.where(kup, kmax, bk)
            bi = tl.where(kup, kcol, bi)
            bx = tl.where(kup, kx, bx)
    return mn, msn, s, w, t2, ci, bk, bi, bx


@triton.jit
def _sup_id(sup_ptr, q):
    """Suppressed id ``q`` as an int32 that matches a column iff the id does: an id outside ``[0, 2^31 - 1)``
    (int64 ids can be, e.g. ``2^32 + v``, which a plain int32 cast would wrap onto column v) becomes -1."""
    sid = tl.load(sup_ptr + q)
    return tl.where((sid >= 0) & (sid < 2147483647), sid, -1).to(tl.int32)


@triton.jit
def _mask(x, cols, sup_ptr, n_sup, thr, HAS_SUP: tl.constexpr, HAS_THR: tl.constexpr):
    """Suppressed ids and entries below the row's floor become -inf (a NaN below nothing stays NaN)."""
    if HAS_SUP:
        for q in range(n_sup):
            x = tl.where(cols == _sup_id(sup_ptr, q), float("-inf"), x)
    if HAS_THR:
        x = tl.where(x < thr, float("-inf"), x)
    return x


# ``stride`` is specialized (divisible by 16 or not): with an aligned row start the unmasked full-chunk loads
# vectorize. It is fixed for a model's logits buffer (V or a row pitch), so a decode loop does not recompile.
@triton.jit(do_not_specialize=["V", "n_sup", "seed_lo", "seed_hi", "off_lo", "off_hi", "inv_t",
                               "chunks_per_split", "n_split"])
def _row_kernel(
    x_ptr, stride, V,
    sup_ptr, n_sup, thr_ptr,
    seed_ptr, off_ptr, seed_lo, seed_hi, off_lo, off_hi, inv_t,
    tok_ptr, conf_ptr, part_ptr,
    chunks_per_split, n_split,
    KIND: tl.constexpr, SAMPLE: tl.constexpr, SEED_T: tl.constexpr, OFF_MODE: tl.constexpr,
    HAS_SUP: tl.constexpr, HAS_THR: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, BF16_PAIRS: tl.constexpr, INTERP: tl.constexpr,
):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    p_row = x_ptr + row.to(tl.int64) * stride
    o_r = tl.arange(0, BLOCK_V // VEC)
    o_j = tl.arange(0, VEC)
    o2 = o_r[:, None] * VEC + o_j[None, :]
    NEG_INF = float("-inf")
    if BF16_PAIRS:  # the launcher checked: 4-byte aligned rows
        p_pairs = p_row.to(tl.pointer_type(tl.int32))
        o_w = o_r[:, None] * (VEC // 2) + tl.arange(0, VEC // 2)[None, :]
    if SAMPLE:
        scale = inv_t * _LOG2E
        h_row = _row_state(row, seed_ptr, off_ptr, seed_lo, seed_hi, off_lo, off_hi, SEED_T, OFF_MODE)
    else:
        scale = _LOG2E + tl.zeros([], tl.float32)
        h_row = tl.zeros([], tl.uint32)
    thr = tl.load(thr_ptr + row) if HAS_THR else NEG_INF

    # suppressed ids: only chunks overlapping [sup_lo, sup_hi] take the per-id compares (typically one chunk:
    # the MASK id). Ids out of [0, V) never match.
    sup_lo = tl.full([], 2147483647, tl.int32)
    sup_hi = tl.full([], -1, tl.int32)
    if HAS_SUP:
        for q in range(n_sup):
            sid = _sup_id(sup_ptr, q)
            sup_lo = tl.minimum(sup_lo, tl.where(sid >= 0, sid, 2147483647))
            sup_hi = tl.maximum(sup_hi, sid)

    R: tl.constexpr = BLOCK_V // VEC
    m = tl.full([R], NEG_INF, tl.float32)
    ms = tl.full([R], _FLOOR, tl.float32)
    s = tl.zeros([R], tl.float32)
    w = tl.zeros([R], tl.float32)
    t2 = tl.full([R], NEG_INF, tl.float32)
    ci = tl.full([R], -1, tl.int32)
    bk = tl.full([R], NEG_INF, tl.float32)
    bi = tl.full([R], -1, tl.int32)
    bx = tl.full([R], NEG_INF, tl.float32)

    c_lo = sp * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, tl.cdiv(V, BLOCK_V))
    c_full = tl.minimum(c_hi, V // BLOCK_V)
    # full chunks: unmasked loads (a mask from the unspecialized V would split them into scalar loads)
    for c in range(c_lo, c_full):
        c0 = c * BLOCK_V
        cols = c0 + o2
        if BF16_PAIRS:
            # bf16 read as int32 pairs: the upcast is one shift / one mask per element (the bf16 -> fp32
            # conversion of a whole 16-byte vector costs 1.5 instructions per element), exact in the interpreter
            wv = tl.load(p_pairs + c * (BLOCK_V // 2) + o_w)
            x = tl.reshape(tl.join((wv << 16).to(tl.float32, bitcast=True),
                                   (wv & -65536).to(tl.float32, bitcast=True)), [BLOCK_V // VEC, VEC])
        else:
            x = tl.load(p_row + cols).to(tl.float32)  # fp32 right after the load: all arithmetic below is fp32
        if HAS_SUP:
            if (sup_hi >= c0) & (sup_lo - c0 < BLOCK_V):
                x = _mask(x, cols, sup_ptr, n_sup, thr, HAS_SUP, False)
        x = _mask(x, cols, sup_ptr, n_sup, thr, False, HAS_THR)
        m, ms, s, w, t2, ci, bk, bi, bx = _consume(x, cols, c, m, ms, s, w, t2, ci, bk, bi, bx, h_row, inv_t,
                                                   scale, KIND, SAMPLE, INTERP)
    # the partial last chunk (only in the split that holds it)
    if c_full < c_hi:
        c0 = c_full * BLOCK_V
        cols = c0 + o2
        x = tl.load(p_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
        x = _mask(x, cols, sup_ptr, n_sup, thr, HAS_SUP, HAS_THR)
        m, ms, s, w, t2, ci, bk, bi, bx = _consume(x, cols, c_full, m, ms, s, w, t2, ci, bk, bi, bx, h_row,
                                                   inv_t, scale, KIND, SAMPLE, INTERP)

    # merge the lanes once: global max, then the first index among equal maxima. A lane knows only the chunk
    # of its max, so the winning vector (lowest start among lanes at the max) is read again to find the column.
    mx = tl.max(m, axis=0)
    starts = tl.where(ci >= 0, ci * BLOCK_V + o_r * VEC, _BIG)
    win = tl.min(tl.where(m == mx, starts, _BIG), axis=0)
    found = mx > NEG_INF
    wcols = tl.where(found, win, 0) + o_j
    xv = tl.load(p_row + wcols, mask=wcols < tl.where(found, V, 0), other=NEG_INF).to(tl.float32)
    xv = _mask(xv, wcols, sup_ptr, n_sup, thr, HAS_SUP, HAS_THR)
    tok = tl.where(found, win + tl.min(tl.where(xv == mx, o_j, VEC), axis=0), -1)
    msx = tl.maximum(mx, _FLOOR)
    live = m > NEG_INF
    dl = tl.where(live, ms - msx, 0.0) * scale
    alpha = tl.where(live, tl.exp2(dl), 0.0)
    s_m = tl.sum(alpha * s, axis=0)  # NaN anywhere (a NaN logit, an inf - inf) stays NaN
    w_m = tl.sum(alpha * (w + dl * s), axis=0) if KIND == _NEG_ENTROPY else tl.zeros([], tl.float32)
    if KIND == _MARGIN:
        t2_m = tl.maximum(tl.max(t2, axis=0), tl.max(tl.where((m == mx) & (starts == win), NEG_INF, m), axis=0))
    else:
        t2_m = tl.full([], NEG_INF, tl.float32)
    if SAMPLE:
        bk_m = tl.max(bk, axis=0)
        bi_m = tl.min(tl.where(bk == bk_m, bi, _BIG), axis=0)
        bx_m = tl.max(tl.where(bi == bi_m, bx, NEG_INF), axis=0)
    else:
        bk_m = tl.full([], NEG_INF, tl.float32)
        bi_m = tok
        bx_m = mx

    if SPLIT:
        pf = part_ptr + (row * n_split + sp).to(tl.int64) * 8
        pi = pf.to(tl.pointer_type(tl.int32))
        tl.store(pf + 0, mx)
        tl.store(pf + 1, t2_m)
        tl.store(pf + 2, s_m)
        tl.store(pf + 3, w_m)
        tl.store(pf + 4, bk_m)
        tl.store(pf + 5, bx_m)
        tl.store(pi + 6, tok)
        tl.store(pi + 7, bi_m)
    else:
        _finish(tok_ptr, conf_ptr, row, mx, t2_m, s_m, w_m, tok, bi_m, bx_m, scale, KIND, SAMPLE)


@triton.jit
def _finish(tok_ptr, conf_ptr, row, m, t2, s, w, tok, bi, bx, scale, KIND: tl.constexpr, SAMPLE: tl.constexpr):
    """Token and confidence from a row's merged state: m, t2 and bx (the sampled token's logit) in units of x,
    s and w against the shift max(m, -FLT_MAX) (see ``_consume``)."""
    if SAMPLE:
        token = bi
        xt = bx
    else:
        token = tok
        xt = m
    if KIND == _PROB:
        c = tl.exp2((xt - m) * scale) / s
    elif KIND == _MARGIN:
        c = (1.0 - tl.exp2((t2 - m) * scale)) / s
    else:
        c = w / s * 0.6931471805599453 - tl.log(s)
    ok = (m > float("-inf")) & (m < float("inf")) & (s == s)
    c = tl.where(ok, c, float("nan"))
    c = tl.where(m == float("-inf"), tl.where(s == s, float("-inf"), float("nan")), c)  # no usable entry
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(conf_ptr + row, c)


@triton.jit(do_not_specialize=["n_split", "inv_t"])
def _merge_kernel(tok_ptr, conf_ptr, part_ptr, n_split, inv_t,
                  KIND: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    o = tl.arange(0, BLOCK_S)
    ms = o < n_split
    NEG_INF = float("-inf")
    pf = part_ptr + (row * n_split + o).to(tl.int64) * 8
    pi = pf.to(tl.pointer_type(tl.int32))
    ms_ = tl.load(pf + 0, mask=ms, other=NEG_INF)
    t2s = tl.load(pf + 1, mask=ms, other=NEG_INF)
    ss = tl.load(pf + 2, mask=ms, other=0.0)
    ws = tl.load(pf + 3, mask=ms, other=0.0)
    toks = tl.load(pi + 6, mask=ms, other=-1)
    # splits are combined with the rules that merge lanes (first index among equal maxima, etc.)
    mx = tl.max(ms_, axis=0)
    found = mx > NEG_INF
    tok = tl.where(found, tl.min(tl.where((ms_ == mx) & (toks >= 0), toks, _BIG), axis=0), -1)
    scale = inv_t * _LOG2E if SAMPLE else _LOG2E + tl.zeros([], tl.float32)
    live = ms_ > NEG_INF
    dl = tl.where(live, ms_ - mx, 0.0) * scale
    alpha = tl.where(live, tl.exp2(dl), 0.0)
    s = tl.sum(alpha * ss, axis=0)
    w = tl.sum(alpha * (ws + dl * ss), axis=0) if KIND == _NEG_ENTROPY else tl.zeros([], tl.float32)
    t2 = tl.maximum(tl.max(t2s, axis=0), tl.max(tl.where((ms_ == mx) & (toks == tok), NEG_INF, ms_), axis=0))
    bi = tok
    bx = mx
    if SAMPLE:
        bks = tl.load(pf + 4, mask=ms, other=NEG_INF)
        bxs = tl.load(pf + 5, mask=ms, other=NEG_INF)
        bis = tl.load(pi + 7, mask=ms, other=-1)
        bk = tl.max(bks, axis=0)
        bi = tl.min(tl.where(bks == bk, bis, _BIG), axis=0)
        bx = tl.max(tl.where(bis == bi, bxs, NEG_INF), axis=0)
    _finish(tok_ptr, conf_ptr, row, mx, t2, s, w, tok, bi, bx, scale, KIND, SAMPLE)


# ---- launcher --------------------------------------------------------------------------------------------
_PLANS: dict = {}


def _plan(N: int, V: int, elem: int, device: torch.device, num_splits, block_v, num_warps):
    """Launch geometry for (N, V, element size, device), cached: (BLOCK_V, VEC, num_warps, splits, chunks per
    split). GPU: 4096 x 8 warps (two 16-byte vectors per thread per trip for bf16/fp16); interpreter: 4096."""
    key = (N, V, elem, device, num_splits, block_v, num_warps)
    plan = _PLANS.get(key)
    if plan is None:
        vec = 16 // elem
        if block_v is None:
            block_v = 4096 if V >= 4096 else max(16 * vec, triton.next_power_of_2(V))
        vec = min(vec, block_v)
        nw = num_warps if num_warps is not None else (8 if block_v >= 4096 else 4)
        n_chunks = triton.cdiv(V, block_v)
        if num_splits is None:
            # aim at >= 2 programs per SM; never split below ~4 chunks per program (the merge has a cost)
            target = 2 * sm_count(device)
            cap = n_chunks // 4 if device.type == "cuda" else n_chunks
            num_splits = max(1, min(triton.cdiv(target, max(N, 1)), cap))
        num_splits = max(1, min(num_splits, n_chunks))
        cps = triton.cdiv(n_chunks, num_splits)
        num_splits = triton.cdiv(n_chunks, cps)  # no empty split
        plan = (block_v, vec, nw, num_splits, cps)
        if len(_PLANS) > 4096:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _s32(v: int) -> int:
    """Low 32 bits of ``v`` as a signed int32 (a fixed kernel argument type)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def token_confidence_triton(logits: torch.Tensor, token: torch.Tensor, conf: torch.Tensor,
                            suppress_ids: torch.Tensor | None, seed_t: torch.Tensor | None,
                            offset_t: torch.Tensor | None, threshold: torch.Tensor | None, seed: int,
                            offset: int, kind: str, temperature: float, *, num_splits: int | None = None,
                            block_v: int | None = None, num_warps: int | None = None) -> None:
    """Shapes as :func:`pd_kernels.token_confidence` (validated there): ``seed_t`` int64 ``[N]`` or None,
    ``offset_t`` int64 ``[1]`` / ``[N]`` or None, ``threshold`` fp32 ``[N]`` or None. ``token``/``conf`` are
    written. ``num_splits``, ``block_v``, ``num_warps``: launch overrides for tests and benchmark sweeps."""
    N, V = logits.shape
    if N == 0:
        return
    dev = logits.device
    block_v, vec, nw, n_split, cps = _plan(N, V, logits.element_size(), dev, num_splits, block_v, num_warps)
    sample = temperature > 0
    n_sup = 0 if suppress_ids is None else suppress_ids.shape[0]
    if sample:
        off_mode = 0 if offset_t is None else (2 if offset_t.shape[0] == N and N > 1 else 1)
        keys = (_s32(seed), _s32(seed >> 32), _s32(offset), _s32(offset >> 32))
        inv_t = 1.0 / temperature
    else:
        off_mode, seed_t, offset_t = 0, None, None  # greedy: no random numbers, one variant
        keys = (0, 0, 0, 0)
        inv_t = 1.0
    split = n_split > 1
    # split partial states: [N, splits, 8] fp32, words 6 and 7 holding int32 (one allocation)
    part = torch.empty((N, n_split, 8), dtype=torch.float32, device=dev) if split else conf
    kid = CONFIDENCE_KIND_ID[kind]
    _row_kernel[(N, n_split)](
        logits, logits.stride(0), V, suppress_ids if n_sup else token, n_sup,
        threshold if threshold is not None else conf,
        seed_t if seed_t is not None else token, offset_t if offset_t is not None else token, *keys, inv_t,
        token, conf, part, cps, n_split,
        KIND=kid, SAMPLE=sample, SEED_T=seed_t is not None, OFF_MODE=off_mode, HAS_SUP=n_sup > 0,
        HAS_THR=threshold is not None, SPLIT=split, BLOCK_V=block_v, VEC=vec, INTERP=_INTERP, num_warps=nw,
        BF16_PAIRS=logits.dtype == torch.bfloat16 and vec > 1 and logits.stride(0) % 2 == 0
        and logits.data_ptr() % 4 == 0,
    )
    if split:
        _merge_kernel[(N,)](token, conf, part, n_split, inv_t, KIND=kid, SAMPLE=sample,
                            BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=1)
