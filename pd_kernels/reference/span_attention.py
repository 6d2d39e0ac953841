"""Plain-torch reference for span-isolated attention over the paged KV cache (SPEC section 4).

Gather each sequence's keys/values from its pages, build the dense visibility mask of its queries, and
run a softmax in fp32 (fp64 when the inputs are fp64). Slow and simple: the semantics the kernels match.

Semantics beyond finite inputs (the kernels follow them):

* a row that sees no key outputs 0 (padding rows, empty ranges, every visible key on a bad page);
* NaN in, NaN out: a NaN/inf in a row's query, in a key or value the row sees, or in ``scale`` makes that
  row's output non-finite; keys and values the row does not see never reach it;
* a key whose page id in the block table is outside ``[0, num_pages)`` is not seen (never read).
"""
from __future__ import annotations

import math

import torch


def _gather(cache: torch.Tensor, pages: torch.Tensor, ok: torch.Tensor, length: int) -> torch.Tensor:
    """``[length, Hkv, D]`` keys of one sequence through its page list (``pages`` int64 ``[length]``); rows on a
    page outside the pool (``~ok``) are 0 and never read."""
    page_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    x = cache[pages.clamp(0, cache.shape[0] - 1), pos % page_size]
    return x.masked_fill(~ok[:, None, None], 0)


def span_attention_ref_tensors(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, q_seq: torch.Tensor, q_kv: torch.Tensor,
                               scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference on the layout's tensors (what the registered op's torch backend runs).

    q ``[Tq, Hq, D]``; k_cache/v_cache ``[P, page_size, Hkv, D]``; block_table int32 ``[B, max_pages]``;
    q_seq int32 ``[Tq]`` (-1 = padding); q_kv int32 ``[Tq, 3]``: query ``t`` sees keys
    ``[0, a) U [b, c)`` of sequence ``q_seq[t]``. Returns ``[Tq, Hq, D]`` in q's dtype. Reads
    ``q_seq``/``q_kv`` on the host (a sync): reference only.
    """
    Tq, Hq, D = q.shape
    P, page_size, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty_like(q)
    out.zero_()
    seq_host = q_seq.cpu().tolist()
    kv_host = q_kv.cpu()
    for b in sorted(set(seq_host) - {-1}):
        rows = torch.tensor([t for t, s in enumerate(seq_host) if s == b], dtype=torch.long)
        a, lo, hi = kv_host[rows, 0], kv_host[rows, 1], kv_host[rows, 2]
        L = int(torch.maximum(a, hi).max())
        if L == 0:
            continue
        pos = torch.arange(L)
        pages = block_table[b].to(torch.int64).cpu()[pos // page_size]
        ok = (pages >= 0) & (pages < P)
        key = pos[None, :]
        vis = ((key < a[:, None]) | ((key >= lo[:, None]) & (key < hi[:, None]))) & ok[None, :]   # [n, L]
        dev = k_cache.device
        pages, ok_d, vis_d = pages.to(dev), ok.to(dev), vis.to(dev)
        k = _gather(k_cache, pages, ok_d, L).to(acc).repeat_interleave(G, dim=1)    # [L, Hq, D]
        v = _gather(v_cache, pages, ok_d, L).to(acc).repeat_interleave(G, dim=1)
        qb = q[rows.to(q.device)].to(acc)                              # [n, Hq, D]
        s = torch.einsum("nhd,lhd->hnl", qb, k) * scale
        s = s.masked_fill(~vis_d[None], float("-inf"))                 # invisible keys never reach a row
        p = torch.softmax(s, dim=-1)
        p = p.masked_fill(~vis_d.any(-1)[None, :, None], 0.0)          # a row that sees no key: 0 (not NaN)
        bad_v = ~torch.isfinite(v)
        if bool(bad_v.any()):
            # 0 x NaN would let a value reach rows that do not see it: drop non-finite values from the
            # product, then mark the rows that do see one (NaN in, NaN out)
            o = torch.einsum("hnl,lhd->nhd", p, v.masked_fill(bad_v, 0.0))
            seen = torch.einsum("nl,lhd->nhd", vis_d.to(acc), bad_v.to(acc)) > 0
            o = o.masked_fill(seen, float("nan"))
        else:
            o = torch.einsum("hnl,lhd->nhd", p, v)
        out[rows.to(out.device)] = o.to(out.dtype)
    return out


def span_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                       layout, scale: float | None = None) -> torch.Tensor:
    """Reference of :func:`pd_kernels.span_attention` for a :class:`pd_kernels.SpanLayout`.

    q ``[Tq, Hq, D]``, k_cache/v_cache ``[P, page_size, Hkv, D]``, block_table int32 ``[B, max_pages]``
    -> ``[Tq, Hq, D]`` in q's dtype. Softmax in fp32 (fp64 for fp64 inputs).
    """
    return span_attention_ref_tensors(q, k_cache, v_cache, block_table, layout.q_seq, layout.q_kv, scale)
