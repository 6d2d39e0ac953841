"""Triton kernel for the span commits, :func:`pd_kernels.commit_spans` (SPEC section 5).

``_commit_kernel``, one launch: program j handles span j, i.e. its rows
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

import triton
import triton.language as tl

from ...reference.commit_spans import POLICY_ID

# the policies' ids (``POLICY``), from their one home
_THRESHOLD = tl.constexpr(POLICY_ID["threshold"])
_SCHEDULE = tl.constexpr(POLICY_ID["schedule"])
_PD_THRESHOLD = tl.constexpr(POLICY_ID["pd_threshold"])
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
        # the counters are int32 but any int32 value must give the reference's (Python int) budget: differences
        # and sums in int64 (steps - k and deferred + 1 overflow int32 at the extremes)
        k64, steps64 = k.to(tl.int64), steps.to(tl.int64)
        if POLICY == _SCHEDULE:
            # floor(999 m / (1000 steps - 999 k)) = floor(m (1 - s/t)) for linspace(1, 1e-3, steps + 1)
            den = tl.maximum(1000 * steps64 - 999 * k64, 1)
            n = tl.minimum(tl.maximum((999 * m.to(tl.int64)) // den, 1), m).to(tl.int32)
            budget = tl.where(k64 >= steps64 - 1, m, n)
        elif POLICY == _PD_THRESHOLD:
            per = tl.where(k64 < steps64, m.to(tl.int64) // tl.maximum(steps64 - k64, 1), 0)
            budget = tl.minimum(m.to(tl.int64), tl.maximum(per, 1) + dfr.to(tl.int64)).to(tl.int32)
        else:
            budget = m
        # pass A: the pivot = the candidate of rank budget - 1 (when budget >= c, every candidate is in)
        p_key = tl.full([], NEG_INF, tl.float32)
        p_dst = tl.full([], _I64_MAX, tl.int64)
        if POLICY != _THRESHOLD:
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
            if POLICY == _THRESHOLD:
                take = cand & (top1 | passes)
            elif POLICY == _SCHEDULE:
                take = cand & in_b
            else:
                take = cand & (top1 | (in_b & passes))
            tl.store(seq_ptr + dst, tok, mask=take)
            cnt += tl.sum(take.to(tl.int32), axis=0)
        left = m - cnt
        tl.store(ml_ptr + j, left)
        tl.store(step_ptr + j, k + 1)
        if POLICY == _PD_THRESHOLD:
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
# BLOCK x BLOCK_J = 2048 compares, 8 per thread at 8 warps. sm_90, Triton 3.9, ptxas -v (checked by
# tests/test_triton_compile.py::test_no_spills): no spills for any policy at 128 x 16; 128 x 32 spilled
# 24 bytes for pd_threshold. A span of m rows takes ceil(m / 128) x ceil(m / 16) pass-A trips (m = 80: 5,
# m = 200: 26). Fixed sizes: nothing recompiles as N or the spans change.
COMMIT_BLOCK = 128
COMMIT_BLOCK_J = 16
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
                         POLICY=POLICY_ID[policy], BLOCK=COMMIT_BLOCK, BLOCK_J=COMMIT_BLOCK_J, num_warps=COMMIT_WARPS)
