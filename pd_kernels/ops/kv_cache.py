"""``pd_kernels::paged_kv_write``: write new keys/values into the paged KV cache, in place."""
from __future__ import annotations

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, check, check_tensor, debug_enabled
from ..reference.kv_cache import paged_kv_write_ref
from . import cuda_fake

OP = "paged_kv_write"
_backend.register_op_backends(OP, ("torch", "triton", "cuda"))


@torch.library.custom_op("pd_kernels::paged_kv_write", mutates_args=("k_cache", "v_cache"))
def _paged_kv_write_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, backend: str) -> None:
    if backend == "triton":
        from .triton.kv_cache import paged_kv_write_triton

        paged_kv_write_triton(k, v, k_cache, v_cache, slot_mapping)
    elif backend == "cuda":
        # the CUDA kernel is a byte copy: cast first when the new K/V come in another dtype
        if k.dtype != k_cache.dtype:
            k, v = k.to(k_cache.dtype), v.to(k_cache.dtype)
        torch.ops.pd_kernels.paged_kv_write_cuda(k, v, k_cache, v_cache, slot_mapping)
    elif backend == "torch":
        paged_kv_write_ref(k, v, k_cache, v_cache, slot_mapping)
    else:
        raise ValueError(f"unknown backend {backend!r}")


@_paged_kv_write_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, backend):
    return None


@cuda_fake("pd_kernels::paged_kv_write_cuda")
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


def _validate(k, v, k_cache, v_cache, slot_mapping) -> None:
    dev = k.device
    check_tensor(k, "k", dtypes=FLOAT_DTYPES)
    check(k.dim() in (3, 4), f"k must be [T, Hkv, D] or [L, T, Hkv, D], got shape {tuple(k.shape)}")
    check_tensor(v, "v", dtypes=FLOAT_DTYPES, device=dev)
    check(v.shape == k.shape, f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    cdim = k.dim() + 1
    check_tensor(k_cache, "k_cache", dim=cdim, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(v_cache, "v_cache", dim=cdim, dtypes=FLOAT_DTYPES, device=dev)
    check(k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype,
          f"k_cache {tuple(k_cache.shape)}/{k_cache.dtype} and v_cache {tuple(v_cache.shape)}/{v_cache.dtype} differ")
    check(k_cache.stride() == v_cache.stride(), "k_cache and v_cache must have the same strides")
    lead = (k.shape[0],) if k.dim() == 4 else ()
    check(k_cache.shape[:len(lead)] == lead and k_cache.shape[-2:] == k.shape[-2:],
          f"cache shape {tuple(k_cache.shape)} does not fit k {tuple(k.shape)} "
          f"(expected [{'L, ' if lead else ''}P, page_size, {k.shape[-2]}, {k.shape[-1]}])")
    # pages must be laid out so that (page, in-page offset) is one "slot" dim: stride(page) = ps * stride(slot)
    pdim = len(lead)
    check(k_cache.stride(pdim) == k_cache.shape[pdim + 1] * k_cache.stride(pdim + 1),
          f"k_cache pages must be stored whole (stride(page) == page_size * stride(slot)), got strides {k_cache.stride()}")
    check_tensor(slot_mapping, "slot_mapping", dim=1, dtypes=(torch.int64,), device=dev)
    check(slot_mapping.shape[0] == k.shape[-3],
          f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[-3]} tokens")
    check(slot_mapping.stride(0) == 1 or slot_mapping.shape[0] <= 1, "slot_mapping must be contiguous")


def paged_kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, backend: str | None = None) -> None:
    """Write keys and values of new tokens into their cache slots, in place.

    Args:
        k, v: ``[T, Hkv, D]`` for one layer, or ``[L, T, Hkv, D]`` to write every layer in one launch (a
            span commit writes all layers). Any float dtype (cast to the cache dtype); unit last stride.
        k_cache, v_cache: ``[P, page_size, Hkv, D]`` (one layer) or ``[L, P, page_size, Hkv, D]``
            (e.g. :attr:`PagedKVCache.k_cache`). Mutated.
        slot_mapping: int64 ``[T]``, ``slot = page * page_size + offset``; ``-1`` writes nothing (padding,
            so a captured CUDA graph can run with a fixed T).
        backend: ``"torch" | "triton" | "cuda" | "auto"``; default from :func:`pd_kernels.use_backend`.

    Slots outside ``[0, P * page_size)`` are never written. With ``PD_KERNELS_DEBUG=1`` they raise
    ``IndexError`` instead (this reads ``slot_mapping`` on the host: a sync, for debugging only).
    """
    _validate(k, v, k_cache, v_cache, slot_mapping)
    if debug_enabled() and slot_mapping.numel():
        num_slots = k_cache.shape[-4] * k_cache.shape[-3]
        bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
        if bool(bad.any()):
            raise IndexError(f"paged_kv_write: slots {slot_mapping[bad][:8].tolist()} outside "
                             f"[-1, {num_slots}) (num_pages * page_size)")
    b = _backend.resolve(OP, backend, k.device)
    torch.ops.pd_kernels.paged_kv_write(k, v, k_cache, v_cache, slot_mapping, b)
