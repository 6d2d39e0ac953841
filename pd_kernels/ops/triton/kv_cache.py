"""Triton kernel for paged KV writes.

One program per (token, layer) copies the token's ``Hkv * D`` keys and values into its slot. The row is
read as one contiguous block when the input's head stride equals ``D`` (the usual case), which Triton
turns into 16-byte vector accesses; slots ``< 0`` or ``>= num_slots`` are masked out, so a bad slot never
writes outside the cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "num_slots"])
def _paged_kv_write_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    T, num_slots,
    s_kl, s_kt, s_kh,          # strides of k (layer, token, head); last dim is unit-stride
    s_vl, s_vt, s_vh,
    s_cl, s_cs, s_ch,          # strides of the caches viewed as [L, num_slots, H, D]
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    l = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    # the slot test is made on a broadcast vector, not a scalar: Triton 3.9's interpreter turns
    # `bool_tensor & scalar_bool` into an int mask and rejects it.
    b_slot = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot
    m = (o_h[:, None] < H) & (o_d[None, :] < D) & (b_slot >= 0) & (b_slot < num_slots)
    # int64 offsets: a 28-layer pool of 100k slots x 4 x 128 overflows int32.
    t64 = t.to(tl.int64)
    p_k = k_ptr + l * s_kl + t64 * s_kt + o_h[:, None] * s_kh + o_d[None, :]
    p_v = v_ptr + l * s_vl + t64 * s_vt + o_h[:, None] * s_vh + o_d[None, :]
    dst = l * s_cl + slot * s_cs + o_h[:, None] * s_ch + o_d[None, :]
    b_k = tl.load(p_k, mask=m)
    b_v = tl.load(p_v, mask=m)
    tl.store(kc_ptr + dst, b_k.to(kc_ptr.dtype.element_ty), mask=m)
    tl.store(vc_ptr + dst, b_v.to(vc_ptr.dtype.element_ty), mask=m)


def paged_kv_write_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Shapes as :func:`pd_kernels.paged_kv_write` (inputs already validated)."""
    if k.dim() == 3:
        k, v, k_cache, v_cache = k.unsqueeze(0), v.unsqueeze(0), k_cache.unsqueeze(0), v_cache.unsqueeze(0)
    L, T, H, D = k.shape
    if T == 0 or L == 0:
        return
    num_slots = k_cache.shape[1] * k_cache.shape[2]
    # the page and in-page dims of a cache are merged into one slot dim: valid because the cache has
    # stride(page) == page_size * stride(in-page), checked by the public op.
    grid = (T, L)
    _paged_kv_write_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, T, num_slots,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(2), k_cache.stride(3),
        H=H, D=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
        num_warps=4 if H * D >= 512 else 1,
    )
