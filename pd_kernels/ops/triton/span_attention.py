"""Triton kernels for block-sparse span-isolated attention over the paged KV cache.

The tiling plan (tile classes, tile heights, split points, table layouts) lives in
:mod:`pd_kernels.layout.plan`; this module runs it, reading the tables' columns by the plan's names. One launch
per tile class present (narrow: decode-shaped tiles, split over keys; wide: span / prefill tiles), plus a merge
launch when narrow tiles were split.

Work unit: a row of the class's unit table (see :mod:`pd_kernels.layout.plan`): a tile (up to ``T_TILE``
consecutive query rows of one segment of one sequence, all seeing the keys ``[0, a) U [b, c)``; a causal
tile further limits each row to keys ``<= its position`` inside ``[b, c)``) and the key blocks
``[j0, j1)`` of the tile's block list (the ``n0`` blocks of ``[0, a)``, then the ``n1`` of ``[b, c)``).
GQA packing: the ``G = Hq / Hkv`` query heads of the KV head are stacked with the tokens into the M
dimension of the block (row ``r`` = token ``r // G``, head ``r % G``), so each K/V block is loaded once for
the whole group and a one-token decode still fills ``G`` rows of the MMA.

Grid: ``(units, Hkv)``, one program per unit and KV head. A dynamic layout's grid is its unit count; a
static layout's is its table capacity, and programs past the count in the table's header row take no rows
and no key blocks (they read their row, inside the table, and nothing else). A persistent loop over units
(grid capped at a few programs per SM) was tried and not kept: 219 registers against 162 for the narrow
kernel at D = 128 (sm_90, Triton 3.9), to save empty programs of static buckets.

Per unit: an online softmax (fp32, base 2) over its key blocks, every key fetched through the block table
(any page size, any page order, ranges that start mid-page); keys outside a range are masked by column,
the causal limit is a per-row compare, and a key on a page id outside ``[0, num_pages)`` is masked and never
loaded. A unit that covers all of its tile's keys writes the normalised output (``out`` rows, 0 for a row
that sees no key); a split unit writes its unnormalised fp32 partial ``(acc, max, sum)`` to its workspace
slot, and the merge kernel folds a tile's slots in split order.

NaN in, NaN out: a NaN/inf in a row's query, in a key or value it sees, or in the scale makes the row's
output non-finite; scores of keys a row does not see are replaced by ``-inf`` before the softmax, and "sees
no key" is decided by the softmax sum being exactly 0 (a NaN sum stays NaN). The one leak: a non-finite
*value* (V) of a causal tile's own rows reaches the earlier rows of that tile (``0 x NaN`` in ``P @ V``;
only within one causal chunk of one sequence).

Per-step values (unit counts, positions, key ranges) are device data or grid sizes; constexprs are head
dim, group size, page size, block sizes and flags, so a decode loop never recompiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ...layout.plan import (MERGE_COLS, MERGE_NROWS, MERGE_NSPLITS, MERGE_ROW0, MERGE_SLOT0, SPLIT_BLOCK_N, TILE_A,
                            TILE_B, TILE_C, TILE_CAUSAL, TILE_NROWS, TILE_ROW0, TILE_SEQ, UNIT_COLS, UNIT_J0, UNIT_J1,
                            UNIT_SLOT, AttentionPlan)

LOG2E = 1.4426950408889634
# the plan's table columns, as constexprs (a @triton.jit function reads module globals only as constexprs)
C_SEQ, C_ROW0, C_NROWS, C_A, C_B, C_C, C_CAUSAL, C_J0, C_J1, C_SLOT = map(tl.constexpr, (
    TILE_SEQ, TILE_ROW0, TILE_NROWS, TILE_A, TILE_B, TILE_C, TILE_CAUSAL, UNIT_J0, UNIT_J1, UNIT_SLOT))
M_ROW0, M_NROWS, M_SLOT0, M_NSPLITS = map(tl.constexpr, (MERGE_ROW0, MERGE_NROWS, MERGE_SLOT0, MERGE_NSPLITS))


@triton.jit
def _attend_block(acc, m_i, l_i, b_q, kc_ptr, vc_ptr, bt_row_ptr, start, end, lim, num_pages,
                  s_kp, s_ks, s_vp, s_vs, o_kvh_k, o_kvh_v, o_d, m_d, qk_scale,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, ROW_LIMIT: tl.constexpr, IEEE: tl.constexpr):
    """One key block ``[start, start + BLOCK_N)`` clipped to ``< end`` (and, with ROW_LIMIT, to ``< lim`` per
    row) folded into the online softmax state ``(acc, m_i, l_i)``."""
    o_k = start + tl.arange(0, BLOCK_N)
    m_k = o_k < end
    # keys -> pages through the block table: any page order, ranges may start mid-page
    b_page = tl.load(bt_row_ptr + o_k // PAGE, mask=m_k, other=-1)
    # a page id outside the pool contributes nothing: its keys are masked and never loaded
    m_k = m_k & (b_page >= 0) & (b_page < num_pages)
    b_page = b_page.to(tl.int64)
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
        m_s = m_k[None, :] & (o_k[None, :] < lim[:, None])
    else:
        m_s = m_k[None, :] & (lim >= 0)[:, None]
    # invisible keys: -inf (so a NaN score of a key the row does not see never reaches it)
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


@triton.jit
def _store_normalised(p_o, acc, l_i, m_out):
    """``acc / l`` into the output rows; a row that sees no key (sum exactly 0) outputs 0, a NaN sum stays NaN."""
    none = l_i == 0.0
    inv = tl.where(none, 0.0, 1.0 / tl.where(none, 1.0, l_i))
    tl.store(p_o, (acc * inv[:, None]).to(p_o.dtype.element_ty), mask=m_out)


@triton.jit(do_not_specialize=["num_pages"])
def _span_attn_fwd_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, unit_ptr, o_ptr, op_ptr, ml_ptr,
    num_pages, qk_scale,
    s_qt, s_qh, s_ot, s_oh,
    s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_bt,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T_TILE: tl.constexpr, PAGE: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, UCOLS: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    o_m = tl.arange(0, BLOCK_M)
    o_tok = o_m // G
    o_hh = o_m % G
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_head = (kvh * G + o_hh).to(tl.int64)
    o_kvh_k = kvh.to(tl.int64) * s_kh
    o_kvh_v = kvh.to(tl.int64) * s_vh
    # a program past the step's unit count (header row; a static layout's grid is its capacity) reads its row
    # (inside the table) but takes no rows and no key blocks: it loads nothing more and writes nothing
    live = pid < tl.load(unit_ptr)
    p_u = unit_ptr + (pid + 1) * UCOLS
    seq = tl.load(p_u + C_SEQ)
    row0 = tl.load(p_u + C_ROW0)
    nrows = tl.where(live, tl.load(p_u + C_NROWS), 0)
    a = tl.load(p_u + C_A)
    b = tl.load(p_u + C_B)
    c = tl.load(p_u + C_C)
    causal = tl.load(p_u + C_CAUSAL)
    j0 = tl.load(p_u + C_J0)
    j1 = tl.where(live, tl.load(p_u + C_J1), 0)
    slot = tl.load(p_u + C_SLOT)

    m_row = (o_tok < nrows) & (o_m < T_TILE * G)   # T_TILE * G: a tile's query-head rows
    o_row = (row0 + o_tok).to(tl.int64)
    b_q = tl.load(q_ptr + (o_row * s_qt + o_head * s_qh)[:, None] + o_d[None, :],
                  mask=m_row[:, None] & m_d[None, :], other=0.0)
    b_pos = tl.load(pos_ptr + o_row, mask=m_row, other=0)
    # per-row key limit inside [b, c): its own position + 1 for a causal tile, c otherwise
    b_causal = tl.zeros([BLOCK_M], dtype=tl.int32) + causal
    lim = tl.where(b_causal != 0, b_pos + 1, tl.zeros([BLOCK_M], dtype=tl.int32) + c)

    # this unit's blocks [j0, j1) of the tile's n0 + n1 blocks (range [0, a) first, then [b, c))
    n0 = tl.cdiv(a, BLOCK_N)
    n1 = tl.cdiv(tl.maximum(c - b, 0), BLOCK_N)
    j1 = tl.minimum(j1, n0 + n1)
    bt_row = bt_ptr + seq.to(tl.int64) * s_bt
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # range 0: [0, a), seen by every row of the tile (the prefix, or a causal tile's past)
    for j in range(j0, tl.minimum(j1, n0)):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, b_q, kc_ptr, vc_ptr, bt_row, j * BLOCK_N, a, lim,
                                      num_pages, s_kp, s_ks, s_vp, s_vs, o_kvh_k, o_kvh_v, o_d, m_d,
                                      qk_scale, PAGE, BLOCK_N, False, IEEE)
    # range 1: [b, c), the tile's own span (or its causal diagonal), masked per row
    for j in range(tl.maximum(j0, n0), j1):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, b_q, kc_ptr, vc_ptr, bt_row, b + (j - n0) * BLOCK_N, c,
                                      lim, num_pages, s_kp, s_ks, s_vp, s_vs, o_kvh_k, o_kvh_v, o_d, m_d,
                                      qk_scale, PAGE, BLOCK_N, True, IEEE)

    m_out = m_row[:, None] & m_d[None, :]
    p_o = o_ptr + (o_row * s_ot + o_head * s_oh)[:, None] + o_d[None, :]
    if SPLIT:
        if slot >= 0:
            # partial state of this split: unnormalised acc, running max (base 2) and sum
            o_part = (slot.to(tl.int64) * HKV + kvh) * (T_TILE * G) + o_m
            tl.store(op_ptr + (o_part * D)[:, None] + o_d[None, :], acc, mask=m_out)
            tl.store(ml_ptr + o_part * 2, m_i, mask=m_row)
            tl.store(ml_ptr + o_part * 2 + 1, l_i, mask=m_row)
        else:
            _store_normalised(p_o, acc, l_i, m_out)
    else:
        _store_normalised(p_o, acc, l_i, m_out)


@triton.jit
def _span_attn_merge_kernel(op_ptr, ml_ptr, mrg_ptr, o_ptr, s_ot, s_oh,
                            HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, T_TILE: tl.constexpr, MCOLS: tl.constexpr):
    """Fold the split partials of one split tile (one program each), in split order (log-sum-exp), into ``out``."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    o_m = tl.arange(0, BLOCK_M)
    o_tok = o_m // G
    o_hh = o_m % G
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_head = (kvh * G + o_hh).to(tl.int64)
    live = pid < tl.load(mrg_ptr)                     # header row: the step's split tiles
    p_e = mrg_ptr + (pid + 1) * MCOLS
    row0 = tl.load(p_e + M_ROW0)
    nrows = tl.where(live, tl.load(p_e + M_NROWS), 0)
    slot0 = tl.load(p_e + M_SLOT0)
    nsplit = tl.where(live, tl.load(p_e + M_NSPLITS), 0)
    m_row = (o_tok < nrows) & (o_m < T_TILE * G)   # T_TILE * G: a tile's query-head rows
    m_out = m_row[:, None] & m_d[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(0, nsplit):
        o_part = ((slot0 + s).to(tl.int64) * HKV + kvh) * (T_TILE * G) + o_m
        m_s = tl.load(ml_ptr + o_part * 2, mask=m_row, other=float("-inf"))
        l_s = tl.load(ml_ptr + o_part * 2 + 1, mask=m_row, other=0.0)
        b_o = tl.load(op_ptr + (o_part * D)[:, None] + o_d[None, :], mask=m_out, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        beta = tl.math.exp2(m_s - m_use)
        acc = acc * alpha[:, None] + b_o * beta[:, None]
        l_i = l_i * alpha + l_s * beta
        m_i = m_new
    o_row = (row0 + o_tok).to(tl.int64)
    _store_normalised(o_ptr + (o_row * s_ot + o_head * s_oh)[:, None] + o_d[None, :], acc, l_i, m_out)


def kernel_configs(block_m: int, head_dim: int, split: bool, on_gpu: bool, fp32: bool = False) -> list:
    """``(BLOCK_N, num_warps, num_stages)`` candidates of a class launch, preferred first, then ever smaller
    shared-memory footprints (fewer stages, then, for the wide class, narrower key blocks).

    The narrow (split) class uses the plan's ``SPLIT_BLOCK_N`` everywhere: its split points are counted in those
    blocks. Preferred on a GPU, per sm_90 compiles (``tests/test_triton_compile.py`` prints and bounds each
    launch's shared memory by the 227 KB a Hopper block may use; registers and spills likewise):

    * 16-bit wide tiles (128 rows): 128 x 64 key blocks at D = 128 (FlashAttention-2 style), 128 keys for
      D <= 64, 32 for D > 128 (64 keys x 2 stages spilled and took 197 KB at D = 256; 32 x 3 stages: 131 KB,
      no spill), 8 warps, 3 stages;
    * fp32 (``input_precision="ieee"``: no tensor-core path, the FMA dot holds each thread's rows of Q over the
      whole head dim): 16-key blocks, 16 warps, 1 stage past D = 64. The 16-bit configuration spilled kilobytes
      there, took 41-218 s to compile, and at D = 256 needed 289 KB of shared memory (no launch at all). fp32
      wide tiles still spill (a test path, not a production one);
    * narrow tiles (16 rows): 4 warps, 3 stages up to D = 128; past it 2 stages, and 8 warps for fp32.

    :func:`span_attention_triton` starts with the first and moves down the list when Triton refuses a launch
    for lack of shared memory (another GPU; a group size past 128, whose tiles are taller)."""
    if not on_gpu:
        return [(SPLIT_BLOCK_N if split else 64, 4, 1)]  # interpreter: cost is per program and loop step
    if split:
        first = (SPLIT_BLOCK_N, 8 if fp32 and head_dim > 128 else 4, 3 if head_dim <= 128 else 2)
    elif fp32:
        first = (16, 16, 2 if head_dim <= 64 else 1)
    else:
        first = (128 if head_dim <= 64 else 64 if head_dim <= 128 else 32, 8, 3)
    bn, warps, stages = first
    out = [first] + [(bn, warps, s) for s in range(stages - 1, 0, -1)]
    while not split and bn > 16:
        bn //= 2
        out.append((bn, warps, 1))
    return out


def kernel_config(block_m: int, head_dim: int, split: bool, on_gpu: bool, fp32: bool = False) -> tuple[int, int, int]:
    """The preferred ``(BLOCK_N, num_warps, num_stages)`` of :func:`kernel_configs`."""
    return kernel_configs(block_m, head_dim, split, on_gpu, fp32)[0]


# (device index, block_m, head dim, split, fp32) -> index into kernel_configs: set when Triton refused a launch
# for lack of shared memory, so later plans start at the configuration that fitted.
_CONFIG_LEVEL: dict[tuple, int] = {}


def _launches(q, k_cache, v_cache, block_table, out, plan: AttentionPlan, on_gpu: bool) -> list:
    """What the launches of ``plan`` need besides the call's tensors and scale: ``(forward?, grid, table,
    workspace, trailing positional arguments (sizes, strides, constexprs), options, config key)`` per launch.
    Depends only on the plan, the tensors' geometry (shapes, strides, dtype) and the configurations that fit,
    so :func:`span_attention_triton` computes it once per plan and geometry."""
    Tq, Hq, D = q.shape
    P, PAGE, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    BLOCK_D = max(16, 1 << (D - 1).bit_length())
    ieee = q.dtype == torch.float32
    dev = q.device.index if q.device.type == "cuda" else -1
    s_q, s_o, s_k, s_v = q.stride(), out.stride(), k_cache.stride(), v_cache.stride()
    strides = (s_q[0], s_q[1], s_o[0], s_o[1], s_k[0], s_k[1], s_k[2], s_v[0], s_v[1], s_v[2], block_table.stride(0))
    out_l = []
    for cp in (plan.narrow, plan.wide):
        if cp.max_units == 0:
            continue
        ckey = (dev, cp.block_m, D, cp.split, ieee)
        configs = kernel_configs(cp.block_m, D, cp.split, on_gpu, ieee)
        bn, warps, stages = configs[min(_CONFIG_LEVEL.get(ckey, 0), len(configs) - 1)]
        ws = plan.workspace(Hkv, D) if cp.split else None
        # positional, in the kernel's order: constexprs too (a positional call is cheaper than keywords)
        out_l.append((True, (cp.max_units, Hkv), cp.units, ws,
                      strides + (Hkv, G, D, BLOCK_D, cp.block_m, bn, cp.tokens_per_tile, PAGE, cp.split, ieee,
                                 UNIT_COLS), dict(num_warps=warps, num_stages=stages), ckey))
        if cp.split and cp.max_merge:
            out_l.append((False, (cp.max_merge, Hkv), cp.merge, ws,
                          (s_o[0], s_o[1], Hkv, G, D, BLOCK_D, cp.block_m, cp.tokens_per_tile, MERGE_COLS),
                          dict(num_warps=4 if cp.block_m * BLOCK_D >= 2048 * 4 else 2), None))
    return out_l


def _next_config(ckey, err, q) -> None:
    """A launch of the configuration ``ckey`` stands at was refused for lack of shared memory: move that key to
    the next candidate, or raise a clear error when none is left."""
    _, block_m, D, split, fp32 = ckey
    configs = kernel_configs(block_m, D, split, True, fp32)
    level = _CONFIG_LEVEL.get(ckey, 0) + 1
    if level >= len(configs):
        raise RuntimeError(
            f"span_attention (triton): no kernel configuration fits this GPU's shared memory for {block_m}-row "
            f"{'narrow' if split else 'wide'} tiles at head dim {D} ({q.dtype}); tried (BLOCK_N, warps, stages) "
            f"{configs}; the last: {err}") from err
    _CONFIG_LEVEL[ckey] = level


def span_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                          q_pos: torch.Tensor, plan: AttentionPlan, out: torch.Tensor, scale: float,
                          on_gpu: bool | None = None) -> None:
    """Shapes as :func:`pd_kernels.span_attention` (validated); ``plan`` is the layout's
    :class:`~pd_kernels.layout.plan.AttentionPlan` for ``G = Hq / Hkv``. Launches the narrow class (and the merge
    of its split tiles) and the wide class, each only when it may have units. ``on_gpu``: the kernel
    configuration to use (default: ``q.is_cuda``; the ahead-of-time compile test passes True on meta
    tensors).

    Host cost: the launch arguments are cached on the plan per tensor geometry (the 28 layers of a step
    share one entry), so a call costs a key of strides and shapes plus the launches themselves."""
    if on_gpu is None:
        on_gpu = q.is_cuda
    key = (q.shape, q.stride(), out.stride(), k_cache.shape, k_cache.stride(), v_cache.stride(),
           block_table.stride(0), q.dtype, on_gpu)
    launches = plan.launch_cache.get(key)
    if launches is None:
        launches = plan.launch_cache[key] = _launches(q, k_cache, v_cache, block_table, out, plan, on_gpu)
    qk_scale = scale * LOG2E  # softmax in base 2: exp(x) = exp2(x * log2(e))
    P = k_cache.shape[0]
    while True:
        try:
            _launch_all(launches, q, k_cache, v_cache, block_table, q_pos, out, P, qk_scale)
            return
        except OutOfResources as e:
            # Triton refuses a configuration at its first launch, before it runs: the launches before it were
            # complete (and recomputing them gives the same output), so all are redone with the next candidate
            ckey = getattr(e, "pd_key", None)   # the forward launch refused (a merge launch: not ours to fix)
            if ckey is None:
                raise
            _next_config(ckey, e, q)
            launches = plan.launch_cache[key] = _launches(q, k_cache, v_cache, block_table, out, plan, on_gpu)


def _launch_all(launches, q, k_cache, v_cache, block_table, q_pos, out, P, qk_scale) -> None:
    # kernels are looked up at call time, never cached (benchmarks and tests swap them for stubs/recorders)
    for fwd, grid, table, ws, tail, opts, ckey in launches:
        if fwd:
            o_part, ml = ws if ws is not None else (out, out)   # unused without splits
            try:
                _span_attn_fwd_kernel[grid](q, k_cache, v_cache, block_table, q_pos, table, out, o_part, ml, P,
                                            qk_scale, *tail, **opts)
            except OutOfResources as e:
                e.pd_key = ckey   # which class's configuration was refused
                raise
        else:
            _span_attn_merge_kernel[grid](ws[0], ws[1], table, out, *tail, **opts)
