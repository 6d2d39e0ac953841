"""Triton kernels for token choice and span commits (SPEC section 5).

Row pass (``_row_kernel``): program (row, split) streams its slice of the row once, in chunks of
``BLOCK_V`` logits. The online state is kept **per lane** (vectors of ``BLOCK_V``; lane l sees columns
l, l + BLOCK_V, ... in increasing order) and reduced across lanes once, after the loop: top-1 value/index
(strict ``>`` keeps the lane's first index among equals), top-2 value (a duplicated maximum counts),
``s = sum exp(y - m_l)`` and ``w = sum exp(y - m_l) (y - m_l)`` against the lane's own running max
``m_l`` (= its top-1), a NaN flag, and for sampling the best Gumbel key with its index and logit. The lane
merge uses the rules that merge splits: global max; first index among equal maxima;
``t2 = max(max_l t2_l, max over the other lanes of t1_l)``; ``s = sum_l s_l exp(m_l - m)``, ``w`` likewise.
With one split the program writes the token and confidence; with several (few rows: the grid must still
cover the SMs), each program writes its lane-merged partial state and ``_merge_kernel`` (one program per
row) combines them.

Why per-lane max (not one shared chunk max per chunk): the lane's running max is its top-1, which the
argmax needs per lane anyway, so it costs nothing extra; and the update needs one exp per element either
way (``e = exp(-|y - m_l|)`` is the new term when ``y <= m_l`` and the rescale of the old sums when
``y > m_l``). A shared max would add one block reduction per chunk and gain nothing. In the interpreter
it was also slower (N=4, V=152064, BLOCK_V=4096: 2.0 vs 1.5 ms per program step for margin).

Cost per chunk: the previous version did 5-6 block reductions per chunk (NaN flag, max, arg-min over
equal maxima, second max, sum p, plus sum p (y - m) for neg_entropy) and 3 more when sampling (key max, its
arg-min, its logit); each is warp shuffles + a shared-memory round trip + barriers. Now: **0 per chunk**
and 6-9 once per program. Compiled for sm_90a (Triton 3.9 here, ptxas, no GPU run): the loop body has no
``bar.sync`` / ``shfl`` (10 and 24 before), one exp per element, one ``ld.global.v4`` per thread per full
chunk (full chunks load unmasked; before: 8 scalar 2-byte loads), no spills. Registers at BLOCK_V 2048 x
8 warps, measured by tests/test_triton_compile.py (cuobjdump of the sm_90 cubin): 98-110 greedy, up to
146 when sampling; so 2 CTAs of 256 threads per SM for greedy rows, 1 for some sampling variants. The suppressed ids are range-checked per chunk (min/max id hoisted before the loop):
only chunks that overlap the id range run the per-id compares.

Predicted GPU effect (**not measured: no GPU was available for this change**): reductions per chunk
5-9 -> 0, so the loop should become load-bound; expect roughly 1.5-2.5x faster rows at N >= 256,
V = 152064 bf16. Reaching 80% of copy bandwidth is *not* assured: with ~100 registers (2 CTAs of 256
threads per SM) and one 16-byte load per thread per trip, about 8 KB per SM is in flight, while Little's
law at 3 TB/s and ~600 ns asks for ~14 KB, unless consecutive trips overlap. If it falls short, sweep
``benchmarks/bench_unmask.py --triton-configs 2048x8,1024x4,4096x8`` and try unrolling two chunks per
trip (twice the bytes in flight for the same per-lane state).

Commit (``_commit_kernel``, one launch): program j handles span j, i.e. its rows
``span_rows[j] = (first, count)`` (clipped to ``[0, N)``), never the rest of the step, so its cost scales
with its own span m_j (O(m_j) or O(m_j^2), below) and not with N. Rows are visited in chunks of ``BLOCK``:

* pass 0 (O(m)): m (masked rows), c (candidates: masked with a token >= 0) and the top-1 candidate (key, dst);
* pass A (O(m c), ``schedule`` / ``pd_threshold`` only, and only when the budget b is below c): the rank of
  every candidate (candidates that beat it), tiles of ``BLOCK x BLOCK_J`` compares; the one candidate of
  rank b - 1 is the *pivot*. Nothing is written, so every pass sees this step's masks;
* pass B (O(m)): a candidate is in the top b iff its (key, dst) is at or above the pivot's, and is the top-1
  iff it equals the top-1's; decide from the policy, write the token, count.

Because "in the top b" and "top-1" are comparisons against two values, no decision needs to be stored
between passes (no workspace): a span longer than one chunk simply loops. The all-done flag is folded in
the same launch: each program adds ``1 + (masks_left[j] != 0) << 32`` to the state's int64 ``arrivals``
counter; the program that sees ``S - 1`` arrivals before its own is the last one, and the counter's high word
then counts the spans with masks left: it writes ``all_done`` and sets the counter back to 0. Every fact
it uses comes with the atomic's return value, so a relaxed atomic suffices (no fence, no spin, no host).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sm_count

_KINDS = {"prob": 0, "margin": 1, "neg_entropy": 2}
_POLICIES = {"threshold": 0, "schedule": 1, "pd_threshold": 2}


@triton.jit
def _mix32(h, k):
    # murmur3 round on uint32 (products wrap mod 2^32); mirrored in reference/unmask.py and csrc/unmask.cu
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


# ``stride`` is specialized (divisible by 16 or not): with an aligned row start the unmasked full-chunk loads
# vectorize. It is fixed for a model's logits buffer (V or a row pitch), so a decode loop does not recompile.
@triton.jit(do_not_specialize=["V", "n_sup", "seed_lo", "seed_hi", "off_lo", "off_hi", "inv_t",
                               "chunks_per_split", "n_split"])
def _row_kernel(
    x_ptr, stride, V,
    sup_ptr, n_sup,
    off_ptr, seed_lo, seed_hi, off_lo, off_hi, inv_t,
    tok_ptr, conf_ptr, fpart_ptr, ipart_ptr,
    chunks_per_split, n_split,
    KIND: tl.constexpr, SAMPLE: tl.constexpr, HAS_OFF_T: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    p_row = x_ptr + row.to(tl.int64) * stride
    o = tl.arange(0, BLOCK_V)
    NEG_INF = float("-inf")

    if SAMPLE:
        if HAS_OFF_T:
            off = tl.load(off_ptr)
            o_lo = (off & 0xFFFFFFFF).to(tl.uint32)
            o_hi = ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)
        else:
            o_lo = off_lo.to(tl.uint32, bitcast=True)
            o_hi = off_hi.to(tl.uint32, bitcast=True)
        h_row = seed_lo.to(tl.uint32, bitcast=True)
        h_row = _mix32(h_row, seed_hi.to(tl.uint32, bitcast=True))
        h_row = _mix32(h_row, o_lo)
        h_row = _mix32(h_row, o_hi)
        h_row = _mix32(h_row, row.to(tl.uint32))

    # suppressed ids: only chunks overlapping [sup_lo, sup_hi] run the per-id compare loop (typically one
    # chunk: the MASK id), so the steady-state chunk does no scalar loads. Ids out of [0, V) never match.
    sup_lo = tl.full([], 2147483647, tl.int32)
    sup_hi = tl.full([], -1, tl.int32)
    for q in range(n_sup):
        sid = tl.load(sup_ptr + q).to(tl.int32)
        sup_lo = tl.minimum(sup_lo, sid)
        sup_hi = tl.maximum(sup_hi, sid)

    # per-lane online state [BLOCK_V]; lane l sees columns l, l + BLOCK_V, ... in increasing order.
    # index V = "no selectable column yet"; m = t1 (the lane's running max doubles as the softmax shift)
    t1 = tl.full([BLOCK_V], NEG_INF, tl.float32)
    t2 = tl.full([BLOCK_V], NEG_INF, tl.float32)
    i1 = tl.zeros([BLOCK_V], tl.int32) + V
    s = tl.zeros([BLOCK_V], tl.float32)
    w = tl.zeros([BLOCK_V], tl.float32)
    nan = tl.zeros([BLOCK_V], tl.int32)
    if SAMPLE:
        bk = tl.full([BLOCK_V], NEG_INF, tl.float32)
        bi = tl.zeros([BLOCK_V], tl.int32) + V
        by = tl.full([BLOCK_V], NEG_INF, tl.float32)

    c_lo = sp * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, tl.cdiv(V, BLOCK_V))
    for c in range(c_lo, c_hi):
        c0 = c * BLOCK_V
        cols = c0 + o
        inb = cols < V
        # fp32 right after the load: all arithmetic below runs in fp32. Full chunks load without a mask
        # (a mask from the unspecialized V would split the load into one scalar load per element)
        if c0 + BLOCK_V <= V:
            x = tl.load(p_row + cols).to(tl.float32)
        else:
            x = tl.load(p_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
        nan = tl.maximum(nan, (x != x).to(tl.int32))
        sel = inb
        if (sup_hi >= c0) & (sup_lo - c0 < BLOCK_V):
            for q in range(n_sup):
                sel = sel & (cols != tl.load(sup_ptr + q).to(tl.int32))
        y = tl.where(sel & (x == x), x, NEG_INF)
        if SAMPLE:
            y = y * inv_t
        # top-1 / top-2 per lane: strict > keeps the lane's first index among equals; a lane's first
        # selectable column is taken even at -inf (an all -inf row still has the argmax of the reference)
        gt = y > t1
        take = gt | (sel & (i1 == V))
        # online softmax against the lane max, one exp per element: e = exp(-|y - m|) is the new term's
        # p when y <= m, and the rescale of the old sums when y > m (the new term's p is then 1)
        d = tl.where(y == NEG_INF, NEG_INF, -tl.abs(y - t1))  # -inf - -inf would be NaN
        e = tl.exp(d)
        if KIND == 2:
            # w = sum p (y - m): when y > m the old terms shift by d = m - y; e * d = 0 where e = 0
            ed = tl.where(e == 0.0, 0.0, e * d)
            w = tl.where(gt, e * w + ed * s, w + ed)
        s = tl.where(gt, e * s + 1.0, s + e)
        t2 = tl.where(gt, t1, tl.maximum(t2, y))
        t1 = tl.where(gt, y, t1)
        i1 = tl.where(take, cols, i1)
        if SAMPLE:
            hh = _fmix32(_mix32(h_row, cols.to(tl.uint32)))
            u = ((hh >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # never 0 or 1
            g = -tl.log(-tl.log(u))
            key = tl.where(sel, y + g, NEG_INF)
            tb = (key > bk) | (sel & (bi == V))
            bk = tl.where(tb, key, bk)
            bi = tl.where(tb, cols, bi)
            by = tl.where(tb, y, by)

    # merge the lanes once, with the rules used for chunks and splits: first index among equal maxima;
    # t2 = second largest of the multiset (a maximum duplicated in another lane gives t2 = t1)
    m = tl.max(t1, axis=0)
    i1_m = tl.min(tl.where(t1 == m, i1, V), axis=0)
    t2_m = tl.max(tl.maximum(t2, tl.where(i1 == i1_m, NEG_INF, t1)), axis=0)
    alpha = tl.where(t1 == NEG_INF, 0.0, tl.exp(t1 - m))
    s_m = tl.sum(alpha * s, axis=0)
    w_m = tl.full([], 0.0, tl.float32)
    if KIND == 2:
        shift = tl.where(t1 == NEG_INF, 0.0, t1 - m)
        w_m = tl.sum(alpha * (w + shift * s), axis=0)
    nan_m = tl.max(nan, axis=0)
    bk_m = tl.full([], NEG_INF, tl.float32)
    bi_m = i1_m
    by_m = m
    if SAMPLE:
        bk_m = tl.max(bk, axis=0)
        bi_m = tl.min(tl.where(bk == bk_m, bi, V), axis=0)
        by_m = tl.max(tl.where(bi == bi_m, by, NEG_INF), axis=0)

    if SPLIT:
        pf = fpart_ptr + (row * n_split + sp).to(tl.int64) * 6
        tl.store(pf + 0, m)
        tl.store(pf + 1, t2_m)
        tl.store(pf + 2, s_m)
        tl.store(pf + 3, w_m)
        tl.store(pf + 4, bk_m)
        tl.store(pf + 5, by_m)
        pi = ipart_ptr + (row * n_split + sp).to(tl.int64) * 3
        tl.store(pi + 0, i1_m)
        tl.store(pi + 1, bi_m)
        tl.store(pi + 2, nan_m)
    else:
        _finish(tok_ptr, conf_ptr, row, m, t2_m, i1_m, s_m, w_m, nan_m, bi_m, by_m, KIND, SAMPLE)


@triton.jit
def _finish(tok_ptr, conf_ptr, row, t1, t2, i1, s, w, nan, bi, by, KIND: tl.constexpr, SAMPLE: tl.constexpr):
    if SAMPLE:
        tok = bi
        ytok = by
    else:
        tok = i1
        ytok = t1
    if KIND == 0:
        c = tl.exp(ytok - t1) / s
    elif KIND == 1:
        c = (1.0 - tl.exp(t2 - t1)) / s
    else:
        c = w / s - tl.log(s)
    ok = (t1 > float("-inf")) & (t1 < float("inf")) & (nan == 0)
    c = tl.where(ok, c, float("nan"))
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(conf_ptr + row, c)


@triton.jit(do_not_specialize=["n_split", "V"])
def _merge_kernel(tok_ptr, conf_ptr, fpart_ptr, ipart_ptr, n_split, V,
                  KIND: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    o = tl.arange(0, BLOCK_S)
    ms = o < n_split
    NEG_INF = float("-inf")
    pf = fpart_ptr + (row * n_split + o).to(tl.int64) * 6
    pi = ipart_ptr + (row * n_split + o).to(tl.int64) * 3
    t1s = tl.load(pf + 0, mask=ms, other=NEG_INF)
    t2s = tl.load(pf + 1, mask=ms, other=NEG_INF)
    ss = tl.load(pf + 2, mask=ms, other=0.0)
    ws = tl.load(pf + 3, mask=ms, other=0.0)
    i1s = tl.load(pi + 0, mask=ms, other=V)
    nans = tl.load(pi + 2, mask=ms, other=0)
    # splits are combined with the same rules as chunks (first index among equal maxima, etc.)
    t1 = tl.max(t1s, axis=0)
    i1 = tl.min(tl.where(t1s == t1, i1s, V), axis=0)
    t2 = tl.maximum(tl.max(t2s, axis=0), tl.max(tl.where(i1s == i1, NEG_INF, t1s), axis=0))
    alpha = tl.where(t1s == NEG_INF, 0.0, tl.exp(t1s - t1))
    s = tl.sum(alpha * ss, axis=0)
    w = 0.0
    if KIND == 2:
        shift = tl.where(t1s == NEG_INF, 0.0, t1s - t1)
        w = tl.sum(alpha * (ws + shift * ss), axis=0)
    nan = tl.max(nans, axis=0)
    bi = i1
    by = t1
    if SAMPLE:
        bks = tl.load(pf + 4, mask=ms, other=NEG_INF)
        bys = tl.load(pf + 5, mask=ms, other=NEG_INF)
        bis = tl.load(pi + 1, mask=ms, other=V)
        bk = tl.max(bks, axis=0)
        bi = tl.min(tl.where(bks == bk, bis, V), axis=0)
        by = tl.max(tl.where(bis == bi, bys, NEG_INF), axis=0)
    _finish(tok_ptr, conf_ptr, row, t1, t2, i1, s, w, nan, bi, by, KIND, SAMPLE)


def _split_plan(N: int, V: int, block_v: int, device: torch.device, num_splits: int | None):
    n_chunks = triton.cdiv(V, block_v)
    if num_splits is None:
        # aim at >= 2 programs per SM; never split below ~4 chunks per program (the merge has a cost)
        target = 2 * sm_count(device)
        num_splits = max(1, min(triton.cdiv(target, max(N, 1)), n_chunks // 4 if device.type == "cuda" else n_chunks))
    num_splits = max(1, min(num_splits, n_chunks))
    cps = triton.cdiv(n_chunks, num_splits)
    num_splits = triton.cdiv(n_chunks, cps)  # no empty split
    return num_splits, cps


def token_confidence_triton(logits: torch.Tensor, token: torch.Tensor, conf: torch.Tensor,
                            suppress_ids: torch.Tensor | None, offset_t: torch.Tensor | None, seed: int,
                            offset: int, kind: str, temperature: float, *, num_splits: int | None = None,
                            block_v: int | None = None, num_warps: int | None = None) -> None:
    """Shapes as :func:`pd_kernels.token_confidence` (validated there). ``token``/``conf`` are written.

    ``num_splits``, ``block_v``, ``num_warps``: launch overrides for tests and benchmark sweeps."""
    N, V = logits.shape
    if N == 0:
        return
    dev = logits.device
    if block_v is None:
        # GPU: 2048 x 8 warps = 8 logits per thread (one 16-byte load for bf16) keeps the per-lane state at
        # ~100-110 registers greedy (sm_90 cubin, see the module docstring): 2 CTAs per SM. 4096 doubles it.
        # Interpreter: 4096, since its cost is per loop step, not per element.
        cap = 2048 if dev.type == "cuda" else 4096
        block_v = cap if V >= cap else max(16, triton.next_power_of_2(V))
    n_split, cps = _split_plan(N, V, block_v, dev, num_splits)
    sample = temperature > 0
    inv_t = 1.0 / temperature if sample else 1.0
    n_sup = 0 if suppress_ids is None else suppress_ids.numel()
    sup = suppress_ids if n_sup else token  # any valid pointer when unused
    off_t = offset_t if offset_t is not None else token

    def s32(v: int) -> int:  # low/high 32-bit words as signed int32 (a fixed kernel arg type)
        v &= 0xFFFFFFFF
        return v - (1 << 32) if v >= (1 << 31) else v

    split = n_split > 1
    if split:
        fpart = torch.empty((N, n_split, 6), dtype=torch.float32, device=dev)
        ipart = torch.empty((N, n_split, 3), dtype=torch.int32, device=dev)
    else:
        fpart, ipart = conf, token  # unused
    nw = num_warps if num_warps is not None else (8 if block_v >= 2048 else 4)
    _row_kernel[(N, n_split)](
        logits, logits.stride(0), V, sup, n_sup, off_t,
        s32(seed), s32(seed >> 32), s32(offset), s32(offset >> 32), inv_t,
        token, conf, fpart, ipart, cps, n_split,
        KIND=_KINDS[kind], SAMPLE=sample, HAS_OFF_T=offset_t is not None, SPLIT=split, BLOCK_V=block_v,
        num_warps=nw,
    )
    if split:
        _merge_kernel[(N,)](token, conf, fpart, ipart, n_split, V, KIND=_KINDS[kind], SAMPLE=sample,
                            BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=1)


_I64_MAX = tl.constexpr(9223372036854775807)


@triton.jit
def _commit_rows(tok_ptr, conf_ptr, dst_ptr, seq_ptr, r, hi, n_tok, mask_id):
    """Rows ``r`` (a block of row ids; those ``>= hi`` are past the span) of one span: ``dst``, ``masked``
    (destination inside ``tokens`` and holding ``mask_id``; a destination outside is never read), ``cand``
    (masked with a token >= 0), the token, the confidence and the rank key (NaN ranks as -inf)."""
    inb = r < hi
    dst = tl.load(dst_ptr + r, mask=inb, other=-1)
    inside = inb & (dst >= 0) & (dst < n_tok)
    cur = tl.load(seq_ptr + dst, mask=inside, other=0)
    masked = inside & (cur == mask_id)
    tok = tl.load(tok_ptr + r, mask=masked, other=-1)
    cand = masked & (tok >= 0)
    c = tl.load(conf_ptr + r, mask=cand, other=0.0)
    key = tl.where(c == c, c, float("-inf"))
    return dst, masked, cand, tok, c, key


@triton.jit(do_not_specialize=["N", "S", "mask_id", "tau", "n_tok"])
def _commit_kernel(tok_ptr, conf_ptr, dst_ptr, rows_ptr, seq_ptr,
                   ml_ptr, step_ptr, ns_ptr, def_ptr, arr_ptr, committed_ptr, done_ptr,
                   N, S, mask_id, tau, n_tok,
                   POLICY: tl.constexpr, BLOCK: tl.constexpr, BLOCK_J: tl.constexpr):
    j = tl.program_id(0)
    NEG_INF = float("-inf")
    first = tl.load(rows_ptr + 2 * j).to(tl.int64)
    count = tl.load(rows_ptr + 2 * j + 1).to(tl.int64)
    lo = tl.minimum(tl.maximum(first, 0), N)
    hi = tl.minimum(tl.maximum(first + tl.maximum(count, 0), lo), N)
    o = tl.arange(0, BLOCK)

    # pass 0: m, c and the top-1 candidate (highest key, then lowest dst)
    m = tl.zeros([], tl.int32)
    c = tl.zeros([], tl.int32)
    t_key = tl.full([], NEG_INF, tl.float32)
    t_dst = tl.full([], _I64_MAX, tl.int64)
    for b0 in range(lo, hi, BLOCK):
        dst, masked, cand, _t0, _c0, key = _commit_rows(tok_ptr, conf_ptr, dst_ptr, seq_ptr, b0 + o, hi, n_tok, mask_id)
        m += tl.sum(masked.to(tl.int32), axis=0)
        c += tl.sum(cand.to(tl.int32), axis=0)
        bk = tl.max(tl.where(cand, key, NEG_INF), axis=0)
        bd = tl.min(tl.where(cand & (key == bk), dst, _I64_MAX), axis=0)
        better = (bk > t_key) | ((bk == t_key) & (bd < t_dst))
        t_key = tl.where(better, bk, t_key)
        t_dst = tl.where(better, bd, t_dst)

    left = tl.load(ml_ptr + j)  # spans without masked rows keep their counters
    cnt = tl.zeros([], tl.int32)
    if m > 0:
        k = tl.load(step_ptr + j)
        steps = tl.load(ns_ptr + j)
        dfr = tl.load(def_ptr + j)
        if POLICY == 1:
            # floor(999 m / (1000 steps - 999 k)) = floor(m (1 - s/t)) for linspace(1, 1e-3, steps + 1)
            den = tl.maximum(1000 * steps.to(tl.int64) - 999 * k.to(tl.int64), 1)
            n = tl.minimum(tl.maximum((999 * m.to(tl.int64)) // den, 1), m).to(tl.int32)
            budget = tl.where(k >= steps - 1, m, n)
        elif POLICY == 2:
            per = tl.where(k < steps, m // tl.maximum(steps - k, 1), 0)
            budget = tl.minimum(m, tl.maximum(per, 1) + dfr)
        else:
            budget = m
        # pass A: the pivot = the candidate of rank budget - 1 (when budget >= c, every candidate is in)
        p_key = tl.full([], NEG_INF, tl.float32)
        p_dst = tl.full([], _I64_MAX, tl.int64)
        if POLICY != 0:
            if budget < c:
                oj = tl.arange(0, BLOCK_J)
                for i0 in range(lo, hi, BLOCK):
                    dst_i, _mi, cand_i, _ti, _ci, key_i = _commit_rows(tok_ptr, conf_ptr, dst_ptr, seq_ptr, i0 + o, hi,
                                                                 n_tok, mask_id)
                    rank = tl.zeros([BLOCK], tl.int32)
                    for j0 in range(lo, hi, BLOCK_J):
                        dst_j, _mj, cand_j, _tj, _cj, key_j = _commit_rows(tok_ptr, conf_ptr, dst_ptr, seq_ptr, j0 + oj, hi,
                                                                     n_tok, mask_id)
                        kj = tl.where(cand_j, key_j, float("nan"))  # a NaN key never beats anything
                        beats = (kj[None, :] > key_i[:, None]) | (
                            (kj[None, :] == key_i[:, None]) & (dst_j[None, :] < dst_i[:, None]))
                        rank += tl.sum(beats.to(tl.int32), axis=1)
                    piv = cand_i & (rank == budget - 1)  # exactly one candidate of the span
                    p_key = tl.maximum(p_key, tl.max(tl.where(piv, key_i, NEG_INF), axis=0))
                    p_dst = tl.minimum(p_dst, tl.min(tl.where(piv, dst_i, _I64_MAX), axis=0))
        # every read of `tokens` above is done before pass B writes (rows replicated across warps need
        # no cross-warp reduction, hence carry no implicit barrier)
        tl.debug_barrier()
        # pass B: decide (comparisons with the top-1 and the pivot), write, count
        for b0 in range(lo, hi, BLOCK):
            dst, _mb, cand, tok, cf, key = _commit_rows(tok_ptr, conf_ptr, dst_ptr, seq_ptr, b0 + o, hi, n_tok,
                                                      mask_id)
            top1 = (key == t_key) & (dst == t_dst)
            in_b = (key > p_key) | ((key == p_key) & (dst <= p_dst))
            passes = cf >= tau  # NaN never passes
            if POLICY == 0:
                take = cand & (top1 | passes)
            elif POLICY == 1:
                take = cand & in_b
            else:
                take = cand & (top1 | (in_b & passes))
            tl.store(seq_ptr + dst, tok, mask=take)
            cnt += tl.sum(take.to(tl.int32), axis=0)
        left = m - cnt
        tl.store(ml_ptr + j, left)
        tl.store(step_ptr + j, k + 1)
        if POLICY == 2:
            tl.store(def_ptr + j, budget - cnt)
        else:
            tl.store(def_ptr + j, tl.zeros([], tl.int32))
    tl.store(committed_ptr + j, cnt)

    # all-done, last program: low word = arrivals, high word = spans with masks left
    nz = (left != 0).to(tl.int64)
    prev = tl.atomic_add(arr_ptr, 1 + (nz << 32), sem="relaxed")
    if (prev & 0xFFFFFFFF) == S - 1:
        tl.store(done_ptr, ((prev >> 32) + nz) == 0)
        tl.store(arr_ptr, tl.zeros([], tl.int64))


# Chunk sizes: BLOCK rows per pass-0/B chunk and per pass-A row tile, BLOCK_J columns per pass-A tile:
# BLOCK x BLOCK_J = 4096 compares, 16 per thread at 8 warps. sm_90 (ptxas -v, Triton 3.6 and 3.9): 32
# registers for threshold, 128 for schedule / pd_threshold, no spills (4 warps: 162-164, 128 x 16: 104-109,
# 256 x 16 at 8 warps: 105-112; none spills). A span of m rows takes ceil(m / 128) x ceil(m / 32) pass-A
# trips (m = 80: 3, m = 200: 14). Fixed sizes: nothing recompiles as N or the spans change.
COMMIT_BLOCK = 128
COMMIT_BLOCK_J = 32
COMMIT_WARPS = 8


def commit_spans_triton(token, conf, row_dst, span_rows, tokens, masks_left, step, num_steps, deferred, arrivals,
                        committed, all_done, policy: str, tau: float, mask_id: int) -> None:
    """Shapes as :func:`pd_kernels.commit_spans` (validated there). Mutates tokens, the state, outputs.
    One launch of S programs, no workspace, no host sync."""
    S = masks_left.shape[0]
    if S == 0:
        all_done.fill_(True)
        return
    _commit_kernel[(S,)](token, conf, row_dst, span_rows, tokens, masks_left, step, num_steps, deferred, arrivals,
                         committed, all_done, token.shape[0], S, mask_id, tau, tokens.numel(),
                         POLICY=_POLICIES[policy], BLOCK=COMMIT_BLOCK, BLOCK_J=COMMIT_BLOCK_J, num_warps=COMMIT_WARPS)
