"""Plain-torch reference for span-isolated attention over the paged KV cache (SPEC section 4).

Gather each sequence's keys/values from its pages, build the dense visibility mask of its queries, and
run a softmax in fp32 (fp64 when the inputs are fp64). Slow and simple: the semantics the kernels match.
"""
from __future__ import annotations

import math

import torch

from .kv_cache import gather_pages


def span_attention_ref_tensors(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, q_seq: torch.Tensor, q_kv: torch.Tensor,
                               scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference on the layout's tensors (what the registered op's torch backend runs).

    q ``[Tq, Hq, D]``; k_cache/v_cache ``[P, page_size, Hkv, D]``; block_table int32 ``[B, max_pages]``;
    q_seq int32 ``[Tq]`` (-1 = padding); q_kv int32 ``[Tq, 3]``: query ``t`` sees keys
    ``[0, a) U [b, c)`` of sequence ``q_seq[t]``. Returns ``[Tq, Hq, D]`` in q's dtype (rows that see no
    key are 0). Reads ``q_seq``/``q_kv`` on the host (a sync): reference only.
    """
    Tq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
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
        k = gather_pages(k_cache, block_table[b], L).to(acc)          # [L, Hkv, D]
        v = gather_pages(v_cache, block_table[b], L).to(acc)
        k = k.repeat_interleave(G, dim=1)                              # [L, Hq, D]
        v = v.repeat_interleave(G, dim=1)
        key = torch.arange(L)[None, :]
        mask = (key < a[:, None]) | ((key >= lo[:, None]) & (key < hi[:, None]))   # [n, L]
        qb = q[rows.to(q.device)].to(acc)                              # [n, Hq, D]
        s = torch.einsum("nhd,lhd->hnl", qb, k) * scale
        s = s.masked_fill(~mask.to(s.device)[None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)                   # rows with no key: 0
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
