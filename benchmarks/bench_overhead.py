"""Benchmark: host time per op call (issue "speed that can be seen without a GPU", section 1).

What a call of a public ``pd_kernels`` op costs on the host *beyond the kernel launch itself*: argument
checks, backend choice, dispatch, the launcher's own Python (strides, grid, tile choices). The innermost
launch is replaced by a no-op stub, so the figure is the package's overhead alone:

* ``triton`` - every ``@triton.jit`` kernel of ``pd_kernels.ops.triton.*`` replaced by a stub whose
  ``kernel[grid](...)`` does nothing (Triton's own launcher cost, tens of microseconds in Python, is not
  ours and is measured separately on a GPU as ``launch=real``);
* ``cuda``   - the C++ op ``torch.ops.pd_kernels.<op>_cuda`` replaced by a Python no-op (the C++ binding
  and its launch are excluded); on a machine without CUDA the backend check is bypassed for this;
* ``torch``  - the reference backend runs for real (its time *is* the work): compare with ``ref``, the
  reference function called directly.

Paths: ``public`` (the public function: what users and the decoder call), ``registered`` (the same
arguments through ``torch.ops.pd_kernels.<op>``, the path ``torch.compile`` and dispatch modes take, and
the only path before the eager fast path existed). Baselines: a plain ``index_copy_`` and a bare mutating
``torch.library.custom_op`` with 8 arguments.

Timing: ``--calls`` back-to-back calls, repeated ``--reps`` times; medians per call of the wall clock
(``host_us``, ``time.perf_counter``) and of the calling thread's CPU time (``cpu_us``,
``time.thread_time``: insensitive to other processes competing for the cores, so it is the figure to
compare on a busy machine). These are CPU figures and valid as such: host overhead is paid by the CPU of a
GPU machine in the same way (expect a similar order there).

    python benchmarks/bench_overhead.py --out benchmarks/results/overhead_cpu.json
    python benchmarks/bench_overhead.py --smoke
    python benchmarks/bench_overhead.py --ops commit_spans     # one op (the baselines always run)
"""
from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pd_kernels as pk  # noqa: E402
from benchmarks._harness import Bench, Timing, parser  # noqa: E402
from pd_kernels import _backend  # noqa: E402

TRITON_MODULES = ("kv_cache", "span_attention", "unmask")


class _StubKernel:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kw)`` does nothing."""

    def __getitem__(self, grid):
        return _noop

    def run(self, *a, **k):
        return None


def _noop(*a, **k):
    return None


@contextlib.contextmanager
def stub_launches(backend: str, cuda_ops=("paged_kv_write_cuda", "token_confidence_cuda", "commit_spans_cuda")):
    """Replace the innermost launch of ``backend`` by a no-op for the duration of the block."""
    saved = []
    if backend == "triton":
        for name in TRITON_MODULES:
            mod = importlib.import_module(f"pd_kernels.ops.triton.{name}")
            for attr in dir(mod):
                if attr.startswith("_") and attr.endswith("_kernel"):
                    saved.append((mod, attr, getattr(mod, attr)))
                    setattr(mod, attr, _StubKernel())
    elif backend == "cuda":
        ns = torch.ops.pd_kernels
        for op in cuda_ops:
            setattr(ns, op, _noop)
        saved.append((_backend, "_cuda_problem", _backend._cuda_problem))
        _backend._cuda_problem = lambda device: None
    try:
        yield
    finally:
        for mod, attr, val in saved:
            setattr(mod, attr, val)
        if backend == "cuda":
            for op in cuda_ops:
                with contextlib.suppress(AttributeError):
                    delattr(torch.ops.pd_kernels, op)


def host_us(fn, calls: int, reps: int) -> tuple[Timing, float]:
    """Median wall milliseconds per call over ``reps`` batches of ``calls`` back-to-back calls (a
    :class:`Timing`, like every other benchmark) and the median thread-CPU microseconds per call."""
    for _ in range(max(10, calls // 10)):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        c1, t1 = time.thread_time(), time.perf_counter()
        wall.append((t1 - t0) / calls * 1e3)
        cpu.append((c1 - c0) / calls * 1e6)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall.sort()
    t = Timing(statistics.median(wall), wall[len(wall) // 5], wall[min(len(wall) - 1, 4 * len(wall) // 5)], reps)
    return t, statistics.median(cpu)


# ---- the decoder's per-step calls at tiny sizes: the op work is negligible, the host cost is not ----------
def make_cases(device):
    """(op name, public call(backend), registered call(backend), reference call or None) per op."""
    g = torch.Generator().manual_seed(0)
    dt = torch.float16 if device.type == "cuda" else torch.float32
    T, Hkv, Hq, D, ps, P = 8, 2, 4, 64, 16, 8
    k = torch.randn(T, Hkv, D, generator=g).to(device, dt)
    v = torch.randn(T, Hkv, D, generator=g).to(device, dt)
    kc = torch.zeros(P, ps, Hkv, D, device=device, dtype=dt)
    vc = torch.zeros_like(kc)
    slots = torch.arange(T, device=device)

    q = torch.randn(T, Hq, D, generator=g).to(device, dt)
    layout = pk.SpanLayout.build([pk.SeqQueries.spans(40, [4, 4])], device)
    bt = torch.arange(P, dtype=torch.int32, device=device)[None]
    out = torch.empty_like(q)

    N, V = 8, 1024
    logits = torch.randn(N, V, generator=g).to(device, dt)
    tok = torch.empty(N, dtype=torch.int64, device=device)
    conf = torch.empty(N, dtype=torch.float32, device=device)
    sup = torch.tensor([5], dtype=torch.int64, device=device)

    tokens = torch.full((64,), 7, dtype=torch.int64, device=device)
    row_dst = torch.arange(N, dtype=torch.int64, device=device)
    span_rows = torch.tensor([[0, 4], [4, 4]], dtype=torch.int32, device=device)
    state = pk.SpanState.new(2, device)
    state.reset([0, 1], [4, 4], [4, 4])
    committed = torch.empty(2, dtype=torch.int32, device=device)
    done = torch.empty(1, dtype=torch.bool, device=device)

    from pd_kernels.reference.kv_cache import paged_kv_write_ref
    from pd_kernels.reference.unmask import token_confidence_ref

    ops = torch.ops.pd_kernels
    cases = [
        ("paged_kv_write",
         lambda b: pk.paged_kv_write(k, v, kc, vc, slots, backend=b),
         lambda b: ops.paged_kv_write(k, v, kc, vc, slots, b),
         lambda: paged_kv_write_ref(k, v, kc, vc, slots)),
        ("span_attention",
         lambda b: pk.span_attention(q, kc, vc, bt, layout, out=out, backend=b),
         None, None),
        ("token_confidence",
         lambda b: pk.token_confidence(logits, suppress_ids=sup, out=(tok, conf), backend=b),
         lambda b: ops.token_confidence(logits, tok, conf, sup, None, None, None, 0, 0, "prob", 0.0, b),
         lambda: token_confidence_ref(logits, "prob", 0.0, 0, 0, sup)),
        ("commit_spans",
         lambda b: pk.commit_spans(tok, conf, row_dst, span_rows, tokens, state, policy="threshold",
                                   mask_id=7, out=(committed, done), backend=b),
         lambda b: ops.commit_spans(tok, conf, row_dst, span_rows, tokens, state.masks_left, state.step,
                                    state.num_steps, state.deferred, state.arrivals, committed, done, "threshold",
                                    0.9, 7, b),
         None),
    ]
    return cases


def baselines(device):
    x = torch.zeros(64, 16, device=device)
    idx = torch.arange(8, device=device)
    src = torch.ones(8, 16, device=device)

    @torch.library.custom_op("pd_bench::bare8", mutates_args=("a",))
    def bare8(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: int, f: int, g: float,
              h: str) -> None:
        return None

    return [("index_copy_", lambda: x.index_copy_(0, idx, src)),
            ("bare custom_op (8 args)", lambda: torch.ops.pd_bench.bare8(x, idx, src, x, 1, 2, 0.5, "s"))]


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="back-to-back calls per timed batch")
    p.add_argument("--ops", default="", help="comma-separated op names to time (default: every op)")
    args = p.parse_args(argv)
    if args.smoke:
        args.calls, args.reps = 50, 3
    reps = min(args.reps, 11)
    bench = Bench("overhead", args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["torch", "triton", "cuda"]
    def row(timing, **fields):
        t, cpu = timing
        bench.row(timing=t, host_us=round(t.median_ms * 1e3, 2), cpu_us=round(cpu, 2), **fields)

    for name, fn in baselines(device):
        row(host_us(fn, args.calls, reps), impl=name, op="-", backend="-", path="baseline", launch="real")
    only = set(filter(None, args.ops.split(",")))
    for op, public, registered, ref in make_cases(device):
        if only and op not in only:
            continue
        if ref is not None:
            row(host_us(ref, args.calls, reps), impl="ref", op=op, backend="torch", path="reference fn",
                launch="real")
        for b in backends:
            if b not in _backend.implemented_backends(op):
                continue
            stubbed = b != "torch"
            for path, fn in (("public", public), ("registered", registered)):
                if fn is None:
                    continue
                ctx = stub_launches(b) if stubbed else contextlib.nullcontext()
                try:
                    with ctx:
                        t = host_us(lambda: fn(b), args.calls, reps)
                except Exception as e:  # a backend that cannot run here: say why, keep going
                    bench.row(impl=b, op=op, backend=b, path=path, launch="stub" if stubbed else "real", timing=None,
                              error=f"{type(e).__name__}: {str(e)[:80]}")
                    continue
                row(t, impl=b, op=op, backend=b, path=path, launch="stub" if stubbed else "real")
            if device.type == "cuda" and b != "torch":
                # the real launch on a GPU: host time per call, no sync inside the batch
                try:
                    row(host_us(lambda: public(b), args.calls, reps), impl=b, op=op, backend=b, path="public",
                        launch="real")
                except Exception as e:
                    bench.row(impl=b, op=op, backend=b, path="public", launch="real", timing=None,
                              error=f"{type(e).__name__}: {str(e)[:80]}")
    bench.finish(["op", "backend", "path", "launch", "host_us", "cpu_us", "impl"])


if __name__ == "__main__":
    main()
