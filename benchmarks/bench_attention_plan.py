"""span_attention tiling plans per step shape: work units, CTAs, split-K workspace (no timing).

What :mod:`pd_kernels.layout` plans for decode-shaped steps and a few span / prefill steps, in the Dream-7B
geometry (Hq 28, Hkv 4, D 128, G 7) unless ``--group`` / ``--kv-heads`` / ``--head-dim`` say otherwise:

* ``dynamic``: a :class:`~pd_kernels.SpanLayout` of the step: narrow / wide units, CTAs launched
  (units x Hkv, plus merge programs), split-K workspace bytes;
* ``static``: the :class:`~pd_kernels.StaticSpanLayout` the decoder builds for the step's bucket (queries
  rounded up to 16, 32, ...; ``max_seqs`` = batch; ``max_segments`` = 16 per sequence; ``max_kv`` = the
  context): CTAs launched per layer (table capacities x Hkv; programs past the step's count exit at once),
  CTAs with work, workspace bytes.

These are counts, valid on any machine (the plan does not depend on the device), so this script has no
``--smoke`` distinction. ``keys/CTA``: most keys one decode CTA reads.

    python benchmarks/bench_attention_plan.py --out benchmarks/results/attention_plan.json
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pd_kernels as pk  # noqa: E402
from benchmarks._harness import Bench, parser  # noqa: E402
from pd_kernels.layout import SPLIT_BLOCK_N, UNIT_J0, UNIT_J1  # noqa: E402

BUCKETS = tuple(16 << i for i in range(8))


def _ctas(plan, hkv: int, bound: bool) -> int:
    n = plan.narrow.max_units if bound else plan.num_units[0]
    w = plan.wide.max_units if bound else plan.num_units[1]
    m = plan.narrow.max_merge if bound else plan.num_merge
    return (n + w + m) * hkv


def point(bench, label, seqs, batch, ctx, G, hkv, D):
    dyn = pk.SpanLayout.build(seqs, "cpu")
    p = dyn.plan(G)
    units = p.narrow.units[1:1 + p.num_units[0]]
    keys = int(((units[:, UNIT_J1] - units[:, UNIT_J0]).max() * SPLIT_BLOCK_N)) if len(units) else 0
    bench.row(impl="dynamic", timing=None, case=label, batch=batch, ctx=ctx, units_narrow=p.num_units[0],
              units_wide=p.num_units[1], merge=p.num_merge, ctas=_ctas(p, hkv, False), busy_ctas=_ctas(p, hkv, False),
              keys_per_cta=keys, workspace_bytes=p.workspace_bytes(hkv, D) if p.num_slots else 0)
    nq = dyn.num_queries
    Q = next((b for b in BUCKETS if b >= nq), None)
    if Q is None:
        return
    st = pk.StaticSpanLayout(Q, len(seqs), "cpu", group=G, max_segments=16 * len(seqs), max_kv=ctx).update(seqs)
    sp = st.plan(G)
    bench.row(impl=f"static Q{Q}", timing=None, case=label, batch=batch, ctx=ctx, units_narrow=sp.num_units[0],
              units_wide=sp.num_units[1], merge=sp.num_merge, ctas=_ctas(sp, hkv, True),
              busy_ctas=_ctas(sp, hkv, False), keys_per_cta=keys, workspace_bytes=sp.workspace_bytes(hkv, D))


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--group", type=int, default=7)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)
    bench = Bench("attention_plan", args)
    G, hkv, D = args.group, args.kv_heads, args.head_dim
    for batch in (1, 8, 32, 64):
        for ctx in (512, 4096):
            point(bench, f"decode B{batch} ctx{ctx}", [pk.SeqQueries.causal(ctx - 1, 1)] * batch, batch, ctx, G, hkv, D)
    for batch, prefix in ((1, 512), (1, 2048), (8, 2048)):
        seqs = [pk.SeqQueries.spans(prefix, [80, 80])] * batch
        point(bench, f"pd B{batch} 2x80 P{prefix}", seqs, batch, prefix + 160, G, hkv, D)
    point(bench, "prefill B1 n512", [pk.SeqQueries.causal(0, 512)], 1, 512, G, hkv, D)
    bench.finish(["case", "impl", "units_narrow", "units_wide", "merge", "ctas", "busy_ctas", "keys_per_cta",
                  "workspace_bytes"])


if __name__ == "__main__":
    main()
