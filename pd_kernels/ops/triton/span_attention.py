"""Triton kernels for block-sparse span-isolated attention over the paged KV cache.

Work unit: one program per (tile, KV head[, key split]). A tile (see :mod:`pd_kernels.layout`) is up to
``T_TILE`` consecutive query rows of one segment of one sequence; its rows all see the keys
``[0, a) U [b, c)`` (a causal tile further limits each row to keys ``<= its position`` inside
``[b, c)``). GQA packing: the ``G = Hq / Hkv`` query heads of the KV head are stacked with the tokens
into the M dimension of the block (row ``r`` = token ``r // G``, head ``r % G``), so each K/V block is
loaded once for the whole group and a one-token decode still fills ``G`` rows of the MMA.

The kernel walks the two key ranges with an online softmax (fp32, base 2), fetching every key through the
block table (any page size, any page order, ranges that start mid-page). Keys outside a range are masked
by column; the causal limit is a per-row compare. Only blocks of ``[0, a)`` and ``[b, c)`` are visited:
work scales with what the tile can see.

Split-K (decode and other small grids): the blocks of the two ranges are numbered 0..n0+n1-1 and split
evenly over ``num_splits`` programs, which write unnormalised partial outputs plus (max, sum) per row;
a second kernel merges them by log-sum-exp. With ``num_splits == 1`` the first kernel normalises and
writes ``out`` directly.

Per-step lengths (tile count, query count, split count) are runtime values or grid sizes; constexprs are
head dim, group size, page size, block sizes and two flags, so a decode loop never recompiles.

CUDA graphs: with a :class:`pd_kernels.StaticSpanLayout` the grid (``max_tiles x Hkv x splits``), the
query block, the tile table / query arrays and the split-K workspace are all fixed per bucket; tiles past
the step's count have 0 rows and empty key ranges, so their programs skip both key loops and every store
is masked off.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...layout import TILE_COLS
from . import sm_count

MAX_SPLITS = 16


@triton.jit
def _attend_block(acc, m_i, l_i, b_q, kc_ptr, vc_ptr, bt_row_ptr, start, end, lim,
                  s_kp, s_ks, s_vp, s_vs, o_kvh_k, o_kvh_v, o_d, m_d, qk_scale,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, ROW_LIMIT: tl.constexpr, IEEE: tl.constexpr):
    """One key block ``[start, start + BLOCK_N)`` clipped to ``< end`` (and, with ROW_LIMIT, to ``< lim`` per
    row) folded into the online softmax state ``(acc, m_i, l_i)``."""
    o_k = start + tl.arange(0, BLOCK_N)
    m_k = o_k < end
    # keys -> pages through the block table: any page order, ranges may start mid-page
    b_page = tl.load(bt_row_ptr + o_k // PAGE, mask=m_k, other=0).to(tl.int64)
    o_in = (o_k % PAGE).to(tl.int64)
    p_k = kc_ptr + (b_page * s_kp + o_in * s_ks + o_kvh_k)[:, None] + o_d[None, :]
    p_v = vc_ptr + (b_page * s_vp + o_in * s_vs + o_kvh_v)[:, None] + o_d[None, :]
    m_kd = m_k[:, None] & m_d[None, :]
    b_k = tl.load(p_k, mask=m_kd, other=0.0)
    b_v = tl.load(p_v, mask=m_kd, other=0.0)
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    b_s = b_s * qk_scale
    if ROW_LIMIT:
        m_s = o_k[None, :] < lim[:, None]
    else:
        m_s = (o_k < end)[None, :] & (lim >= 0)[:, None]
    b_s = tl.where(m_s, b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    # a row that has seen no key yet keeps m = -inf: shift by 0 instead, so exp2 gives 0, not NaN
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_p = tl.math.exp2(b_s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    # P is rounded to the value dtype for the second MMA (as FlashAttention does); accumulation is fp32
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["Tq", "num_splits"])
def _span_attn_fwd_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, tile_ptr, o_ptr, op_ptr, ml_ptr,
    Tq, num_splits, qk_scale,
    s_qt, s_qh, s_ot, s_oh,
    s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_bt,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T_TILE: tl.constexpr, PAGE: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, TCOLS: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    p_tile = tile_ptr + pid.to(tl.int64) * TCOLS
    seq = tl.load(p_tile + 0)
    row0 = tl.load(p_tile + 1)
    nrows = tl.load(p_tile + 2)
    a = tl.load(p_tile + 3)
    b = tl.load(p_tile + 4)
    c = tl.load(p_tile + 5)
    causal = tl.load(p_tile + 6)

    o_m = tl.arange(0, BLOCK_M)
    o_tok = o_m // G
    o_hh = o_m % G
    m_row = (o_tok < nrows) & (o_m < T_TILE * G)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_row = (row0 + o_tok).to(tl.int64)
    o_head = (kvh * G + o_hh).to(tl.int64)
    b_q = tl.load(q_ptr + (o_row * s_qt + o_head * s_qh)[:, None] + o_d[None, :],
                  mask=m_row[:, None] & m_d[None, :], other=0.0)
    b_pos = tl.load(pos_ptr + o_row, mask=m_row, other=0)
    # per-row key limit inside [b, c): its own position + 1 for a causal tile, c otherwise
    b_causal = tl.zeros([BLOCK_M], dtype=tl.int32) + causal
    lim = tl.where(b_causal != 0, b_pos + 1, tl.zeros([BLOCK_M], dtype=tl.int32) + c)

    # split the n0 + n1 key blocks of the two ranges evenly over the splits
    n0 = tl.cdiv(a, BLOCK_N)
    n1 = tl.cdiv(tl.maximum(c - b, 0), BLOCK_N)
    per = tl.cdiv(n0 + n1, num_splits)
    j0 = split * per
    j1 = tl.minimum(j0 + per, n0 + n1)

    bt_row = bt_ptr + seq.to(tl.int64) * s_bt
    o_kvh_k = kvh.to(tl.int64) * s_kh
    o_kvh_v = kvh.to(tl.int64) * s_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # range 0: [0, a), seen by every row of the tile (the prefix, or a causal tile's past)
    for j in range(j0, tl.minimum(j1, n0)):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, b_q, kc_ptr, vc_ptr, bt_row, j * BLOCK_N, a, lim,
                                      s_kp, s_ks, s_vp, s_vs, o_kvh_k, o_kvh_v, o_d, m_d, qk_scale,
                                      PAGE, BLOCK_N, False, IEEE)
    # range 1: [b, c), the tile's own span (or its causal diagonal), masked per row
    for j in range(tl.maximum(j0, n0), j1):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, b_q, kc_ptr, vc_ptr, bt_row, b + (j - n0) * BLOCK_N, c, lim,
                                      s_kp, s_ks, s_vp, s_vs, o_kvh_k, o_kvh_v, o_d, m_d, qk_scale,
                                      PAGE, BLOCK_N, True, IEEE)

    m_out = m_row[:, None] & m_d[None, :]
    if SPLIT:
        # partial state of this split: unnormalised acc, running max (base 2) and sum
        o_part = (split * Tq + o_row) * HQ + o_head
        tl.store(op_ptr + (o_part * D)[:, None] + o_d[None, :], acc, mask=m_out)
        tl.store(ml_ptr + o_part * 2, m_i, mask=m_row)
        tl.store(ml_ptr + o_part * 2 + 1, l_i, mask=m_row)
    else:
        # rows that see no key (padding) output 0
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
        b_o = acc * inv[:, None]
        tl.store(o_ptr + (o_row * s_ot + o_head * s_oh)[:, None] + o_d[None, :],
                 b_o.to(o_ptr.dtype.element_ty), mask=m_out)


@triton.jit(do_not_specialize=["Tq", "num_splits"])
def _span_attn_merge_kernel(op_ptr, ml_ptr, o_ptr, Tq, num_splits, s_ot, s_oh,
                            HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the splits of one (query, head) row by log-sum-exp."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < num_splits
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_part = (o_s.to(tl.int64) * Tq + t) * HQ + h
    b_m = tl.load(ml_ptr + o_part * 2, mask=m_s, other=float("-inf"))
    b_l = tl.load(ml_ptr + o_part * 2 + 1, mask=m_s, other=0.0)
    m_all = tl.max(b_m, 0)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.math.exp2(b_m - m_use)
    l_all = tl.sum(w * b_l, 0)
    b_o = tl.load(op_ptr + (o_part * D)[:, None] + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)
    o = tl.sum(b_o * w[:, None], 0)
    inv = tl.where(l_all > 0, 1.0 / tl.where(l_all > 0, l_all, 1.0), 0.0)
    tl.store(o_ptr + t * s_ot + h * s_oh + o_d, (o * inv).to(o_ptr.dtype.element_ty), mask=m_d)


def choose_block_m(max_segment: int, group: int) -> int:
    """Query block (rows = tokens x G query heads) for a layout whose largest segment has ``max_segment``
    query rows: the smallest of 16/32/64/128 that holds a segment. Few distinct values, so at most a
    handful of compiles per head dim / group size; a decode loop (same shapes every step) compiles once."""
    rows = max(1, max_segment) * group
    bm = 16
    while bm < rows and bm < 128:
        bm *= 2
    return max(bm, triton.next_power_of_2(group))


def kernel_config(block_m: int, head_dim: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a query block."""
    if not on_gpu:
        return 64, 4, 1  # interpreter: cost is per program and loop step, so few, wide blocks
    # Hopper: 128 x 64 blocks at D=128 (FlashAttention-2 style tile), wider key blocks for small D
    bn = 64 if head_dim > 64 or block_m <= 32 else 128
    warps = 8 if block_m >= 128 else 4
    stages = 3 if head_dim <= 128 else 2
    return bn, warps, stages


def choose_splits(num_tiles: int, num_kv_heads: int, max_kv: int, block_n: int, device: torch.device) -> int:
    """Split keys over programs when the grid is too small to fill the GPU and the key ranges are long."""
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    programs = max(1, num_tiles * num_kv_heads)
    if programs >= sms:
        return 1
    blocks = triton.cdiv(max_kv, block_n)
    # keep >= 4 key blocks per split so the merge stays cheap next to the work
    return int(max(1, min(MAX_SPLITS, sms // programs, blocks // 4)))


def span_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                          q_pos: torch.Tensor, tiles: torch.Tensor, out: torch.Tensor, scale: float,
                          block_m: int, num_splits: int, block_n: int = 64, num_warps: int = 4,
                          num_stages: int = 1, o_part: torch.Tensor | None = None,
                          ml: torch.Tensor | None = None) -> None:
    """Shapes as :func:`pd_kernels.span_attention` (validated). ``tiles`` is the layout's tile table for
    ``block_m // G`` tokens per tile; rows with 0 query rows (a static layout's unused tiles) write nothing.
    ``o_part`` fp32 ``[>= num_splits, Tq, Hq, D]`` / ``ml`` fp32 ``[>= num_splits, Tq, Hq, 2]``: split-K
    workspace (contiguous); allocated here when not given (a captured graph passes fixed ones)."""
    Tq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    num_tiles = tiles.shape[0]
    if Tq == 0 or num_tiles == 0:
        return
    assert tiles.shape[1] == TILE_COLS
    T_TILE = block_m // G
    BLOCK_D = max(16, triton.next_power_of_2(D))
    qk_scale = scale * 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
    ieee = q.dtype == torch.float32
    assert 1 <= num_splits <= MAX_SPLITS
    split = num_splits > 1
    if split:
        if o_part is None:
            o_part = torch.empty((num_splits, Tq, Hq, D), dtype=torch.float32, device=q.device)
        if ml is None:
            ml = torch.empty((num_splits, Tq, Hq, 2), dtype=torch.float32, device=q.device)
        assert o_part.is_contiguous() and o_part.shape[1:] == (Tq, Hq, D) and o_part.shape[0] >= num_splits
        assert ml.is_contiguous() and ml.shape[1:] == (Tq, Hq, 2) and ml.shape[0] >= num_splits
    else:
        o_part = ml = out  # unused
    grid = (num_tiles, Hkv, num_splits)
    _span_attn_fwd_kernel[grid](
        q, k_cache, v_cache, block_table, q_pos, tiles, out, o_part, ml,
        Tq, num_splits, qk_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        HQ=Hq, G=G, D=D, BLOCK_D=BLOCK_D, BLOCK_M=block_m, BLOCK_N=block_n, T_TILE=T_TILE,
        PAGE=k_cache.shape[1], SPLIT=split, IEEE=ieee, TCOLS=TILE_COLS,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _span_attn_merge_kernel[(Tq, Hq)](
            o_part, ml, out, Tq, num_splits, out.stride(0), out.stride(1),
            HQ=Hq, D=D, BLOCK_D=BLOCK_D, BLOCK_S=MAX_SPLITS,  # fixed: the split count changes per step
            num_warps=4 if D >= 128 else 2,
        )
