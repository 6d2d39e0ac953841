"""token_confidence: the row pass (token + confidence per row), and with commit_spans one diffusion step (SPEC
section 5).

Implementations, same inputs, same process:

* ``reference`` - the PD reference's torch sequence: fp32 softmax over the vocab, ``max``, then a Python
  loop over spans with ``topk`` and host syncs (``.item()``);
* ``compiled``  - ``torch.compile`` of the same row math (the span loop stays Python: it syncs);
* ``triton`` / ``cuda`` - ``pd_kernels.token_confidence`` + ``pd_kernels.commit_spans`` (no host sync).

Columns: ``rows`` = time of the row pass only (token + confidence, with the decoder's one suppressed id,
MASK), ``step`` = row pass + commit.
GB/s counts one read of the logits (N x V x element size). ``copy_GB/s`` is a device-to-device copy of
the same logits tensor (read + write bytes), the bandwidth ceiling; ``floor_us`` = logit bytes at that
bandwidth.

    python benchmarks/bench_token_confidence.py             # GPU: V 152064, bf16, N in {8, 32, 128, 256, 1024}
    python benchmarks/bench_token_confidence.py --smoke     # CPU: tiny shapes, checks the script runs
    python benchmarks/bench_token_confidence.py --N 256 --impls triton --triton-configs 4096x8,2048x8  # tiling
    python benchmarks/bench_token_confidence.py --N 256 --impls triton,cuda --temperature 0.2 --confidence neg_entropy

Sampling (``--temperature`` > 0) costs what greedy does where most of a row lies more than about 23 below
the best key in units of z / T (the noise is computed only where it can win): peaked rows, low
temperatures. ``--logit-scale`` sets the spread of the random logits (default 4; at T = 1 most of such a
row stays within reach, the slow case).
"""
from __future__ import annotations

import math
import os
import sys

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pd_kernels  # noqa: E402
from benchmarks._harness import Bench, parser, time_fn, time_graph  # noqa: E402
from pd_kernels import SpanState  # noqa: E402

MASK = 151666
SPAN_LEN = 80  # SPEC section 8: about 81 tokens per span


def make_step(N: int, V: int, dtype, device, seed: int = 0, scale: float = 4.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(device=device, dtype=dtype)
    S = max(1, math.ceil(N / SPAN_LEN))
    seq = torch.full((N + 2 * S + 16,), MASK, dtype=torch.int64, device=device)
    row_dst = torch.arange(N, dtype=torch.int64, device=device) + 16
    lens = [min(SPAN_LEN, N - j * SPAN_LEN) for j in range(S)]
    span_rows = torch.tensor([[j * SPAN_LEN, L] for j, L in enumerate(lens)], dtype=torch.int32, device=device)
    state = SpanState.new(S, device)
    state.reset(list(range(S)), lens, [max(1, L // 4) for L in lens])
    return logits, seq, row_dst, span_rows, state, lens


def reference_rows(logits):
    probs = torch.softmax(logits.float(), dim=-1)
    conf, x0 = probs.max(dim=-1)
    return x0, conf


def reference_step(rows_fn, logits, seq, row_dst, rows_by_span, steps, k):
    """The PD reference's per-span loop (block_unmask): topk by confidence per span, host syncs."""
    x0, conf = rows_fn(logits)
    for j, rows in enumerate(rows_by_span):
        masked = seq[row_dst[rows]] == MASK
        m = int(masked.sum().item())
        if m == 0:
            continue
        ratio = 1.0 if k >= steps - 1 else 0.999 / (steps - 0.999 * k)
        n = min(m, max(1, int(m * ratio)))
        c = torch.where(masked, conf[rows], torch.full_like(conf[rows], float("-inf")))
        idx = torch.topk(c, n).indices
        seq[row_dst[rows][idx]] = x0[rows][idx]


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--V", type=int, default=152064)
    p.add_argument("--N", type=str, default="8,32,128,256,1024")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--impls", default="reference,compiled,triton,cuda")
    p.add_argument("--policy", default="schedule", choices=["threshold", "schedule", "pd_threshold"])
    p.add_argument("--graph", action="store_true", help="time triton/cuda inside a CUDA graph (no launch overhead)")
    p.add_argument("--triton-configs", default="",
                   help="extra Triton row-pass rows, comma-separated BLOCK_VxWARPS (e.g. 4096x8,2048x8,8192x8)")
    p.add_argument("--confidence", default="prob", choices=["prob", "margin", "neg_entropy"])
    p.add_argument("--temperature", type=float, default=0.0, help="row pass: 0 = greedy, > 0 = sampling")
    p.add_argument("--logit-scale", type=float, default=4.0, help="std of the random logits")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    Ns = [int(x) for x in args.N.split(",")]
    V = args.V
    impls = args.impls.split(",")
    if args.smoke:
        V, Ns = 1000, [3, 8]
        dtype = torch.float32 if not gpu else dtype  # bf16 math is wrong in the interpreter
        if not gpu:
            impls = [i for i in impls if i not in ("cuda", "compiled")]  # no GPU; compile is slow on CPU
    configs = [tuple(int(v) for v in c.split("x")) for c in args.triton_configs.split(",") if c]
    impls = impls + [f"triton[{bv}x{nw}]" for bv, nw in configs]
    bench = Bench("token_confidence", args)
    compiled_rows = torch.compile(reference_rows, dynamic=False) if "compiled" in impls else None

    for N in Ns:
        logits, seq0, row_dst, span_rows, state0, lens = make_step(N, V, dtype, device, scale=args.logit_scale)
        sup = torch.tensor([MASK if MASK < V else V - 1], dtype=torch.int64, device=device)
        tc_kw = dict(confidence=args.confidence, temperature=args.temperature, seed=1, suppress_ids=sup)
        nbytes = logits.numel() * logits.element_size()
        copy_dst = torch.empty_like(logits)
        t_copy = time_fn(lambda: copy_dst.copy_(logits), bench)
        copy_bw = 2 * nbytes / (t_copy.median_ms * 1e-3) / 1e9
        floor_us = nbytes / (copy_bw * 1e9) * 1e6
        rows_by_span = [torch.arange(j * SPAN_LEN, j * SPAN_LEN + L, device=device) for j, L in enumerate(lens)]
        steps = max(1, max(lens) // 4)
        shape = f"N={N} V={V} {str(dtype).replace('torch.', '')} {args.confidence} T={args.temperature:g}"
        seq = seq0.clone()
        state = state0.clone()

        def restore():
            seq.copy_(seq0)
            state.masks_left.copy_(state0.masks_left)
            state.step.copy_(state0.step)
            state.deferred.copy_(state0.deferred)

        for impl in impls:
            try:
                if impl in ("reference", "compiled"):
                    fn_rows = reference_rows if impl == "reference" else compiled_rows
                    rows_fn = lambda: fn_rows(logits)  # noqa: E731
                    step_fn = lambda: reference_step(fn_rows, logits, seq, row_dst, rows_by_span, steps, 0)  # noqa: E731
                elif impl.startswith("triton["):  # row pass only, with a forced BLOCK_V x num_warps
                    from pd_kernels.ops.triton.token_confidence import token_confidence_triton

                    bv, nw = (int(v) for v in impl[7:-1].split("x"))
                    tok = torch.empty(N, dtype=torch.int64, device=device)
                    conf = torch.empty(N, dtype=torch.float32, device=device)
                    def rows_fn():
                        token_confidence_triton(logits, tok, conf, sup, None, None, None, 1, 0, args.confidence,
                                                args.temperature, block_v=bv, num_warps=nw)
                    step_fn = None
                else:
                    if impl == "cuda" and not gpu:
                        raise RuntimeError("no GPU")
                    tok = torch.empty(N, dtype=torch.int64, device=device)
                    conf = torch.empty(N, dtype=torch.float32, device=device)
                    committed = torch.empty(state.num_spans, dtype=torch.int32, device=device)
                    done = torch.empty(1, dtype=torch.bool, device=device)
                    rows_fn = lambda: pd_kernels.token_confidence(logits, out=(tok, conf), backend=impl,  # noqa: E731
                                                                  **tc_kw)

                    def step_fn():
                        pd_kernels.token_confidence(logits, out=(tok, conf), backend=impl, **tc_kw)
                        pd_kernels.commit_spans(tok, conf, row_dst, span_rows, seq, state, policy=args.policy,
                                                out=(committed, done), backend=impl)
                timer = time_graph if (args.graph and impl in ("triton", "cuda") and gpu) else time_fn
                t_rows = timer(rows_fn, bench)
                restore()
                bench.row(impl=impl, shape=shape, part="rows", timing=t_rows, bytes=nbytes,
                          **{"copy_GB/s": round(copy_bw, 1), "floor_us": round(floor_us, 2),
                             "pct_copy_bw": round(100 * nbytes / (t_rows.median_ms * 1e-3) / 1e9 / copy_bw, 1)})
                if step_fn is not None:
                    t_step = time_fn(step_fn, bench, setup=restore)
                    bench.row(impl=impl, shape=shape, part="step", timing=t_step, bytes=nbytes)
            except Exception as e:  # a missing backend is reported, not fatal
                bench.row(impl=impl, shape=shape, part="-", timing=None, error=f"{type(e).__name__}: {e}"[:120])
    bench.finish(["impl", "shape", "part", "median_ms", "GB/s", "pct_copy_bw", "floor_us", "copy_GB/s"])


if __name__ == "__main__":
    main()
