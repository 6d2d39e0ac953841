"""Plain-torch reference for the paged KV cache (SPEC section 6).

Layout (vLLM/FlashInfer "NHD"): a layer's cache is ``[num_pages, page_size, Hkv, D]``; the pool of
all layers is ``[L, num_pages, page_size, Hkv, D]``. Token position ``pos`` of a sequence lives in slot
``block_table[pos // page_size] * page_size + pos % page_size``; slot ``-1`` means "write nothing".
"""
from __future__ import annotations

import torch


def slots_for_positions(block_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Slots of ``positions`` of one sequence. ``block_table`` int32 ``[max_pages]``, ``positions`` int ``[T]``
    -> int64 ``[T]``."""
    positions = positions.to(torch.int64)
    pages = block_table.to(torch.int64)[positions // page_size]
    return pages * page_size + positions % page_size


def paged_kv_write_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Write ``k, v`` into the caches in place.

    ``k, v``: ``[T, Hkv, D]`` with caches ``[P, page_size, Hkv, D]`` (one layer), or ``[L, T, Hkv, D]`` with
    caches ``[L, P, page_size, Hkv, D]`` (all layers). ``slot_mapping``: int64 ``[T]``; ``-1`` entries write
    nothing. Out-of-range slots are skipped (the public op reports them under ``PD_KERNELS_DEBUG=1``).
    """
    layered = k.dim() == 4
    kc = k_cache if layered else k_cache.unsqueeze(0)
    vc = v_cache if layered else v_cache.unsqueeze(0)
    kk = k if layered else k.unsqueeze(0)
    vv = v if layered else v.unsqueeze(0)
    num_slots = kc.shape[1] * kc.shape[2]
    keep = (slot_mapping >= 0) & (slot_mapping < num_slots)
    idx = slot_mapping[keep]
    if idx.numel() == 0:
        return
    pages, offs = idx // kc.shape[2], idx % kc.shape[2]
    kc[:, pages, offs] = kk[:, keep].to(kc.dtype)
    vc[:, pages, offs] = vv[:, keep].to(vc.dtype)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Dense copy of the first ``length`` tokens of one sequence.

    ``cache`` ``[P, page_size, Hkv, D]`` (one layer), ``block_table`` int32 ``[max_pages]`` -> ``[length, Hkv, D]``.
    """
    page_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    slots = slots_for_positions(block_table.to(cache.device), pos, page_size)
    return cache[slots // page_size, slots % page_size]
