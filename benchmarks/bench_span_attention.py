"""span_attention: Triton block-sparse paged kernel vs FlexAttention vs dense-mask SDPA vs unmasked SDPA, and the
tiling plans of decode-shaped steps.

Implementations, same queries, same keys, same visibility (SPEC section 4), one process:

* ``triton``    - :func:`pd_kernels.span_attention` on the paged cache (layout prebuilt, not timed);
* ``flex``      - ``torch.compile(flex_attention)`` over the step's sequences packed into one batch row
                  (keys gathered dense once, untimed: flex has no paged cache), ``mask_mod`` from the layout;
                  its ``create_block_mask`` time is reported as ``mask_build_ms`` (timed separately).
                  Dynamo is reset before every point and its recompile limits are raised, with hitting one
                  made an error (``strict_dynamo``): flex never silently falls back to eager (unfused) flex;
                  ``flex_compiled`` in each row says whether a compiled frame ran (``flex-eager`` on CPU);
* ``sdpa-mask`` - what the reference PD code does: per sequence padded batch, a dense bool mask, K/V
                  repeated to Hq heads (``repeat_kv``, inside the timing), ``F.scaled_dot_product_attention``;
* ``sdpa-nomask`` - SDPA without a mask over the same padded tokens (all the work, best dense kernel).

TFLOP/s counts only visible query-key pairs: ``4 * D * Hq * sum(mask)``. ``layout_build_ms`` is
``SpanLayout.build`` + its tiling plan (host numpy + two copies), to compare with ``mask_build_ms``.
Summary lines give triton vs flex and vs sdpa-mask speedups and the PD / PD-DA time ratio.

Plans (``part = "plan"`` rows, no timing): what :mod:`pd_kernels.layout` plans for decode-shaped steps and a few
span / prefill steps, in the Dream-7B geometry (Hq 28, Hkv 4, D 128, G 7):

* ``dynamic``: a :class:`~pd_kernels.SpanLayout` of the step: narrow / wide units, CTAs launched
  (units x Hkv, plus merge programs), split-K workspace bytes;
* ``static``: the :class:`~pd_kernels.StaticSpanLayout` the decoder builds for the step's bucket (queries
  rounded up to 16, 32, ...; ``max_seqs`` = batch; ``max_segments`` = 16 per sequence; ``max_kv`` = the
  context): CTAs launched per layer (table capacities x Hkv; programs past the step's count exit at once),
  CTAs with work, workspace bytes.

These are counts, valid on any machine (the plan does not depend on the device): ``--what plans`` runs them
alone, without a GPU. ``keys/CTA``: most keys one decode CTA reads.

    python benchmarks/bench_span_attention.py --quick --out benchmarks/results/attention_h100_quick.json
    python benchmarks/bench_span_attention.py --out benchmarks/results/attention_h100.json     # full sweep
    python benchmarks/bench_span_attention.py --what plans --out benchmarks/results/attention_plan.json  # any machine
    python benchmarks/bench_span_attention.py --smoke          # CPU: checks the script only (interpreter)
    python benchmarks/bench_span_attention.py --quick --cases 'S8x80 P2048|^decode B8 ctx4096'   # some points only
"""
from __future__ import annotations

import itertools
import math
import os
import re
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any @triton.jit runs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pd_kernels as pk  # noqa: E402
from benchmarks._harness import Bench, parser, time_fn, time_host  # noqa: E402
from pd_kernels._checks import cdiv  # noqa: E402
from pd_kernels.layout import SPLIT_BLOCK_N, UNIT_J0, UNIT_J1  # noqa: E402

# SPEC section 8 workload: median 2 spans, mean 3.1, p90 6; ~81 tokens a span; prompts tens to hundreds
FULL = dict(spans=[1, 2, 4, 8, 16], span_len=[32, 80, 160], prefix=[128, 512, 2048], batch=[1, 8])
QUICK = dict(spans=[2, 8], span_len=[80], prefix=[512, 2048], batch=[1, 8])
SMOKE = dict(spans=[2], span_len=[5, 17], prefix=[9], batch=[1, 2])
BUCKETS = tuple(16 << i for i in range(8))
PLAN_COLUMNS = ["case", "impl", "units_narrow", "units_wide", "merge", "ctas", "busy_ctas", "keys_per_cta",
                "workspace_bytes"]


def strict_dynamo(recompile_limit: int = 64) -> dict:
    """Make ``torch.compile`` peers trustworthy in a sweep: raise dynamo's recompile limits (every new shape
    of a point is a recompile) and make hitting them an error instead of a silent fall-back to eager.
    Returns the settings applied (attribute names differ across torch versions; missing ones are skipped)."""
    import torch._dynamo.config as c

    done = {}
    for names, value in ((("recompile_limit", "cache_size_limit"), recompile_limit),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 16 * recompile_limit),
                         (("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"), True)):
        for n in names:
            if hasattr(c, n):
                setattr(c, n, value)
                done[n] = value
                break
    return done


def dynamo_compiled_frames() -> int:
    """Frames dynamo compiled so far in this process (``torch._dynamo.utils.counters['frames']['ok']``):
    compare before and after a call to know whether a ``torch.compile``'d function really ran compiled."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def make_inputs(seqs, Hq, Hkv, D, page_size, dtype, dev, gen):
    """Layout, q, a paged cache holding every sequence (pages interleaved across sequences), block table."""
    layout = pk.SpanLayout.build(seqs, dev)
    lens = [_seq_len(s) for s in seqs]
    pages_per = [cdiv(n, page_size) for n in lens]
    P = sum(pages_per) + 1
    perm = torch.randperm(P, generator=gen)
    bt = torch.zeros(len(seqs), max(pages_per), dtype=torch.int32)
    i = 0
    for b, n in enumerate(pages_per):
        bt[b, :n] = perm[i:i + n].to(torch.int32)
        i += n
    kc = torch.randn(P, page_size, Hkv, D, generator=gen).to(dtype).to(dev)
    vc = torch.randn(P, page_size, Hkv, D, generator=gen).to(dtype).to(dev)
    q = torch.randn(layout.num_queries, Hq, D, generator=gen).to(dtype).to(dev)
    return layout, q, kc, vc, bt.to(dev), lens


def _seq_len(s: pk.SeqQueries) -> int:
    return s.start + s.length if s.kind == "causal" else s.prefix + sum(s.span_lens)


def dense_kv(cache, bt, lens):
    """Per-sequence dense keys, padded: [B, Hkv, Lmax, D] (untimed setup for the dense peers)."""
    B, Lmax = len(lens), max(lens)
    ps = cache.shape[1]
    out = cache.new_zeros(B, Lmax, cache.shape[2], cache.shape[3])
    for b, n in enumerate(lens):
        pos = torch.arange(n, device=cache.device)
        out[b, :n] = cache[bt[b].long()[pos // ps], pos % ps]
    return out.transpose(1, 2).contiguous()


def padded_queries(layout, q, lens):
    """[B, Hq, Tmax, D] queries and the [B, 1, Tmax, Lmax] bool mask (padding rows see key 0: no NaN)."""
    seq = layout.q_seq.long().cpu()
    B = layout.num_seqs
    counts = torch.bincount(seq[seq >= 0], minlength=B)
    Tmax = max(int(counts.max()), 1)
    Lmax = max(lens)
    qp = q.new_zeros(B, Tmax, q.shape[1], q.shape[2])
    mask = torch.zeros(B, 1, Tmax, Lmax, dtype=torch.bool, device=q.device)
    dm = layout.to_dense_mask()
    row = 0
    for b in range(B):
        n = int(counts[b])
        qp[b, :n] = q[row:row + n]
        mask[b, 0, :n, :dm.shape[1]] = dm[row:row + n, :Lmax]
        mask[b, 0, n:, 0] = True
        row += n
    return qp.transpose(1, 2).contiguous(), mask


def sdpa_reference_style(qp, kd, vd, mask, G):
    """The reference PD code's attention: repeat_kv (materialised) + dense bool mask + SDPA."""
    k = kd.repeat_interleave(G, dim=1)
    v = vd.repeat_interleave(G, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(qp, k, v, attn_mask=mask)


def flex_setup(layout, lens, kd, vd, compiled):
    """Packed flex inputs: all sequences' keys concatenated in one row; mask_mod from the layout tensors."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = kd.device
    B, Hkv, _, D = kd.shape
    kv_seq = torch.cat([torch.full((n,), b, dtype=torch.int32, device=dev) for b, n in enumerate(lens)])
    kv_pos = torch.cat([torch.arange(n, dtype=torch.int32, device=dev) for n in lens])
    k = torch.cat([kd[b, :, :n] for b, n in enumerate(lens)], dim=1)[None]
    v = torch.cat([vd[b, :, :n] for b, n in enumerate(lens)], dim=1)[None]
    q_seq, qa, qb, qc = layout.q_seq, layout.q_kv[:, 0].contiguous(), layout.q_kv[:, 1].contiguous(), \
        layout.q_kv[:, 2].contiguous()

    def mask_mod(b, h, qi, kv):
        p = kv_pos[kv]
        return (q_seq[qi] == kv_seq[kv]) & ((p < qa[qi]) | ((p >= qb[qi]) & (p < qc[qi])))

    cbm = torch.compile(create_block_mask) if compiled and dev.type == "cuda" else create_block_mask
    build = lambda: cbm(mask_mod, None, None, layout.num_queries, k.shape[2], device=dev)  # noqa: E731
    fa = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return build, fa, k, v


def run_point(bench, label, seqs, cfg, args, gen):
    Hq, Hkv, D, dtype, dev = cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["dtype"], bench.device
    G = Hq // Hkv
    layout, q, kc, vc, bt, lens = make_inputs(seqs, Hq, Hkv, D, args.page_size, dtype, dev, gen)
    pairs = int(layout.to_dense_mask().sum())
    flops = 4.0 * D * Hq * pairs
    timed = lambda f: time_fn(f, bench)  # noqa: E731
    base = dict(part="time", case=label, Tq=layout.num_queries, keys=sum(lens), pairs=pairs)

    # layout build + its tiling plan (host + two copies), as the decoder pays it each step
    def build_layout():
        lay = pk.SpanLayout.build(seqs, dev)
        lay.plan(G)
        return lay
    t_layout = time_host(build_layout, bench, reps=min(args.reps, 20), inner=1)   # host work + copy
    out = torch.empty_like(q)
    t = timed(lambda: pk.span_attention(q, kc, vc, bt, layout, out=out, backend="triton"))
    bench.row(impl="triton", timing=t, flops=flops, layout_build_ms=round(t_layout.median_ms, 4), **base)

    kd, vd = dense_kv(kc, bt, lens), dense_kv(vc, bt, lens)
    if not args.no_flex:
        compiled = not args.smoke
        try:
            if compiled:  # a fresh dynamo state per point: no recompile limit is ever reached across the sweep
                torch._dynamo.reset()
            build, fa, k, v = flex_setup(layout, lens, kd, vd, compiled=compiled)
            bm = build()
            qf = q.transpose(0, 1)[None]
            frames = dynamo_compiled_frames()
            fa(qf, k, v, block_mask=bm, enable_gqa=True)
            ran_compiled = compiled and dynamo_compiled_frames() > frames   # a compiled frame, not eager flex
            if compiled and not ran_compiled:
                raise RuntimeError("torch.compile(flex_attention) compiled no frame: it would run eager flex")
            t_mask = time_host(build, bench, reps=min(args.reps, 10), inner=1)
            t = timed(lambda: fa(qf, k, v, block_mask=bm, enable_gqa=True))
            bench.row(impl="flex" if compiled else "flex-eager", timing=t, flops=flops,
                      mask_build_ms=round(t_mask.median_ms, 4), flex_compiled=ran_compiled, **base)
        except Exception as e:  # keep the sweep going; the error is in the JSON
            bench.row(impl="flex" if compiled else "flex-eager", timing=None, flex_compiled=False,
                      error=f"{type(e).__name__}: {str(e)[:200]}", **base)
    qp, mask = padded_queries(layout, q, lens)
    t = timed(lambda: sdpa_reference_style(qp, kd, vd, mask, G))
    bench.row(impl="sdpa-mask", timing=t, flops=flops, **base)
    kr, vr = kd.repeat_interleave(G, dim=1), vd.repeat_interleave(G, dim=1)
    t = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qp, kr, vr))
    bench.row(impl="sdpa-nomask", timing=t, flops=flops, **base)


def cases(grid, smoke):
    """(label, seqs) points: span rounds in PD and PD-DA, plus decode and prefill shapes."""
    out = []
    for S, Ls, Pf, B, mode in itertools.product(grid["spans"], grid["span_len"], grid["prefix"], grid["batch"],
                                                ("pd", "pd-da")):
        out.append((f"{mode} B{B} S{S}x{Ls} P{Pf}", [pk.SeqQueries.spans(Pf, [Ls] * S, mode=mode)] * B))
    for B, ctx in ([(1, 40), (2, 70)] if smoke else [(1, 512), (1, 4096), (8, 512), (8, 4096), (64, 1024)]):
        out.append((f"decode B{B} ctx{ctx}", [pk.SeqQueries.causal(ctx - 1, 1)] * B))
    for B, n in ([(1, 30)] if smoke else [(1, 512), (1, 2048), (8, 512)]):
        out.append((f"prefill B{B} n{n}", [pk.SeqQueries.causal(0, n)] * B))
    return out


# ---- tiling plans (counts, no timing) ------------------------------------------------------------------------
def _ctas(plan, hkv: int, bound: bool) -> int:
    n = plan.narrow.max_units if bound else plan.num_units[0]
    w = plan.wide.max_units if bound else plan.num_units[1]
    m = plan.narrow.max_merge if bound else plan.num_merge
    return (n + w + m) * hkv


def plan_point(bench, label, seqs, batch, ctx, G=7, hkv=4, D=128):
    """Rows ``dynamic`` and ``static Q<bucket>`` of one step shape (see the module docstring)."""
    dyn = pk.SpanLayout.build(seqs, "cpu")
    p = dyn.plan(G)
    units = p.narrow.units[1:1 + p.num_units[0]]
    keys = int(((units[:, UNIT_J1] - units[:, UNIT_J0]).max() * SPLIT_BLOCK_N)) if len(units) else 0
    base = dict(part="plan", case=label, batch=batch, ctx=ctx, keys_per_cta=keys)
    bench.row(impl="dynamic", timing=None, units_narrow=p.num_units[0], units_wide=p.num_units[1],
              merge=p.num_merge, ctas=_ctas(p, hkv, False), busy_ctas=_ctas(p, hkv, False),
              workspace_bytes=p.workspace_bytes(hkv, D) if p.num_slots else 0, **base)
    Q = next((b for b in BUCKETS if b >= dyn.num_queries), None)
    if Q is None:
        return
    st = pk.StaticSpanLayout(Q, len(seqs), "cpu", group=G, max_segments=16 * len(seqs), max_kv=ctx).update(seqs)
    sp = st.plan(G)
    bench.row(impl=f"static Q{Q}", timing=None, units_narrow=sp.num_units[0], units_wide=sp.num_units[1],
              merge=sp.num_merge, ctas=_ctas(sp, hkv, True), busy_ctas=_ctas(sp, hkv, False),
              workspace_bytes=sp.workspace_bytes(hkv, D), **base)


def plans(bench) -> None:
    """Decode steps at batch 1 to 64 and 512 / 4096 keys, span rounds, a prefill."""
    for batch in (1, 8, 32, 64):
        for ctx in (512, 4096):
            plan_point(bench, f"decode B{batch} ctx{ctx}", [pk.SeqQueries.causal(ctx - 1, 1)] * batch, batch, ctx)
    for batch, prefix in ((1, 512), (1, 2048), (8, 2048)):
        plan_point(bench, f"pd B{batch} 2x80 P{prefix}", [pk.SeqQueries.spans(prefix, [80, 80])] * batch, batch,
                   prefix + 160)
    plan_point(bench, "prefill B1 n512", [pk.SeqQueries.causal(0, 512)], 1, 512)
    print(bench.table(PLAN_COLUMNS, rows=[r for r in bench.rows if r.get("part") == "plan"], only=True))


def summarize(bench):
    rows = [r for r in bench.rows if r.get("median_ms") is not None]
    by = {(r["case"], r["impl"]): r for r in rows}
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        tr = by.get((case, "triton"))
        if tr is None:
            continue
        parts = [f"{case}: triton {tr['median_ms']:.4g} ms"]
        for peer in ("flex", "flex-eager", "sdpa-mask", "sdpa-nomask"):
            p = by.get((case, peer))
            if p:
                parts.append(f"{p['median_ms'] / tr['median_ms']:.2f}x vs {peer}")
        if case.startswith("pd "):
            da = by.get((case.replace("pd ", "pd-da ", 1), "triton"))
            if da:
                parts.append(f"PD/PD-DA time {tr['median_ms'] / da['median_ms']:.2f}")
        lines.append(", ".join(parts))
    print("\n".join(lines))
    speedups = [by[(c, "flex")]["median_ms"] / by[(c, "triton")]["median_ms"]
                for c in dict.fromkeys(r["case"] for r in rows) if (c, "flex") in by and (c, "triton") in by]
    if speedups:
        g = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        print(f"triton vs compiled flex: geomean {g:.2f}x, min {min(speedups):.2f}x over {len(speedups)} points")


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small subset of the sweep (for a GPU session)")
    p.add_argument("--what", default="plans,time", help="parts to run: plans (counts, any machine), time")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (long compiles)")
    p.add_argument("--cases", default="", help="regex: only the timed points of the grid whose label matches, "
                   "e.g. '^decode B8 ctx4096$' (ignored with --smoke, whose tiny grid always runs)")
    args = p.parse_args(argv)
    what = set(args.what.split(","))
    if "time" in what and not (args.smoke or torch.cuda.is_available()):
        raise SystemExit("timing span_attention needs a CUDA GPU (use --smoke, or --what plans, on CPU)")
    bench = Bench("span_attention", args)
    t0 = time.perf_counter()
    if "plans" in what:
        plans(bench)
    if "time" in what:
        bench.meta["dynamo"] = strict_dynamo()
        gen = torch.Generator().manual_seed(0)
        if args.smoke:
            cfg, grid = dict(Hq=4, Hkv=1, D=64, dtype=torch.float32), SMOKE
        else:
            cfg, grid = dict(Hq=28, Hkv=4, D=128, dtype=torch.bfloat16), QUICK if args.quick else FULL
        points = [(label, seqs) for label, seqs in cases(grid, args.smoke)
                  if args.smoke or not args.cases or re.search(args.cases, label)]
        if not points:
            raise SystemExit(f"--cases {args.cases!r} matches no point of the grid")
        for label, seqs in points:
            run_point(bench, label, seqs, cfg, args, gen)
    bench.finish(["part", "case", "impl", "median_ms", "TFLOP/s", "Tq", "keys", "pairs", "layout_build_ms",
                  "mask_build_ms", "flex_compiled", "error"], only=True)
    summarize(bench)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
