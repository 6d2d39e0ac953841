"""``pd_kernels::span_attention``: block-sparse span-isolated attention over the paged KV cache.

CUDA graphs: pass a :class:`pd_kernels.StaticSpanLayout` (fixed buffers refilled per step, fixed tile count,
query block and split count per bucket) and ``out=``; the call then does no host sync and no device
allocation (after the first call per head count / head dim, which allocates the split-K workspace when
``num_splits > 1``), so it can be captured once per bucket and replayed after ``layout.update(seqs)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, check, check_tensor, debug_enabled
from ..layout import TILE_COLS, SpanLayout, StaticSpanLayout
from ..reference.span_attention import span_attention_ref_tensors

OP = "span_attention"
_backend.register_op_backends(OP, ("torch", "triton"))


def _span_attention_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                       q_pos: torch.Tensor, q_seq: torch.Tensor, q_kv: torch.Tensor, tiles: torch.Tensor,
                       out: torch.Tensor, scale: float, block_m: int, num_splits: int, backend: str,
                       o_part: Optional[torch.Tensor] = None, ml: Optional[torch.Tensor] = None) -> None:
    # o_part / ml: optional split-K workspace (a static layout's), so a captured call allocates nothing
    if backend == "triton":
        sak = _backend.triton_module("span_attention")
        bn, warps, stages = sak.kernel_config(block_m, q.shape[-1], q.is_cuda)
        sak.span_attention_triton(q, k_cache, v_cache, block_table, q_pos, tiles, out, scale, block_m, num_splits,
                              block_n=bn, num_warps=warps, num_stages=stages, o_part=o_part, ml=ml)
    elif backend == "torch":
        span_attention_ref_tensors(q, k_cache, v_cache, block_table, q_seq, q_kv, scale, out=out)
    else:
        raise ValueError(f"unknown backend {backend!r}")


_op = torch.library.custom_op("pd_kernels::span_attention", _span_attention_impl, mutates_args=("out", "o_part", "ml"))


@_op.register_fake
def _(q, k_cache, v_cache, block_table, q_pos, q_seq, q_kv, tiles, out, scale, block_m, num_splits, backend,
      o_part=None, ml=None):
    return None


def _validate(q, k_cache, v_cache, block_table, layout, out) -> None:
    if not isinstance(layout, SpanLayout):
        raise TypeError(f"layout must be a pd_kernels.SpanLayout, got {type(layout).__name__}")
    dev = q.device
    check_tensor(q, "q", dim=3, dtypes=FLOAT_DTYPES)
    Tq, Hq, D = q.shape
    check_tensor(k_cache, "k_cache", dim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(v_cache, "v_cache", dim=4, dtypes=FLOAT_DTYPES, device=dev)
    check(k_cache.shape == v_cache.shape,
          f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
          f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    P, page_size, Hkv, Dk = k_cache.shape
    check(Dk == D, f"head dim of q ({D}) != head dim of the cache ({Dk}); cache is [P, page_size, Hkv, D]")
    check(1 <= D <= 256, f"head dim must be in [1, 256], got {D}")
    check(Hkv >= 1 and Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of KV heads ({Hkv}) (GQA)")
    if isinstance(layout, StaticSpanLayout):
        check(Hq // Hkv == layout.group, f"StaticSpanLayout was built for group={layout.group} query heads per KV "
                                         f"head, the inputs have {Hq} / {Hkv} = {Hq // Hkv}")
    check_tensor(block_table, "block_table", dim=2, dtypes=(torch.int32,), device=dev)
    check(block_table.shape[0] == layout.num_seqs,
          f"block_table has {block_table.shape[0]} rows but the layout has {layout.num_seqs} sequences "
          f"(row b of the block table is sequence b of the layout)")
    check(layout.device == dev, f"layout is on {layout.device}, q on {dev}")
    check(Tq == layout.num_queries, f"q has {Tq} query rows, the layout packs {layout.num_queries}")
    cap = block_table.shape[1] * page_size
    over = [(b, n) for b, n in enumerate(layout.kv_lens) if n > cap]
    check(not over, f"layout needs keys past the cache: (sequence, keys needed) {over[:4]} but the block "
                    f"table holds {block_table.shape[1]} pages x {page_size} = {cap} positions")
    if debug_enabled():
        # page ids are device values: read them only when asked (a sync), never in the decode loop
        for b, n in enumerate(layout.kv_lens):
            pages = block_table[b, :-(-n // page_size)]
            bad = (pages < 0) | (pages >= P)
            if bool(bad.any()):
                raise IndexError(f"span_attention: block_table row {b} has page ids {pages[bad][:8].tolist()} "
                                 f"outside [0, {P}) for its {n} visible keys")
    if out is not None:
        check_tensor(out, "out", dim=3, dtypes=(q.dtype,), device=dev)
        check(out.shape == q.shape, f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")


def span_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   layout: SpanLayout, *, scale: float | None = None, out: torch.Tensor | None = None,
                   num_splits: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of packed queries over the paged KV cache with span isolation (SPEC section 4).

    Args:
        q: ``[Tq, Hq, D]`` queries in ``layout`` order (fp16 / bf16 / fp32; unit last stride).
        k_cache, v_cache: ``[P, page_size, Hkv, D]``, one layer as written by :func:`paged_kv_write` (e.g.
            ``PagedKVCache.layer(l)``); same dtype as ``q``. ``Hq`` must be a multiple of ``Hkv`` (GQA).
        block_table: int32 ``[B, max_pages]``; row ``b`` holds the pages of sequence ``b`` of the layout.
        layout: :class:`pd_kernels.SpanLayout`: which keys each query sees (keys must already be in the cache:
            the K/V of the queries themselves are written before attention). A
            :class:`pd_kernels.StaticSpanLayout` (CUDA graphs) fixes the query block and split count; with
            ``out=`` the call then neither syncs nor allocates (Triton backend; the torch reference reads
            the layout on the host).
        scale: softmax scale, default ``1 / sqrt(D)``.
        out: optional ``[Tq, Hq, D]`` output buffer (dtype of q), written in place.
        num_splits: Triton only: split each tile's keys over this many programs (1..16) and merge; default
            picks it from the grid size (more than 1 only for small grids on a GPU, e.g. decode). With a
            static layout: ``layout.num_splits`` (passing another value is an error).
        backend: ``"torch" | "triton" | "auto"`` (no CUDA kernel for this op).

    Returns ``out``: ``[Tq, Hq, D]``; query ``t`` attends (softmax in fp32) to the keys ``[0, a) U [b, c)``
    of sequence ``layout.q_seq[t]`` (``layout.q_kv[t] = (a, b, c)``); padding rows are 0.

    Page ids in ``block_table`` are trusted (they are device values; checking them costs a sync). With
    ``PD_KERNELS_DEBUG=1`` every page a query can see is checked to be in ``[0, P)`` and a bad one raises
    ``IndexError``.
    """
    _validate(q, k_cache, v_cache, block_table, layout, out)
    b = _backend.resolve(OP, backend, q.device)
    if out is None:
        out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    block_m, splits = 16, 1
    o_part = ml = None
    if isinstance(layout, StaticSpanLayout):
        # everything fixed per bucket: same launch every step, nothing read from the step's data
        check(num_splits is None or int(num_splits) == layout.num_splits,
              f"num_splits={num_splits} but the StaticSpanLayout fixes num_splits={layout.num_splits}")
        block_m, splits = layout.block_m, layout.num_splits
        if b == "triton":
            tiles = layout.tiles(layout.tokens_per_tile)
            if splits > 1:
                o_part, ml = layout.split_workspace(q.shape[1], q.shape[2])
        else:
            tiles = layout.tiles(layout.tokens_per_tile)[:0]
    elif b == "triton":
        sak = _backend.triton_module("span_attention")
        G = q.shape[1] // k_cache.shape[2]
        block_m = sak.choose_block_m(layout.max_segment, G)
        tiles = layout.tiles(block_m // G)
        if num_splits is None:
            bn = sak.kernel_config(block_m, q.shape[-1], q.is_cuda)[0]
            splits = sak.choose_splits(tiles.shape[0], k_cache.shape[2], layout.max_kv, bn, q.device)
        else:
            check(1 <= int(num_splits) <= sak.MAX_SPLITS,
                  f"num_splits must be in [1, {sak.MAX_SPLITS}], got {num_splits}")
            splits = int(num_splits)
    else:
        tiles = torch.zeros((0, TILE_COLS), dtype=torch.int32, device=q.device)
    args = (q, k_cache, v_cache, block_table, layout.q_pos, layout.q_seq, layout.q_kv, tiles, out, scale, block_m,
            splits, b, o_part, ml)
    if _backend.eager(q):
        _span_attention_impl(*args)
    else:
        torch.ops.pd_kernels.span_attention(*args)
    return out
