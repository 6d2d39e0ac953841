"""Kernel micro-benchmarks for pytest-benchmark: ``pytest benchmarks/ --benchmark-only [--bench-quick]``.

Every public op, every backend that can run here, on the shapes of the decode step (Dream-7B geometry on a
GPU; tiny shapes in the Triton interpreter on a CPU, where the numbers only show the benchmarks run).

How a call is timed (once, by pytest-benchmark alone): its ``pedantic`` mode runs ``inner`` back-to-back calls
per round and divides by ``inner``; the last call of each round synchronises the device, so a round's time is
that of ``inner`` calls plus one sync (host clock, the library's own timer). The GB/s or TFLOP/s of its median
per-call time, from the same counted bytes / flops as the op's ``bench_<op>.py``, are stored in ``extra_info``
and written by ``--benchmark-json``. Device-side timing against peers is the ``bench_<op>.py`` scripts' job
(``benchmarks/_harness.py``); nothing here times an op a second way. Each benchmark also checks that what it
timed wrote the right output.
"""
import os

import pytest
import torch

import pd_kernels as pk
from pd_kernels._checks import cdiv

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
QUICK = os.environ.get("PD_BENCH_QUICK") == "1"
BACKENDS = ("torch", "triton", "cuda")


def _backend_or_skip(op, backend):
    try:
        pk._backend.resolve(op, backend, torch.device(DEV))
    except pk.BackendUnavailable as e:
        pytest.skip(f"{backend}: {e}")


def _run(benchmark, fn, nbytes=None, flops=None, inner=None):
    """Time ``fn`` with pytest-benchmark (``inner`` calls + one sync per round); GB/s / TFLOP/s in extra_info."""
    fn()
    if GPU:
        torch.cuda.synchronize()
    inner = inner or (20 if GPU else 1)
    count = [0]

    def target():
        fn()
        count[0] += 1
        if GPU and count[0] % inner == 0:
            torch.cuda.synchronize()

    benchmark.pedantic(target, rounds=10 if GPU else 2, iterations=inner, warmup_rounds=1 if GPU else 0)
    stats = getattr(benchmark, "stats", None)   # None with --benchmark-disable
    sec = stats.stats.median if stats is not None else 0.0
    if sec > 0 and nbytes:
        benchmark.extra_info["GB/s"] = round(nbytes / sec / 1e9, 2)
    if sec > 0 and flops:
        benchmark.extra_info["TFLOP/s"] = round(flops / sec / 1e12, 3)


# ---- paged_kv_write ------------------------------------------------------------------------------------
KV = ([(28, 256), (28, 4096)] if QUICK else [(1, 256), (28, 64), (28, 256), (28, 4096)]) if GPU else [(2, 33)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers,tokens", KV, ids=[f"L{a}-T{b}" for a, b in KV])
def test_paged_kv_write(benchmark, backend, layers, tokens):
    _backend_or_skip("paged_kv_write", backend)
    H, D, ps = (4, 128, 16) if GPU else (2, 64, 16)
    dtype = torch.bfloat16 if GPU else torch.float16
    g = torch.Generator().manual_seed(tokens)
    pages = cdiv(tokens, ps)
    perm = torch.randperm(2 * pages, generator=g)[:pages]
    pos = torch.arange(tokens)
    slots = (perm[pos // ps] * ps + pos % ps).to(DEV)
    k = torch.randn(layers, tokens, H, D, generator=g).to(DEV, dtype)
    v = torch.randn_like(k)
    kc = torch.zeros(layers, 2 * pages, ps, H, D, device=DEV, dtype=dtype)
    vc = torch.zeros_like(kc)
    nbytes = 4 * k.numel() * k.element_size() + 8 * tokens
    _run(benchmark, lambda: pk.paged_kv_write(k, v, kc, vc, slots, backend=backend), nbytes=nbytes)
    assert torch.equal(kc.view(layers, -1, H, D)[:, slots], k)   # what was timed wrote the right slots


# ---- span_attention ------------------------------------------------------------------------------------
def _attn_cases():
    if not GPU:
        return [("pd-S2x5-P9", [pk.SeqQueries.spans(9, [5, 5], mode="pd")])]
    c = [("pd-B1-S2x80-P512", [pk.SeqQueries.spans(512, [80, 80], mode="pd")]),
         ("decode-B8-ctx4096", [pk.SeqQueries.causal(4095, 1)] * 8)]
    if not QUICK:
        c += [("pd-da-B1-S2x80-P512", [pk.SeqQueries.spans(512, [80, 80], mode="pd-da")]),
              ("pd-B8-S8x80-P512", [pk.SeqQueries.spans(512, [80] * 8, mode="pd")] * 8),
              ("prefill-B1-n2048", [pk.SeqQueries.causal(0, 2048)])]
    return c


ATTN = _attn_cases()


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("case", ATTN, ids=[c[0] for c in ATTN])
def test_span_attention(benchmark, backend, case):
    _backend_or_skip("span_attention", backend)
    _, seqs = case
    Hq, Hkv, D, dtype = (28, 4, 128, torch.bfloat16) if GPU else (4, 1, 64, torch.float32)
    ps = 16
    layout = pk.SpanLayout.build(seqs, DEV)
    lens = [s.start + s.length if s.kind == "causal" else s.prefix + sum(s.span_lens) for s in seqs]
    per = [cdiv(n, ps) for n in lens]
    g = torch.Generator().manual_seed(len(lens))
    perm = torch.randperm(sum(per), generator=g).to(torch.int32)
    bt = torch.zeros(len(seqs), max(per), dtype=torch.int32)
    i = 0
    for b, n in enumerate(per):
        bt[b, :n] = perm[i:i + n]
        i += n
    kc = torch.randn(sum(per), ps, Hkv, D, generator=g).to(DEV, dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(layout.num_queries, Hq, D, generator=g).to(DEV, dtype)
    out = torch.empty_like(q)
    pairs = int(layout.to_dense_mask().sum())
    _run(benchmark, lambda: pk.span_attention(q, kc, vc, bt.to(DEV), layout, out=out, backend=backend),
         flops=4.0 * D * Hq * pairs)
    assert torch.isfinite(out).all()


# ---- token_confidence ----------------------------------------------------------------------------------
TC = ([32, 256] if QUICK else [8, 32, 256, 1024]) if GPU else [3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", TC, ids=[f"N{n}" for n in TC])
def test_token_confidence(benchmark, backend, rows):
    _backend_or_skip("token_confidence", backend)
    V, dtype = (152064, torch.bfloat16) if GPU else (1000, torch.float32)
    logits = torch.randn(rows, V, generator=torch.Generator().manual_seed(rows)).to(DEV, dtype)
    tok = torch.empty(rows, dtype=torch.int64, device=DEV)
    conf = torch.empty(rows, dtype=torch.float32, device=DEV)
    _run(benchmark, lambda: pk.token_confidence(logits, out=(tok, conf), backend=backend),
         nbytes=logits.numel() * logits.element_size())
    assert torch.equal(tok, logits.float().argmax(-1))
