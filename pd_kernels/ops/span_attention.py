"""``pd_kernels::span_attention``: block-sparse span-isolated attention over the paged KV cache.

Two paths run the same implementation (:func:`_run`):

* eager (:func:`pd_kernels._backend.eager`): the public function checks the tensors' metadata, checks the
  layout against the cache with host values the layout computed once (``num_seqs``, ``max_kv``), takes the
  layout's cached tiling plan for this ``G`` and launches. Nothing here is per layout-and-call work: the
  28 layers of a step share the plan and its workspace.
* ``torch.compile`` / dispatch modes: the registered op. The layout object cannot travel through a graph,
  so the op receives its host description as CPU tensors (``segs_host``, ``kv_host``; no sync, they live on
  the host) and its implementation, which runs at execution time outside the trace, does the same checks and
  looks the plan up on ``segs_host`` (built there on first use). The traced code only reads tensor
  metadata: nothing data-dependent is guarded on, and a new layout of a new size is a new dynamic shape,
  not a new guard value.

CUDA graphs: pass a :class:`pd_kernels.StaticSpanLayout` (fixed buffers refilled per step, fixed table
capacities) and ``out=``; after the first call per ``(Hkv, D)`` (which allocates the split-K workspace) a
call neither syncs nor allocates, so it can be captured once per bucket and replayed after
``layout.update(seqs)``.
"""
from __future__ import annotations

import math

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, cdiv, check, check_tensor, debug_enabled, internal_overlap, share_memory
from ..layout import SpanLayout, StaticSpanLayout, plan_for
from ..reference.span_attention import span_attention_ref_tensors

OP = "span_attention"
_backend.register_op_backends(OP, ("torch", "triton"))
_FLOAT_DTYPES = frozenset(FLOAT_DTYPES)


def _run(q, k_cache, v_cache, block_table, q_pos, q_seq, q_kv, out, scale, backend, plan) -> None:
    if backend == "triton":
        _backend.triton_module("span_attention").span_attention_triton(q, k_cache, v_cache, block_table, q_pos, plan,
                                                                       out, scale)
    elif backend == "torch":
        span_attention_ref_tensors(q, k_cache, v_cache, block_table, q_seq, q_kv, scale, out=out)
    else:
        raise ValueError(f"unknown backend {backend!r}")


def _check_fits(num_seqs: int, max_kv: int, kv_lens, block_table: torch.Tensor, page_size: int,
                num_pages: int, debug: bool) -> None:
    """The layout against the cache (host values): one block-table row per sequence, every visible key
    inside the block table; with ``PD_KERNELS_DEBUG=1`` also every page id a query can see (a sync)."""
    if block_table.shape[0] != num_seqs:
        raise ValueError(f"block_table has {block_table.shape[0]} rows but the layout has {num_seqs} sequences "
                         f"(row b of the block table is sequence b of the layout)")
    cap = block_table.shape[1] * page_size
    if max_kv > cap:
        over = [(b, int(n)) for b, n in enumerate(kv_lens) if n > cap]
        raise ValueError(f"layout needs keys past the cache: (sequence, keys needed) {over[:4]} but the block "
                         f"table holds {block_table.shape[1]} pages x {page_size} = {cap} positions")
    if debug:
        # page ids are device values: read them only when asked (a sync), never in the decode loop
        for b, n in enumerate(kv_lens):
            pages = block_table[b, :cdiv(int(n), page_size)]
            bad = (pages < 0) | (pages >= num_pages)
            if bool(bad.any()):
                raise IndexError(f"span_attention: block_table row {b} has page ids {pages[bad][:8].tolist()} "
                                 f"outside [0, {num_pages}) for its {int(n)} visible keys")


def _check_out_memory(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      caches: bool) -> None:
    """``out`` is written while q and the cache are read (by other tiles): it must not share memory with ``q``,
    nor have elements that share memory (an expanded view); with ``caches`` (``PD_KERNELS_DEBUG=1``, or the
    registered op), nor with the caches. Data pointers: real tensors only. ``out`` has q's shape and dtype."""
    if internal_overlap(out):
        raise ValueError(f"out elements overlap in memory (an expanded view?), strides {out.stride()}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)) if caches else (("q", q),):
        if share_memory(out, t):
            raise ValueError(f"out shares memory with {name}: attention reads {name} while writing out (the torch "
                             f"path zeroes out first); pass a separate buffer")


def _span_attention_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                         q_pos: torch.Tensor, q_seq: torch.Tensor, q_kv: torch.Tensor, segs_host: torch.Tensor,
                         kv_host: torch.Tensor, out: torch.Tensor, scale: float, backend: str) -> None:
    # the registered op's body: runs at execution time (also under torch.compile), with the layout's host
    # description (CPU tensors): the layout checks and the plan lookup happen here, not in the trace
    _check_out_memory(q, k_cache, v_cache, out, True)
    kv = kv_host.tolist()
    _check_fits(len(kv), max(kv, default=0), kv, block_table, k_cache.shape[1], k_cache.shape[0], debug_enabled())
    plan = None
    if backend == "triton":
        plan = plan_for(segs_host, q.shape[1] // k_cache.shape[2], q.device)
    _run(q, k_cache, v_cache, block_table, q_pos, q_seq, q_kv, out, scale, backend, plan)


_op = torch.library.custom_op("pd_kernels::span_attention", _span_attention_impl, mutates_args=("out",))


@_op.register_fake
def _(q, k_cache, v_cache, block_table, q_pos, q_seq, q_kv, segs_host, kv_host, out, scale, backend):
    return None


def _validate(q, k_cache, v_cache, block_table, layout, out) -> None:
    """Tensor metadata only (dtype, dims, devices, strides, shapes against the layout's tensors): cheap, and
    under ``torch.compile`` nothing but shape guards. A fast test of everything first; the detailed checks
    (and their messages) run only when it fails or for tensor subclasses (fake / functional tensors)."""
    T = torch.Tensor
    if (type(q) is T and type(k_cache) is T and type(v_cache) is T and type(block_table) is T
            and (out is None or type(out) is T) and isinstance(layout, SpanLayout)):
        dt, dev = q.dtype, q.device
        shape = q.shape
        kshape = k_cache.shape
        if (len(shape) == 3 and dt in _FLOAT_DTYPES and q.stride()[-1] == 1 and len(kshape) == 4
                and kshape == v_cache.shape and k_cache.dtype == dt and v_cache.dtype == dt
                and k_cache.stride()[-1] == 1 and v_cache.stride()[-1] == 1 and k_cache.device == dev
                and v_cache.device == dev and kshape[3] == shape[2] and 1 <= shape[2] <= 256
                and kshape[2] >= 1 and shape[1] % kshape[2] == 0 and kshape[0] >= 1 and kshape[1] >= 1
                and block_table.dim() == 2 and block_table.dtype == torch.int32 and block_table.stride()[-1] == 1
                and block_table.device == dev and layout.q_pos.device == dev and layout.q_pos.shape[0] == shape[0]
                and (out is None or (out.shape == shape and out.dtype == dt and out.stride()[-1] == 1
                                     and out.device == dev))
                and (not isinstance(layout, StaticSpanLayout) or shape[1] // kshape[2] == layout.group)):
            return
    _validate_detailed(q, k_cache, v_cache, block_table, layout, out)


def _validate_detailed(q, k_cache, v_cache, block_table, layout, out) -> None:
    if not isinstance(layout, SpanLayout):
        raise TypeError(f"layout must be a pd_kernels.SpanLayout, got {type(layout).__name__}")
    dev = q.device
    check_tensor(q, "q", dim=3, dtypes=_FLOAT_DTYPES)
    check_tensor(k_cache, "k_cache", dim=4, dtypes=_FLOAT_DTYPES, device=dev)
    check_tensor(v_cache, "v_cache", dim=4, dtypes=_FLOAT_DTYPES, device=dev)
    Tq, Hq, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    P, page_size, Hkv, Dk = k_cache.shape
    if P < 1 or page_size < 1:
        raise ValueError(f"k_cache must have at least one page of at least one slot, got shape {tuple(k_cache.shape)} "
                         f"([P, page_size, Hkv, D])")
    if Dk != D:
        raise ValueError(f"head dim of q ({D}) != head dim of the cache ({Dk}); cache is [P, page_size, Hkv, D]")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim must be in [1, 256], got {D}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv}) (GQA)")
    if isinstance(layout, StaticSpanLayout) and Hq // Hkv != layout.group:
        raise ValueError(f"StaticSpanLayout was built for group={layout.group} query heads per KV head, the "
                         f"inputs have {Hq} / {Hkv} = {Hq // Hkv}")
    check_tensor(block_table, "block_table", dim=2, dtypes=(torch.int32,), device=dev)
    q_pos = layout.q_pos
    if q_pos.device != dev:
        raise ValueError(f"layout is on {q_pos.device}, q on {dev}")
    if Tq != q_pos.shape[0]:
        raise ValueError(f"q has {Tq} query rows, the layout packs {q_pos.shape[0]}")
    if out is not None:
        check_tensor(out, "out", dim=3, dtypes=(q.dtype,), device=dev)
        check(out.shape == q.shape, f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")


def span_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   layout: SpanLayout, *, scale: float | None = None, out: torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """Attention of packed queries over the paged KV cache with span isolation (SPEC section 4).

    Args:
        q: ``[Tq, Hq, D]`` queries in ``layout`` order (fp16 / bf16 / fp32; unit last stride).
        k_cache, v_cache: ``[P, page_size, Hkv, D]``, one layer as written by :func:`paged_kv_write` (e.g.
            ``PagedKVCache.layer(l)``); same dtype as ``q``. ``Hq`` must be a multiple of ``Hkv`` (GQA).
        block_table: int32 ``[B, max_pages]``; row ``b`` holds the pages of sequence ``b`` of the layout.
        layout: :class:`pd_kernels.SpanLayout`: which keys each query sees (keys must already be in the cache:
            the K/V of the queries themselves are written before attention). A
            :class:`pd_kernels.StaticSpanLayout` (CUDA graphs): with ``out=`` the call then neither syncs nor
            allocates (Triton backend, after the first call per ``(Hkv, D)``; the torch reference reads the
            layout on the host).
        scale: softmax scale, default ``1 / sqrt(D)``.
        out: optional ``[Tq, Hq, D]`` output buffer (dtype of q), written in place; it must not share memory
            with ``q`` or the caches, nor have overlapping elements (checked: ``q`` and overlap on every eager
            call, the caches too with ``PD_KERNELS_DEBUG=1`` or through the registered op).
        backend: ``"torch" | "triton" | "auto"`` (no CUDA kernel for this op).

    Returns ``out``: ``[Tq, Hq, D]``; query ``t`` attends (softmax in fp32) to the keys ``[0, a) U [b, c)``
    of sequence ``layout.q_seq[t]`` (``layout.q_kv[t] = (a, b, c)``). A row that sees no key (padding) is 0.
    NaN in, NaN out: a non-finite query, visible key or value, or scale gives a non-finite row (Triton: a
    non-finite value of a causal chunk's own token can also reach the earlier rows of its kernel tile). One
    exception, where the backends differ: a row whose every visible score is ``-inf`` (an infinite key against
    a query of the opposite sign) is NaN on torch (softmax of -inf only) and 0 on Triton (taken as a row that
    sees no key); a ``-inf`` score next to finite ones just gets weight 0 on both.

    The tiling (:mod:`pd_kernels.layout`) is chosen per segment from the segment alone, so a request's output
    does not depend on the rest of its batch (bitwise, on one backend and device).

    Page ids: a page id outside ``[0, P)`` in ``block_table`` is never read; its keys count as not seen.
    With ``PD_KERNELS_DEBUG=1`` every page a query can see is checked first and a bad one raises
    ``IndexError`` (a sync).

    Raises ``BackendUnavailable`` for bf16 on the Triton interpreter (CPU tensors): its bf16 arithmetic is
    silently wrong; use fp16 / fp32 there, or the torch backend.
    """
    _validate(q, k_cache, v_cache, block_table, layout, out)
    b = _backend.resolve(OP, backend, q.device)
    if b == "triton" and q.dtype == torch.bfloat16 and q.device.type == "cpu":
        raise _backend.BackendUnavailable(
            "pd_kernels.span_attention: the Triton interpreter (CPU tensors) computes bf16 wrongly (bf16 is held "
            "as raw 16-bit integers there): use float16 / float32 on CPU, the torch backend, or a GPU")
    given_out = out is not None
    if out is None:
        out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _backend.eager(q):
        debug = debug_enabled()
        if given_out:
            _check_out_memory(q, k_cache, v_cache, out, debug)
        _check_fits(len(layout.kv_lens), layout.max_kv, layout.kv_lens, block_table, k_cache.shape[1],
                    k_cache.shape[0], debug)
        plan = layout.plan(q.shape[1] // k_cache.shape[2]) if b == "triton" else None
        _run(q, k_cache, v_cache, block_table, layout.q_pos, layout.q_seq, layout.q_kv, out, scale, b, plan)
    else:
        torch.ops.pd_kernels.span_attention(q, k_cache, v_cache, block_table, layout.q_pos, layout.q_seq,
                                            layout.q_kv, layout.segs_host, layout.kv_host, out, scale, b)
    return out
