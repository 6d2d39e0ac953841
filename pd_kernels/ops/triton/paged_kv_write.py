"""Triton kernel for paged KV writes.

One program copies ``BLOCK_T`` tokens of one layer: a ``[BLOCK_T, Hkv, D]`` block of keys and one of
values, each token to its slot. A token's row is ``Hkv * D`` contiguous elements in the usual layout, so
the loads and stores are 16-byte vector accesses (Triton specialises the strides on divisibility by 16).
Slots ``< 0`` (padding) or ``>= num_slots`` are masked out: a bad slot never writes outside the cache.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "num_slots"])
def _paged_kv_write_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    T, num_slots,
    s_kl, s_kt, s_kh,          # strides of k [L, T, H, D] (layer, token, head); D is unit-stride
    s_vl, s_vt, s_vh,
    s_cl, s_cs, s_ch,          # strides of the caches viewed as [L, num_slots, H, D]
    H: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    l = tl.program_id(1).to(tl.int64)
    o_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_t = o_t < T
    slot = tl.load(slot_ptr + o_t, mask=m_t, other=-1)
    m_t = m_t & (slot >= 0) & (slot < num_slots)
    m = m_t[:, None, None] & (o_h[None, :, None] < H) & (o_d[None, None, :] < D)
    # int64 offsets: 28 layers x 100k slots x 4 heads x 128 overflows int32.
    t64 = o_t.to(tl.int64)[:, None, None]
    p_k = k_ptr + l * s_kl + t64 * s_kt + o_h[None, :, None] * s_kh + o_d[None, None, :]
    p_v = v_ptr + l * s_vl + t64 * s_vt + o_h[None, :, None] * s_vh + o_d[None, None, :]
    o_c = l * s_cl + slot[:, None, None] * s_cs + o_h[None, :, None] * s_ch + o_d[None, None, :]
    b_k = tl.load(p_k, mask=m)
    b_v = tl.load(p_v, mask=m)
    tl.store(kc_ptr + o_c, b_k.to(kc_ptr.dtype.element_ty), mask=m)
    tl.store(vc_ptr + o_c, b_v.to(vc_ptr.dtype.element_ty), mask=m)


def paged_kv_write_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Shapes as :func:`pd_kernels.paged_kv_write` (inputs already validated).

    Host cost matters (this runs twice per layer per decode step in eager mode): no views are made, the
    strides are read once, and a 3-dim (one-layer) write is the 4-dim one with a single layer of stride 0."""
    ks, kst, vst, cst = k.shape, k.stride(), v.stride(), k_cache.stride()
    if len(ks) == 3:
        L, (T, H, D) = 1, ks
        s_k, s_v, s_c = (0,) + kst, (0,) + vst, (0,) + cst
    else:
        L, T, H, D = ks
        s_k, s_v, s_c = kst, vst, cst
    if T == 0 or L == 0:
        return
    cs = k_cache.shape
    num_slots = cs[-4] * cs[-3]
    block_h, block_d, block_t = _blocks(H, D)
    # the page and in-page dims of a cache are merged into one slot dim: valid because
    # stride(page) == page_size * stride(in-page), checked by the public op.
    _paged_kv_write_kernel[((T + block_t - 1) // block_t, L)](
        k, v, k_cache, v_cache, slot_mapping, T, num_slots,
        s_k[0], s_k[1], s_k[2], s_v[0], s_v[1], s_v[2], s_c[0], s_c[2], s_c[3],
        H=H, D=D, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4,
    )


@functools.lru_cache(maxsize=64)
def _blocks(H: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, BLOCK_T) of a head geometry. ~4K elements per program: enough bytes in flight per SM
    without register pressure. BLOCK_T depends on the head geometry only, never on T: a decode loop whose
    token count changes every step (1 AR token, then a round of spans) reuses one compiled kernel; a short T
    just masks lanes."""
    bh, bd = triton.next_power_of_2(H), triton.next_power_of_2(D)
    return bh, bd, max(1, 4096 // (bh * bd))
