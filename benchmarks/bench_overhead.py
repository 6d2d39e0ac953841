"""Benchmark: host time per op call, and the decoder's own host time per step (issue 14, section 1).

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

Timing (``torch.utils.benchmark.Timer``): ``--calls`` back-to-back calls, repeated ``--reps`` times; medians per
call of the wall clock (``host_us``, ``time.perf_counter``) and of the calling thread's CPU time (``cpu_us``,
``time.thread_time``: insensitive to other processes competing for the cores, so it is the figure to
compare on a busy machine). These are CPU figures and valid as such: host overhead is paid by the CPU of a
GPU machine in the same way (expect a similar order there).

Decoder rows (``op = decoder step``): the thread-CPU time per step that :class:`pd_kernels.Decoder` spends
outside the step's device work (describing and packing the step, the layout update, the read, the bookkeeping):
on a GPU with CUDA graphs this time adds to every step, because each step ends with a device-to-host read. See
:func:`decoder_host_time` for the columns. The ``model_ms`` column is the tiny model's eager step on this CPU.

    python benchmarks/bench_overhead.py --out benchmarks/results/overhead_cpu.json
    python benchmarks/bench_overhead.py --what decoder --out benchmarks/results/decoder_host_cpu.json
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
from benchmarks._harness import Bench, Timing, parser, time_host  # noqa: E402
from pd_kernels import _backend  # noqa: E402

TRITON_MODULES = ("paged_kv_write", "span_attention", "token_confidence", "commit_spans")


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


def host_us(fn, calls: int, reps: int, bench) -> tuple[Timing, float]:
    """Wall milliseconds per call over ``reps`` samples of ``calls`` back-to-back calls (a :class:`Timing`, like
    every other benchmark; the clock is not synchronised with a GPU: issue time) and the median thread-CPU
    microseconds per call, both with ``torch.utils.benchmark.Timer`` (:func:`time_host`)."""
    wall = time_host(fn, bench, reps=reps, inner=calls, timer=time.perf_counter)
    cpu = time_host(fn, bench, reps=reps, inner=calls, timer=time.thread_time)
    return wall, cpu.median_ms * 1e3


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

    from pd_kernels.reference.paged_kv_write import paged_kv_write_ref
    from pd_kernels.reference.token_confidence import token_confidence_ref

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


# ---- the decoder's own host time per step (issue 14 section 1) -------------------------------------------------
def decoder_host_time(batch: int, *, spans: int, span_len: int, rounds: int, prompt_len: int, reps: int,
                      backend: str = "torch") -> dict:
    """Thread-CPU time per step of :class:`pd_kernels.Decoder` *outside* the step's device work (static step),
    on the tiny model with forced plans (``spans`` spans of ``span_len`` tokens per round, ``rounds`` rounds,
    ``batch`` requests admitted together).

    The step's device work is ``Decoder._static_body`` (what a CUDA graph replays). Two figures:

    * ``host_us`` (the robust one): the device work is replaced by its recorded result (the read buffer and
      token buffer of the same step of a real run, copied into place), so the loop runs only its own host
      code, with the CPU caches as warm as on a GPU machine's host; the tokens are checked to equal the real
      run's. The figure is the median over ``reps`` replayed ``generate`` calls of the mean per step;
    * ``live_us``: a real run, every step's thread time minus its body's (the model's CPU work in between
      evicts the host code's caches: an upper bound).

    ``reused_us`` / ``rebuilt_us``: medians (replay) of the steps that reused the previous step description (a
    diffusion step in which no request changed state) and of those that rebuilt it (AR tokens, a span or round
    ending, admission); ``reused_frac``: the share of reused steps; ``loop_us``: the rest of ``generate`` per
    step (admission, results); ``model_ms``: the device work per step on this CPU (the eager model step the
    host time competes with on a GPU)."""
    from pd_kernels.decoder import DecodeConfig, Decoder, make_plan
    from pd_kernels.models import TINY_TAGS, tiny_model

    scale = 8
    n = max(1, span_len // scale)
    model = tiny_model(seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(30, 200, (prompt_len + 3 * i,), generator=g).tolist() for i in range(batch)]
    plan = [make_plan(TINY_TAGS, [n] * spans, topic_tokens=[[100 + k, 101 + k] for k in range(spans)],
                      terminator="sync" if r < rounds - 1 else "eos") for r in range(rounds)]
    budget = rounds * (spans * (n * scale + 2) + 8 * spans + 4)
    cfg = DecodeConfig(mode="pd", tags=TINY_TAGS, length_scale=scale, max_new_tokens=budget)
    dec = Decoder(model, cfg, max_batch=batch, static_step=True, backend=backend)
    body, step = dec._static_body, dec._step
    rec = {"body": 0.0, "steps": [], "reads": [], "replay": None}

    def live_body(bk):
        c0 = time.thread_time()
        body(bk)
        rec["body"] += time.thread_time() - c0
        rec["reads"].append((bk.read.clone(), dec.tokens_flat.clone()))

    def replay_body(bk):   # the device work's result: the read buffer and the token buffer it wrote
        read, tokens = next(rec["replay"])
        bk.read.copy_(read)
        dec.tokens_flat.copy_(tokens)

    def gen():
        return getattr(getattr(dec, "_desc", None), "gen", None)

    def timed_step():
        gen0 = gen()
        b0, c0 = rec["body"], time.thread_time()
        step()
        c1 = time.thread_time()
        rec["steps"].append((c1 - c0 - (rec["body"] - b0), gen0 is not None and gen() == gen0, rec["body"] - b0))

    dec._static_body, dec._step = live_body, timed_step
    dec.generate(prompts, [plan] * batch)   # warm-up: buckets, layouts
    rec["steps"].clear(), rec["reads"].clear()
    t0 = time.thread_time()
    ref = [r.sequence for r in dec.generate(prompts, [plan] * batch)]
    live_total = time.thread_time() - t0
    live = list(rec["steps"])
    reads = list(rec["reads"])
    # replay: the same steps with the device work replaced by its recorded read
    dec._static_body = replay_body
    rec["steps"].clear()
    total, means = 0.0, []
    for _ in range(reps):
        rec["replay"] = iter(reads)
        k = len(rec["steps"])
        t0 = time.thread_time()
        out = dec.generate(prompts, [plan] * batch)
        total += time.thread_time() - t0
        means.append(sum(h for h, _, _ in rec["steps"][k:]) / (len(rec["steps"]) - k))
        assert [r.sequence for r in out] == ref, "replayed reads must reproduce the live run"
    st = rec["steps"]
    med = lambda xs: round(statistics.median(xs) * 1e6, 1) if xs else None  # noqa: E731
    return {"batch": batch, "steps": len(live), "host_us": med(means),
            "reused_us": med([h for h, reused, _ in st if reused]),
            "rebuilt_us": med([h for h, reused, _ in st if not reused]),
            "reused_frac": round(sum(r for _, r, _ in st) / len(st), 3),
            "loop_us": round((total - sum(h for h, _, _ in st)) / len(st) * 1e6, 1),
            "live_us": round(sum(h for h, _, _ in live) / len(live) * 1e6, 1),
            "model_ms": round(sum(b for _, _, b in live) / len(live) * 1e3, 3)}


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="back-to-back calls per timed batch")
    p.add_argument("--ops", default="", help="comma-separated op names to time (default: every op)")
    p.add_argument("--what", default="ops,decoder", help="sections to run: ops, decoder")
    p.add_argument("--dec-batches", default="1,8", help="decoder rows: batch sizes")
    p.add_argument("--dec-spans", type=int, default=3, help="decoder rows: spans per round")
    p.add_argument("--dec-span-len", type=int, default=32, help="decoder rows: tokens per span")
    p.add_argument("--dec-rounds", type=int, default=2)
    p.add_argument("--dec-prompt-len", type=int, default=24)
    p.add_argument("--dec-reps", type=int, default=20, help="decoder rows: replayed generate calls")
    args = p.parse_args(argv)
    if args.smoke:
        args.calls, args.reps = 50, 3
        args.dec_batches, args.dec_span_len, args.dec_reps, args.dec_prompt_len = "1,2", 8, 2, 6
    reps = min(args.reps, 11)
    bench = Bench("overhead", args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["torch", "triton", "cuda"]
    def row(timing, **fields):
        t, cpu = timing
        bench.row(timing=t, host_us=round(t.median_ms * 1e3, 2), cpu_us=round(cpu, 2), **fields)

    what = set(args.what.split(","))
    if "decoder" in what:
        for b in (int(x) for x in args.dec_batches.split(",")):
            d = decoder_host_time(b, spans=args.dec_spans, span_len=args.dec_span_len, rounds=args.dec_rounds,
                                  prompt_len=args.dec_prompt_len, reps=args.dec_reps)
            bench.row(impl="decoder", timing=None, op="decoder step (static, tiny)", backend="torch",
                      path=f"batch {b}", launch="-", host_us=d["host_us"], cpu_us=d["host_us"],
                      **{k: v for k, v in d.items() if k != "host_us"})
            bench.rows[-1].pop("error", None)
    if "ops" not in what:
        bench.finish(["op", "path", "host_us", "reused_us", "rebuilt_us", "reused_frac", "loop_us", "live_us",
                      "model_ms", "steps"])
        return
    for name, fn in baselines(device):
        row(host_us(fn, args.calls, reps, bench), impl=name, op="-", backend="-", path="baseline", launch="real")
    only = set(filter(None, args.ops.split(",")))
    for op, public, registered, ref in make_cases(device):
        if only and op not in only:
            continue
        if ref is not None:
            row(host_us(ref, args.calls, reps, bench), impl="ref", op=op, backend="torch", path="reference fn",
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
                        t = host_us(lambda: fn(b), args.calls, reps, bench)
                except Exception as e:  # a backend that cannot run here: say why, keep going
                    bench.row(impl=b, op=op, backend=b, path=path, launch="stub" if stubbed else "real", timing=None,
                              error=f"{type(e).__name__}: {str(e)[:80]}")
                    continue
                row(t, impl=b, op=op, backend=b, path=path, launch="stub" if stubbed else "real")
            if device.type == "cuda" and b != "torch":
                # the real launch on a GPU: host time per call, no sync inside the batch
                try:
                    row(host_us(lambda: public(b), args.calls, reps, bench), impl=b, op=op, backend=b, path="public",
                        launch="real")
                except Exception as e:
                    bench.row(impl=b, op=op, backend=b, path="public", launch="real", timing=None,
                              error=f"{type(e).__name__}: {str(e)[:80]}")
    bench.finish(["op", "backend", "path", "launch", "host_us", "cpu_us", "impl"])


if __name__ == "__main__":
    main()
