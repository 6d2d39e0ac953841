"""paged_kv_write: Triton and CUDA vs torch advanced indexing and vs a per-layer torch loop.

Counted bytes: keys + values read once and written once (2 x 2 x L x T x Hkv x D x itemsize) plus the
slot mapping (8 bytes a token). Reported with the same-run device-to-device copy of the same number of
bytes (``copy`` rows: the ceiling), so "% of copy" needs no number from elsewhere.

    python benchmarks/bench_paged_kv_write.py --out benchmarks/results/paged_kv_write_h100.json
    python benchmarks/bench_paged_kv_write.py --smoke          # CPU: checks the script only
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pd_kernels as pk  # noqa: E402
from benchmarks._harness import Bench, parser, time_fn  # noqa: E402
from pd_kernels._checks import cdiv  # noqa: E402


def torch_index_write(k, v, kc, vc, slots):
    """One advanced-indexing assignment over all layers (what a torch-only decoder would write)."""
    ps = kc.shape[-3]
    pages, offs = slots // ps, slots % ps
    kc[:, pages, offs] = k
    vc[:, pages, offs] = v


def torch_layer_loop(k, v, kc, vc, slots):
    """index_copy_ per layer, as a model that writes its cache layer by layer does."""
    L, P, ps, H, D = kc.shape
    for layer in range(L):
        kc[layer].view(P * ps, H, D).index_copy_(0, slots, k[layer])
        vc[layer].view(P * ps, H, D).index_copy_(0, slots, v[layer])


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    args = p.parse_args()
    bench = Bench("paged_kv_write", args)
    dev = bench.device
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        sizes, layer_counts, dtype = [7, 33], [1, 2], torch.float16
        args.heads, args.head_dim = 2, 64
    else:
        sizes, layer_counts, dtype = [64, 128, 256, 512, 1024, 4096, 16384], [1, args.layers], torch.bfloat16
    impls = {"torch-index": torch_index_write, "torch-layer-loop": torch_layer_loop}
    for b in ("triton", "cuda"):
        try:
            pk._backend.resolve("paged_kv_write", b, torch.device(dev))
            impls[b] = (lambda b: lambda *a: pk.paged_kv_write(*a, backend=b))(b)
        except pk.BackendUnavailable as e:
            print(f"skip {b}: {e}")
    H, D, ps = args.heads, args.head_dim, args.page_size
    for L in layer_counts:
        for T in sizes:
            gen = torch.Generator().manual_seed(T)
            num_pages = cdiv(T, ps) * 2
            pages = torch.randperm(num_pages, generator=gen)[:cdiv(T, ps)]
            pos = torch.arange(T)
            slots = (pages[pos // ps] * ps + pos % ps).to(dev)
            k = torch.randn(L, T, H, D, device=dev, dtype=dtype)
            v = torch.randn(L, T, H, D, device=dev, dtype=dtype)
            kc = torch.randn(L, num_pages, ps, H, D, device=dev, dtype=dtype)
            vc = torch.randn_like(kc)
            nbytes = 2 * 2 * k.numel() * k.element_size() + slots.numel() * 8
            src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
            dst = torch.empty_like(src)
            t = time_fn(lambda: dst.copy_(src), bench)
            bench.row(impl="copy", layers=L, tokens=T, timing=t, bytes=2 * src.numel() * 4)
            ref_k = None
            for name, fn in impls.items():
                kc2, vc2 = kc.clone(), vc.clone()
                fn(k, v, kc2, vc2, slots)
                if ref_k is None:
                    ref_k, ref_v = kc2, vc2
                elif not (torch.equal(kc2, ref_k) and torch.equal(vc2, ref_v)):
                    bench.row(impl=name, layers=L, tokens=T, timing=None, error="WRONG RESULT")
                    continue
                t = time_fn(lambda: fn(k, v, kc2, vc2, slots), bench)
                bench.row(impl=name, layers=L, tokens=T, timing=t, bytes=nbytes)
            if L > 1 and "triton" in impls:  # L launches of the kernel: what the one-launch write replaces
                t = time_fn(lambda: [pk.paged_kv_write(k[i], v[i], kc2[i], vc2[i], slots, backend="triton")
                                     for i in range(L)], bench)
                bench.row(impl="triton-layer-loop", layers=L, tokens=T, timing=t, bytes=nbytes)
    bench.finish(["impl", "layers", "tokens", "median_ms", "GB/s"])


if __name__ == "__main__":
    main()
