"""``pd_kernels::paged_kv_write``: write new keys/values into the paged KV cache, in place."""
from __future__ import annotations

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, check_tensor, debug_enabled, internal_overlap, share_memory
from ..reference.paged_kv_write import paged_kv_write_ref
from .._cuda_ext import cuda_fake

OP = "paged_kv_write"
_BF16 = torch.bfloat16
_backend.register_op_backends(OP, ("torch", "triton", "cuda"))


def _check_cache_memory(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The caches' memory (data pointers: real tensors only, so this runs in the implementation, not on the
    traced path): K and V caches apart, and no element of a cache sharing memory with another. The caches have
    one shape, dtype and strides (checked before)."""
    if share_memory(k_cache, v_cache):
        raise ValueError("k_cache and v_cache share memory: the values would overwrite the keys")
    # a cache whose elements share memory (an expanded view, stride 0) would take several tokens' K/V in one
    # place (the torch path refuses such a write deep inside index_put, the kernels would race)
    if internal_overlap(k_cache):
        raise ValueError(f"k_cache / v_cache elements overlap in memory (an expanded view?), strides "
                         f"{k_cache.stride()} for shape {tuple(k_cache.shape)}")


def _paged_kv_write_impl(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, backend: str) -> None:
    _check_cache_memory(k_cache, v_cache)
    if backend == "triton":
        _backend.triton_module("paged_kv_write").paged_kv_write_triton(k, v, k_cache, v_cache, slot_mapping)
    elif backend == "cuda":
        # the CUDA kernel is a byte copy: cast first when the new K or V come in another dtype (each on its
        # own: k may already match the cache while v does not)
        cdt = k_cache.dtype
        if k.dtype != cdt:
            k = k.to(cdt)
        if v.dtype != cdt:
            v = v.to(cdt)
        torch.ops.pd_kernels.paged_kv_write_cuda(k, v, k_cache, v_cache, slot_mapping)
    elif backend == "torch":
        paged_kv_write_ref(k, v, k_cache, v_cache, slot_mapping)
    else:
        raise ValueError(f"unknown backend {backend!r}")


_op = torch.library.custom_op("pd_kernels::paged_kv_write", _paged_kv_write_impl,
                              mutates_args=("k_cache", "v_cache"))


@_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, backend):
    return None


@cuda_fake("pd_kernels::paged_kv_write_cuda")
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


def _validate(k, v, k_cache, v_cache, slot_mapping) -> None:
    # metadata only; messages are formatted only on failure (this runs on every call of the decode step)
    dev = k.device
    check_tensor(k, "k", dtypes=FLOAT_DTYPES)
    kd = k.dim()
    if kd != 3 and kd != 4:
        raise ValueError(f"k must be [T, Hkv, D] or [L, T, Hkv, D], got shape {tuple(k.shape)}")
    check_tensor(v, "v", dtypes=FLOAT_DTYPES, device=dev)
    ks = k.shape
    if v.shape != ks:
        raise ValueError(f"v shape {tuple(v.shape)} != k shape {tuple(ks)}")
    if ks[-1] < 1 or ks[-2] < 1:
        raise ValueError(f"k must have at least one head and a head dim >= 1, got shape {tuple(ks)}")
    cdim = kd + 1
    check_tensor(k_cache, "k_cache", dim=cdim, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(v_cache, "v_cache", dim=cdim, dtypes=FLOAT_DTYPES, device=dev)
    cs, cst = k_cache.shape, k_cache.stride()
    if v_cache.shape != cs or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache {tuple(cs)}/{k_cache.dtype} and v_cache {tuple(v_cache.shape)}/"
                         f"{v_cache.dtype} differ")
    if v_cache.stride() != cst:
        raise ValueError("k_cache and v_cache must have the same strides")
    pdim = kd - 3          # 1 with a layer dim, else 0
    if (pdim and cs[0] != ks[0]) or cs[-2:] != ks[-2:]:
        raise ValueError(f"cache shape {tuple(cs)} does not fit k {tuple(ks)} "
                         f"(expected [{'L, ' if pdim else ''}P, page_size, {ks[-2]}, {ks[-1]}])")
    # pages must be laid out so that (page, in-page offset) is one "slot" dim: stride(page) = ps * stride(slot)
    if cst[pdim] != cs[pdim + 1] * cst[pdim + 1]:
        raise ValueError(f"k_cache pages must be stored whole (stride(page) == page_size * stride(slot)), "
                         f"got strides {cst}")
    check_tensor(slot_mapping, "slot_mapping", dim=1, dtypes=(torch.int64,), device=dev)
    if slot_mapping.shape[0] != ks[-3]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {ks[-3]} tokens")


def _check_slot_values(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """``PD_KERNELS_DEBUG=1``: slots inside ``[-1, num_slots)`` and no slot written twice (a sync)."""
    s = slot_mapping.cpu()
    bad = (s < -1) | (s >= num_slots)
    if bool(bad.any()):
        raise IndexError(f"paged_kv_write: slots {s[bad][:8].tolist()} outside [-1, {num_slots}) "
                         f"(num_pages * page_size)")
    used = s[s >= 0]
    if used.unique().numel() != used.numel():
        vals, counts = used.unique(return_counts=True)
        raise ValueError(f"paged_kv_write: slots {vals[counts > 1][:8].tolist()} appear more than once in "
                         f"slot_mapping (which token would be written is unspecified)")


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
            Triton on CPU tensors (the interpreter) raises ``BackendUnavailable`` for a cast into a bf16 cache:
            the interpreter truncates instead of rounding to nearest even.

    Slots outside ``[0, P * page_size)`` are never written. Two tokens with the same slot: one of them is
    written, which one is unspecified (it may differ between backends and runs). With ``PD_KERNELS_DEBUG=1``
    both raise instead (``IndexError`` for a slot outside ``[-1, P * page_size)``, ``ValueError`` for a
    repeated slot; this reads ``slot_mapping`` on the host: a sync, for debugging only).
    """
    _validate(k, v, k_cache, v_cache, slot_mapping)
    if debug_enabled() and slot_mapping.numel():
        _check_slot_values(slot_mapping, k_cache.shape[-4] * k_cache.shape[-3])
    b = _backend.resolve(OP, backend, k.device)
    if b == "triton" and k_cache.dtype is _BF16 and (k.dtype is not _BF16 or v.dtype is not _BF16) \
            and k.device.type == "cpu":
        raise _backend.BackendUnavailable(
            "pd_kernels.paged_kv_write: the Triton interpreter (CPU tensors) rounds casts to bf16 wrongly "
            "(truncates): write bf16 K/V into a bf16 cache, use the torch backend, or a GPU")
    if _backend.eager(k):
        _paged_kv_write_impl(k, v, k_cache, v_cache, slot_mapping, b)
    else:
        torch.ops.pd_kernels.paged_kv_write(k, v, k_cache, v_cache, slot_mapping, b)
