"""Every kernel of every backend once, at small sizes, through the public ops: the program that
``compute-sanitizer`` (memcheck, racecheck, initcheck) runs in ``benchmarks/gpu_check.sh``.

Each case runs an op on each kernel backend (``triton``, ``cuda``) and on ``torch`` (the reference, same device,
same inputs) and compares: caches and token buffers exactly, tokens exactly, attention outputs and confidences
within a tolerance. The cases reach every kernel: the paged KV write (all layers in one launch, one layer, a
``-1`` slot, fp32 keys into a 16-bit cache), span attention (narrow tiles with split keys + the merge kernel,
wide tiles, PD spans and PD-DA rounds, a causal prefill), the row pass (every confidence kind, greedy and
sampled, split rows + their merge, a top-k floor, rows that start unaligned), and the span commit
(every policy, a span longer than one pass-A tile). On a GPU the geometry is the benchmarks' (Dream-7B heads,
bf16, V = 152064), so the Triton kernels come from the compile cache the earlier phases filled; outputs are
poisoned (NaN / a sentinel) before each call.

Without a GPU (``gpu_check.sh --dry-run``) it runs the torch and Triton backends on the CPU, the Triton kernels
in the interpreter, at tiny sizes, in fp32.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_driver.py
    python benchmarks/sanitizer_driver.py --backends triton --cases attention    # one part

Exit status: 0 when every case matched, 1 when one did not (or raised).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any @triton.jit runs
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pd_kernels as pk  # noqa: E402
from pd_kernels import SeqQueries, SpanLayout, SpanState  # noqa: E402
from pd_kernels._checks import cdiv  # noqa: E402

MASK = 151666
CASES = ("kv_write", "attention", "token_confidence", "commit_spans")


class Ctx:
    def __init__(self, device: str, dtype: torch.dtype, tiny: bool, backends: list[str], seed: int = 0):
        self.device, self.dtype, self.tiny, self.backends = device, dtype, tiny, backends
        self.gen = torch.Generator().manual_seed(seed)
        self.results: list[tuple[str, str, str]] = []   # (case, backend, "ok" | error)

    def randn(self, *shape, dtype=None):
        return torch.randn(*shape, generator=self.gen).to(self.device, dtype or self.dtype)

    def check(self, case: str, backend: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            fn()
            msg = "ok"
        except Exception as e:  # reported, and the run goes on: one failure must not hide the others
            msg = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.results.append((case, backend, msg))
        print(f"{'ok  ' if msg == 'ok' else 'FAIL'} {case:44s} {backend:7s} {time.perf_counter() - t0:6.2f} s"
              + ("" if msg == "ok" else f"  {msg[:300]}"), flush=True)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float) -> None:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        raise AssertionError(f"{what}: NaN pattern differs")
    fin = ~torch.isnan(b)
    err = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
    scale = b[fin].abs().max().item() if fin.any() else 1.0
    if err > tol * max(1.0, scale):
        raise AssertionError(f"{what}: max abs error {err:.3g} (tolerance {tol:g} x {max(1.0, scale):.3g})")


def _equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not torch.equal(a.cpu(), b.cpu()):
        bad = (a.cpu() != b.cpu()).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: differs at {bad}")


# ---- paged KV write ----------------------------------------------------------------------------------------
def kv_write(cx: Ctx) -> None:
    L, T, Hkv, D, page, P = (2, 13, 2, 32, 4, 8) if cx.tiny else (4, 300, 4, 128, 16, 48)
    gen = cx.gen
    pages = torch.randperm(P, generator=gen)[: cdiv(T, page)]
    pos = torch.arange(T)
    slots = pages[pos // page] * page + pos % page
    slots[T // 3] = -1                                       # padding: writes nothing
    slots = slots.to(cx.device)
    k, v = cx.randn(L, T, Hkv, D), cx.randn(L, T, Hkv, D)
    k32 = cx.randn(T, Hkv, D, dtype=torch.float32)            # fp32 keys into a 16-bit cache: the cast path
    base_k, base_v = cx.randn(L, P, page, Hkv, D), cx.randn(L, P, page, Hkv, D)
    want = None
    for b in ["torch"] + cx.backends:
        if b == "triton" and cx.device == "cpu" and cx.dtype is torch.bfloat16:
            continue
        kc, vc = base_k.clone(), base_v.clone()

        def run():
            pk.paged_kv_write(k, v, kc, vc, slots, backend=b)                 # all layers, one launch
            pk.paged_kv_write(k32, k32, kc[1], vc[1], slots, backend=b)       # one layer, cast on write
        if b == "torch":
            run()
            want = (kc, vc)
            continue
        cx.check("paged_kv_write (all layers; one layer, fp32 in)", b,
                 lambda: (run(), _equal(kc, want[0], "k_cache"), _equal(vc, want[1], "v_cache")))


# ---- span attention ----------------------------------------------------------------------------------------
def _attention_inputs(cx: Ctx, seqs, Hq, Hkv, D, page):
    lens = [s.start + s.length if s.kind == "causal" else s.prefix + sum(s.span_lens) for s in seqs]
    per = [cdiv(n, page) for n in lens]
    P = sum(per) + 2
    perm = torch.randperm(P, generator=cx.gen)
    bt = torch.zeros(len(seqs), max(per), dtype=torch.int32)
    i = 0
    for b, n in enumerate(per):
        bt[b, :n] = perm[i:i + n].to(torch.int32)
        i += n
    layout = SpanLayout.build(seqs, cx.device)
    return layout, cx.randn(layout.num_queries, Hq, D), cx.randn(P, page, Hkv, D), cx.randn(P, page, Hkv, D), \
        bt.to(cx.device)


def attention(cx: Ctx) -> None:
    if cx.tiny:
        Hq, Hkv, D, page = 4, 2, 32, 8
        steps = {"pd spans + decode (narrow, split)": [SeqQueries.spans(20, [5, 9]), SeqQueries.causal(300, 1)],
                 "pd-da round + prefill (wide)": [SeqQueries.spans(12, [7, 4], mode="pd-da"),
                                                  SeqQueries.causal(0, 40)]}
    else:   # Dream-7B heads (G = 7), as bench_attention: the same compiled kernels
        Hq, Hkv, D, page = 28, 4, 128, 16
        steps = {"pd spans + decode (narrow, split)": [SeqQueries.spans(300, [80, 33]), SeqQueries.causal(4095, 1),
                                                       SeqQueries.causal(700, 1)],
                 "pd-da round + prefill (wide)": [SeqQueries.spans(200, [80, 80, 17], mode="pd-da"),
                                                  SeqQueries.causal(0, 300)]}
    tol = 1e-4 if cx.dtype is torch.float32 else 2e-2
    for name, seqs in steps.items():
        layout, q, kc, vc, bt = _attention_inputs(cx, seqs, Hq, Hkv, D, page)
        want = pk.span_attention(q, kc, vc, bt, layout, backend="torch")
        for b in cx.backends:
            if b == "cuda":
                continue   # no CUDA kernel for attention (torch, triton)
            out = torch.full_like(q, float("nan"))
            cx.check(f"span_attention {name}", b,
                     lambda: (pk.span_attention(q, kc, vc, bt, layout, out=out, backend=b),
                              _close(out, want, "attention output", tol)))


# ---- token choice ------------------------------------------------------------------------------------------
def token_confidence(cx: Ctx) -> None:
    V = 301 if cx.tiny else 152064
    shapes = {"rows": (5, V), "split rows (few rows, long V)": (2, 4 * V if not cx.tiny else 3000)}
    # every kind, greedy and sampled, a top-k floor: each flag of the row kernel at least once per shape
    variants = (("prob", 0.0, {}), ("prob", 0.7, {"seed": 3, "offset": 11}), ("margin", 0.0, {}),
                ("neg_entropy", 0.7, {"seed": 4}), ("prob", 0.7, {"top_k": 20, "seed": 5}))
    sup = torch.tensor([7, min(MASK, V - 1)], device=cx.device)
    for label, (N, Vs) in shapes.items():
        x = (cx.randn(N, Vs + 1, dtype=torch.float32) * 4).to(cx.dtype)[:, 1:]   # rows start unaligned
        for kind, T, extra in variants:
            kw = dict(confidence=kind, temperature=T, suppress_ids=sup, **extra)
            tw, cw = pk.token_confidence(x, backend="torch", **kw)
            for b in cx.backends:
                tok = torch.full((N,), -(2**31) + 7, dtype=torch.int64, device=cx.device)
                conf = torch.full((N,), float("nan"), device=cx.device)
                what = f"token_confidence {label} {kind} T={T:g}{' top_k' if 'top_k' in extra else ''}"
                cx.check(what, b, lambda: (pk.token_confidence(x, out=(tok, conf), backend=b, **kw),
                                           _equal(tok, tw, "tokens"), _close(conf, cw, "confidence", 1e-4)))


# ---- span commit -------------------------------------------------------------------------------------------
def _commit_step(cx: Ctx, lens):
    """A token buffer with one MASK run per span (tags around them) and one row per mask position (shuffled
    within the span), spans under shuffled ids plus one id without rows; random tokens and confidences."""
    gen = cx.gen
    S = len(lens) + 1
    sid = torch.randperm(S, generator=gen).tolist()
    buf, rows_dst, span_rows = [], [], [[0, 0] for _ in range(S)]
    for k, L in enumerate(lens):
        buf.append(3)
        start = len(buf)
        buf += [MASK] * L
        buf.append(4)
        span_rows[sid[k]] = [len(rows_dst), L]
        rows_dst += (start + torch.randperm(L, generator=gen)).tolist()
    N = len(rows_dst)
    tokens = torch.tensor(buf, dtype=torch.int64)
    tok = torch.randint(0, 1000, (N,), generator=gen)
    tok[torch.rand(N, generator=gen) < 0.05] = -1
    conf = torch.rand(N, generator=gen)
    conf = torch.where(torch.rand(N, generator=gen) < 0.3, (conf * 4).round() / 4, conf)   # ties
    dev = cx.device
    return (tok.to(dev), conf.to(dev), torch.tensor(rows_dst, dtype=torch.int64, device=dev),
            torch.tensor(span_rows, dtype=torch.int32, device=dev), tokens.to(dev), sid[:len(lens)], S)


def commit_spans(cx: Ctx) -> None:
    lens = [5, 37, 130] if cx.tiny else [80, 33, 700]     # 700 rows: more than one 512-row pass-A tile (CUDA)
    tok, conf, row_dst, span_rows, tokens0, sid, S = _commit_step(cx, lens)

    def state():
        st = SpanState.new(S, cx.device)
        st.reset(sid, lens, [4] * len(lens))
        return st
    for policy in ("threshold", "schedule", "pd_threshold"):
        tw, stw = tokens0.clone(), state()
        cw, dw = pk.commit_spans(tok, conf, row_dst, span_rows, tw, stw, policy=policy, tau=0.8, mask_id=MASK,
                                 backend="torch")
        for b in cx.backends:
            tb, stb = tokens0.clone(), state()
            committed = torch.full((S,), -(2**31) + 7, dtype=torch.int32, device=cx.device)
            done = torch.ones(1, dtype=torch.bool, device=cx.device)

            def run():
                pk.commit_spans(tok, conf, row_dst, span_rows, tb, stb, policy=policy, tau=0.8, mask_id=MASK,
                                out=(committed, done), backend=b)
                _equal(tb, tw, "tokens")
                _equal(committed, cw, "committed")
                _equal(done, dw, "all_done")
                for f in ("masks_left", "step", "num_steps", "deferred"):
                    _equal(getattr(stb, f), getattr(stw, f), f"state.{f}")
                assert int(stb.arrivals.item()) == 0, "arrival counter not back to 0"
            cx.check(f"commit_spans {policy} (spans {lens})", b, run)


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=None,
                   help="kernel backends, comma-separated (default: triton,cuda on a GPU, triton on CPU)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="default bf16 on a GPU, fp32 on CPU (the interpreter's bf16 math is wrong)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the default without a GPU)")
    a = p.parse_args(argv)
    backends = (a.backends or ("triton,cuda" if gpu else "triton")).split(",")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype or ("bf16" if gpu else "fp32")]
    cx = Ctx("cuda" if gpu else "cpu", dtype, a.tiny or not gpu, backends)
    if not gpu:
        torch.set_num_threads(1)
    print(f"sanitizer driver: device {cx.device}, {dtype}, backends {backends}, "
          f"{'tiny' if cx.tiny else 'benchmark'} sizes", flush=True)
    t0 = time.perf_counter()
    for name in a.cases.split(","):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}: choose from {CASES}")
        globals()[name](cx)
    if gpu:
        torch.cuda.synchronize()
    bad = [r for r in cx.results if r[2] != "ok"]
    print(f"sanitizer driver: {len(cx.results) - len(bad)} / {len(cx.results)} ok in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if bad or not cx.results else 0


if __name__ == "__main__":
    sys.exit(main())
