"""End-to-end critical-path suite: AR vs PD vs PD-DA vs diffusion, the reference-style loop, the floor, knob sweeps.

One run, one model, one seeded SPEC section 8 workload (``benchmarks/workload.py``: forced plans give random
weights the step structure of the released PD model), every mode on the same requests:

* ``ar``, ``pd``, ``pd-da``, ``diffusion`` with the dynamic step and with CUDA graphs (``+graphs``; on a
  machine without a GPU the same static step runs eagerly, ``+static``), at batch 1 (latency) and batch 8
  (throughput): critical path by phase, wall time per request (median, 20th/80th percentile over the
  requests), speedup against our own ``ar`` (ratio of summed wall times, same variant and batch), tokens/s;
* the **reference-style loop** (``benchmarks/reference_loop.py``: dense masks through SDPA over the whole
  sequence, pre-RoPE cache re-rotated every step, full-vocab softmax, Python loops and host reads), batch 1,
  same requests, timed the same way; its tokens are compared with ours (``tokens_match``), and our speedup
  over it is measured (``vs_reference``);
* the floor: weight bytes read per step (every parameter but the input embedding table) over the
  device-to-device copy bandwidth measured in this run (``copy`` row), as ``floor_ratio`` = ms per step /
  floor; ``roofline_ratio`` also counts the matmul work of multi-token steps at the bf16 matmul rate
  measured in this run (``matmul`` row): sum over forwards of max(weight read, 2 x params x tokens / rate);
  ``roofline_vs_ar`` is the speedup over ``ar`` those floors allow (the most any implementation could get);
* knob sweeps on ``pd`` (``--sweep on``): steps ratio 0.25-1.0 for ``schedule`` and ``pd_threshold``, tau
  0.5-0.95 for the two threshold policies (``--sweep short``: 5 of these settings): critical path and latency
  per setting.

Rows go to ``--out`` (JSON, with the environment, NVML samples, the workload parameters and statistics);
``--report`` writes a markdown summary and PNG plots (``benchmarks/report.py``; matplotlib, the ``bench``
extra). Random weights are never confident, so the threshold policies commit only their minimum there;
give ``--model PATH`` (a Dream/Qwen2 checkpoint) to sweep real confidences.

    python benchmarks/bench_decoder.py --quick --out /tmp/out/decoder_quick.json --report /tmp/out/decoder_quick
    python benchmarks/bench_decoder.py --out benchmarks/results/decoder_h200.json   # + decoder_h200.md / _*.png
    python benchmarks/bench_decoder.py --smoke                 # CPU: tiny model, checks the script only
    python benchmarks/bench_decoder.py --tp 1,2,4,8 --out /tmp/out/decoder_tp.json   # PD step vs TP size (GPUs)
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._harness import Bench, parser, spread, time_fn  # noqa: E402
from benchmarks.reference_loop import ReferenceLoop  # noqa: E402
from benchmarks.workload import WorkloadParams, diffusion_length, make_workload, summarize  # noqa: E402
from pd_kernels._checks import cdiv  # noqa: E402
from pd_kernels.decoder import MODES, POLICIES, ControlTags, DecodeConfig, Decoder  # noqa: E402
from pd_kernels.models import TINY_TAGS, dream_shaped_config, tiny_model  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SWEEP_RATIOS = (0.25, 0.5, 0.75, 1.0)
SWEEP_TAUS = (0.5, 0.7, 0.9, 0.95)


class Progress:
    """A progress line on stderr for long runs: rewritten in place on a terminal, else printed at most every
    ``every`` seconds (and at the end), with the elapsed time and an estimate of the time left."""

    def __init__(self, total: int, desc: str = "", every: float = 15.0, stream=None):
        self.total, self.desc, self.every = max(1, total), desc, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.t0 = self._last = time.perf_counter()

    def update(self, note: str = "", n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        now = time.perf_counter()
        if not self.tty and now - self._last < self.every and self.done < self.total:
            return
        self._last = now
        el = now - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else 0.0
        line = f"[{self.desc}] {self.done}/{self.total} {note} ({el:.0f}s, ~{eta:.0f}s left)"
        self.stream.write("\r" + line[:150].ljust(150) + ("\n" if self.done >= self.total else "") if self.tty
                          else line + "\n")
        self.stream.flush()


def build_parser():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="tiny | dream (random weights, Dream-7B shape) | a checkpoint "
                                                 "directory (default: dream on a GPU, tiny otherwise)")
    p.add_argument("--layers", type=int, default=28, help="layers of the Dream-shaped model (a cut of it)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 on a GPU, fp32 on CPU")
    p.add_argument("--requests", type=int, default=8, help="requests in the workload")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--modes", default="ar,pd,pd-da,diffusion")
    p.add_argument("--graphs", default="both", choices=["off", "on", "both"],
                   help="dynamic step, CUDA graphs (static step without a GPU), or both")
    p.add_argument("--peer-modes", default="ar,pd,pd-da", help="modes run by the reference-style loop ('' = none)")
    p.add_argument("--peer-top-p", type=float, default=None,
                   help="the reference scripts' top-p (0.95) in the peer: adds its sort, changes its tokens")
    p.add_argument("--steps-ratio", type=float, default=0.5,
                   help="r of the main comparison (SPEC workload: 0.5 gives a critical-path ratio of about "
                        "2.1x against AR, 1.0 about 1.2x, the paper's 155 steps about 0.42)")
    p.add_argument("--policy", default="schedule", choices=list(POLICIES))
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--confidence", default="prob", choices=["prob", "margin", "neg_entropy"])
    p.add_argument("--sweep", default="auto", choices=["auto", "short", "on", "off"],
                   help="knob sweeps: on = the full grid, short = 5 settings (auto: short with --quick / --smoke)")
    p.add_argument("--sweep-requests", type=int, default=4, help="requests per sweep setting")
    p.add_argument("--quick", action="store_true",
                   help="4 requests, ar/pd/pd-da (reference loop: ar/pd), batch 1, a short sweep on 2 requests "
                        "(a few minutes on an H200)")
    p.add_argument("--backend", default=None)
    p.add_argument("--report", default=None, help="write <REPORT>.md and <REPORT>_*.png (default: next to --out)")
    p.add_argument("--tp", default=None, metavar="SIZES",
                   help="instead of the suite, the tensor-parallel axis (benchmarks/tp_axis.py): PD step latency at "
                        "these TP sizes (e.g. 1,2,4,8; ranks on GPUs 0..N-1) as a ratio to TP 1; sizes beyond the "
                        "GPUs here are skipped with a message")
    p.add_argument("--tp-requests", type=int, default=2, help="workload requests decoded per TP size")
    return p


# ---- model and ceilings -------------------------------------------------------------------------------------
def load_model(args, device):
    dtype = DTYPES[args.dtype]
    if args.model == "tiny":
        return tiny_model(device=device, dtype=dtype), TINY_TAGS
    if args.model == "dream":
        from transformers import Qwen2ForCausalLM

        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(dream_shaped_config(args.layers))
        finally:
            torch.set_default_dtype(old)
        if next(model.parameters()).dtype != dtype:
            model = model.to(dtype)   # (built in dtype already: RoPE's fp32 inv_freq buffer is left as it is)
        return model.eval(), ControlTags()
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model must be tiny, dream or a checkpoint directory; {args.model!r} is none of them")
    from pd_kernels.integrations.dream import load_dream

    return load_dream(args.model, dtype=dtype, device=device), ControlTags()


def model_facts(model) -> dict:
    """Parameter counts and the bytes one forward pass must read (every weight but the input embedding,
    a gather of a few rows; an LM head tied to it is read in full)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    seen, total, read, body = set(), 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * p.element_size()
        total += n
        if p is not emb or p is head:
            read += n
        if p is not emb and p is not head:
            body += p.numel()
    c = model.config
    return {"class": type(model).__name__, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "vocab": c.vocab_size, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "param_bytes": total, "weight_bytes_per_step": read, "body_params": body,
            "head_params": head.numel()}


def ceilings(bench, device, dtype) -> dict:
    """Device-to-device copy bandwidth (read + write bytes) and dense matmul rate, measured now."""
    n = (1 << 30) if device == "cuda" else (32 << 20)
    src = torch.empty(n // 2, dtype=torch.bfloat16 if device == "cuda" else torch.float16, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), bench)
    bench.row(impl="copy", timing=t, bytes=2 * n, part="ceiling", shape=f"{n >> 20} MiB")
    bw = 2 * n / (t.median_ms * 1e-3)
    del src, dst
    m = 8192 if device == "cuda" else 256
    a = torch.randn(m, m, device=device, dtype=dtype if device == "cuda" else torch.float32)
    b = torch.randn_like(a)
    t = time_fn(lambda: a @ b, bench)
    bench.row(impl="matmul", timing=t, flops=2 * m ** 3, part="ceiling", shape=f"{m}^3 {a.dtype}".replace("torch.", ""))
    rate = 2 * m ** 3 / (t.median_ms * 1e-3)
    return {"copy_bytes_per_s": bw, "matmul_flops_per_s": rate}


def floors(forward_tokens: list, facts: dict, ceil: dict) -> tuple[float, float]:
    """(weight-read floor, roofline floor) in ms of a request's forwards."""
    w = facts["weight_bytes_per_step"] / ceil["copy_bytes_per_s"] * 1e3
    roof = 0.0
    for t in forward_tokens:
        rows = 1 if t == 1 else t
        fl = 2 * (facts["body_params"] * t + facts["head_params"] * rows)
        roof += max(w, fl / ceil["matmul_flops_per_s"] * 1e3)
    return w * len(forward_tokens), roof


class TokenCounter:
    """Counts the tokens of every forward pass of the model (a hook on the input embedding)."""

    def __init__(self, model):
        self.tokens: list[int] = []
        self.on = False
        self._h = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, mod, inp, out):
        if self.on:
            self.tokens.append(int(inp[0].numel()))

    def take(self) -> list:
        t, self.tokens = self.tokens, []
        return t


# ---- running ------------------------------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _phase_split(tokens: list, steps: dict) -> dict:
    """Forward token counts by phase for one batch-1 request (prefill first, then 1-token AR forwards)."""
    out = {"prefill": [], "plan": [], "diffusion": []}
    for i, t in enumerate(tokens):
        out["prefill" if i < steps["prefill"] else ("plan" if t == 1 else "diffusion")].append(t)
    return out


class Suite:
    def __init__(self, args, bench, model, tags, reqs, facts, ceil, device):
        self.args, self.bench, self.model, self.tags, self.reqs = args, bench, model, tags, reqs
        self.facts, self.ceil, self.device = facts, ceil, device
        self.D = diffusion_length(reqs)
        # one cache geometry for every group (graphs are reused): the longest prompt plus the most new tokens
        # of any request, so max_new_tokens = cap - (longest prompt of a group) never cuts a request short
        self.cap = (max(len(r.prompt) for r in reqs) + max(r.new_tokens(m, tags, self.D) for r in reqs for m in MODES)
                    + 8)
        self.counter = TokenCounter(model)
        self.results: dict = {}      # (impl, batch) -> per-request records
        self.progress = None

    def config(self, mode: str, prompt_len: int, **kw) -> DecodeConfig:
        a = self.args
        base = dict(mode=mode, tags=self.tags, steps_ratio=a.steps_ratio, policy=a.policy, tau=a.tau,
                    confidence=a.confidence, length_scale=self.bench.meta["workload"]["params"]["length_scale"],
                    max_rounds=16, diffusion_len=self.D, max_new_tokens=self.cap - prompt_len)
        base.update(kw)
        return DecodeConfig(**base)

    def _tick(self, note):
        if self.progress is not None:
            self.progress.update(note)

    def run_ours(self, mode: str, variant: str, batch: int, reqs=None, reps: int = 1, warmup: int = 1,
                 count_tokens: bool = False, **cfg_kw) -> list:
        """Per-request records of ``mode`` with ``variant`` ('' / 'graphs' / 'static') at ``batch``."""
        reqs = reqs or self.reqs
        kw = {"graphs": {"cuda_graphs": True}, "static": {"static_step": True}}.get(variant, {})
        dec = Decoder(self.model, self.config(mode, 0, **cfg_kw), max_batch=batch, backend=self.args.backend, **kw)
        groups = [reqs[i:i + batch] for i in range(0, len(reqs), batch)]
        recs = {r.idx: [] for r in reqs}
        for rep in range(warmup + reps):
            timed = rep >= warmup
            for gi, g in enumerate(groups):
                if not timed and gi and not variant:   # dynamic: one warm-up request compiles the kernels
                    continue
                dec.cfg = self.config(mode, max(len(r.prompt) for r in g), **cfg_kw)   # same cache geometry
                counting = self.counter.on = count_tokens and timed and batch == 1 and variant == ""
                _sync(self.device)
                t0 = time.perf_counter()
                res = dec.generate([r.prompt for r in g], [r.forced(mode, self.tags) for r in g])
                _sync(self.device)
                wall = time.perf_counter() - t0
                self.counter.on = False
                toks = self.counter.take()
                for r, out in zip(g, res):
                    # diffusion fills its whole canvas: "length" is its end unless the canvas holds an EOS
                    if out.stats.plan_errors or (out.finish_reason == "length" and mode != "diffusion"):
                        raise RuntimeError(f"request {r.idx} ({mode}, batch {batch}) did not run its workload: "
                                           f"{out.finish_reason} {out.stats.plan_errors}")
                if timed:
                    for r, out in zip(g, res):
                        s = out.stats
                        recs[r.idx].append(dict(
                            wall_s=wall if batch == 1 else s.wall_s, group_wall_s=wall, steps=dict(s.steps),
                            time_s=dict(s.time_s), cp=s.critical_path,
                            gen_tokens=s.plan_tokens if mode == "ar" else s.span_tokens,
                            sequence=out.sequence, forward_tokens=toks if counting else None,
                            graphs=dict(dec.graph_counts)))
                self._tick(f"{mode}{'+' + variant if variant else ''} b{batch}{'' if timed else ' (warm-up)'}")
        return [_median_rec(recs[r.idx]) for r in reqs]

    def run_peer(self, mode: str, reqs=None, reps: int = 1, warmup: int = 1) -> list:
        reqs = reqs or self.reqs
        recs = {r.idx: [] for r in reqs}
        for rep in range(warmup + reps):
            for i, r in enumerate(reqs):
                if rep < warmup and i:   # one warm-up request (cuBLAS / allocator)
                    continue
                loop = ReferenceLoop(self.model, self.config(mode, len(r.prompt)), top_p=self.args.peer_top_p)
                _sync(self.device)
                t0 = time.perf_counter()
                out = loop.generate(r.prompt, r.forced(mode, self.tags))
                _sync(self.device)
                wall = time.perf_counter() - t0
                if rep >= warmup:
                    recs[r.idx].append(dict(wall_s=wall, group_wall_s=wall, steps=dict(out.steps), time_s=None,
                                            cp=out.critical_path,
                                            gen_tokens=len(out.plans[0]) if mode == "ar" else sum(
                                                len(s) for rnd in out.spans for s in rnd),
                                            sequence=out.sequence, forward_tokens=out.forward_tokens, graphs=None))
                self._tick(f"reference-loop {mode}{'' if rep >= warmup else ' (warm-up)'}")
        return [_median_rec(recs[r.idx]) for r in reqs]


def _median_rec(recs: list) -> dict:
    out = dict(recs[len(recs) // 2])
    out["wall_s"] = statistics.median(x["wall_s"] for x in recs)
    out["group_wall_s"] = statistics.median(x["group_wall_s"] for x in recs)
    return out


def aggregate(suite: Suite, impl: str, mode: str, variant: str, batch: int, recs: list, *, part="main",
              extra=None) -> dict:
    """One JSON row from per-request records."""
    facts, ceil = suite.facts, suite.ceil
    walls = [r["wall_s"] * 1e3 for r in recs]
    w_med, w_p20, w_p80 = spread(walls)
    n = len(recs)
    cp = [r["cp"] for r in recs]
    steps = {ph: statistics.fmean(r["steps"][ph] for r in recs) for ph in ("prefill", "plan", "diffusion")}
    total_wall = sum(walls)
    total_cp = sum(cp)
    tokens = sum(r["gen_tokens"] for r in recs)
    row = dict(part=part, mode=mode, variant=variant or "dynamic", batch=batch, requests=n,
               critical_path=round(statistics.fmean(cp), 1), cp_prefill=round(steps["prefill"], 2),
               cp_plan=round(steps["plan"], 1), cp_diffusion=round(steps["diffusion"], 1),
               wall_ms=round(w_med, 3), wall_p20_ms=round(w_p20, 3), wall_p80_ms=round(w_p80, 3),
               wall_mean_ms=round(total_wall / n, 3),
               ms_per_step=round(total_wall / max(1, total_cp), 4))
    if batch == 1:
        row["tok_per_s"] = round(tokens / (total_wall * 1e-3), 1)
    else:  # throughput: tokens over the groups' wall time (each group counted once)
        row["tok_per_s"] = round(tokens / _group_seconds(recs, batch), 1)
    w_floor = facts["weight_bytes_per_step"] / ceil["copy_bytes_per_s"] * 1e3
    row["floor_ms_per_step"] = float(f"{w_floor:.5g}")   # significant digits: a tiny model's floor is < 1e-3 ms
    row["floor_ratio"] = round(row["ms_per_step"] / w_floor, 3) if w_floor > 0 else None
    if batch == 1 and all(r["forward_tokens"] for r in recs):
        wf, rf = zip(*(floors(r["forward_tokens"], facts, ceil) for r in recs))
        row["roofline_ratio"] = round(total_wall / sum(rf), 3)
        row["forward_tokens_mean"] = round(statistics.fmean(t for r in recs for t in r["forward_tokens"]), 1)
        if recs[0]["time_s"] is not None:
            for ph in ("plan", "diffusion"):
                st = sum(r["steps"][ph] for r in recs)
                if st:
                    ms = sum(r["time_s"][ph] for r in recs) * 1e3 / st
                    row[f"{ph}_ms_per_step"] = round(ms, 4)
                    row[f"{ph}_floor_ratio"] = round(ms / w_floor, 3)
                    toks = [t for r in recs for t in _phase_split(r["forward_tokens"], r["steps"])[ph]]
                    roof = sum(max(w_floor, 2 * (facts["body_params"] * t + facts["head_params"] * (1 if t == 1 else t))
                                   / suite.ceil["matmul_flops_per_s"] * 1e3) for t in toks)
                    row[f"{ph}_roofline_ratio"] = round(ms * st / roof, 3) if roof else None
    if recs[0]["graphs"] is not None:
        row["graphs_captured"] = recs[-1]["graphs"]["captured"]
        row["graph_replays"] = recs[-1]["graphs"]["replayed"]
    row.update(extra or {})
    return row


def _group_seconds(recs, batch) -> float:
    """Sum of the wall times of the groups of ``batch`` consecutive requests (each group once)."""
    return sum(recs[i]["group_wall_s"] for i in range(0, len(recs), batch))


def _wall(recs: list) -> float:
    return sum(r["wall_s"] for r in recs)


def run_and_row(suite: Suite, mode: str, v: str, b: int, reps: int, warmup: int) -> None:
    """Run ``mode`` with variant ``v`` at batch ``b`` and write its row (``ar`` of the same variant and batch
    must have run before)."""
    suffix = "+" + v if v else ""
    recs = suite.results[(mode + suffix, b)] = suite.run_ours(mode, v, b, reps=reps, warmup=warmup,
                                                              count_tokens=True)
    if v and b == 1 and (mode, 1) in suite.results:   # same steps as the dynamic run: reuse its token counts
        for a, d in zip(recs, suite.results[(mode, 1)]):
            if a["forward_tokens"] is None and a["steps"] == d["steps"]:
                a["forward_tokens"] = d["forward_tokens"]
    ar = suite.results[("ar" + suffix, b)]
    extra = {"vs_ar": round(_wall(ar) / _wall(recs), 3) if b == 1 else
             round(_group_seconds(ar, b) / _group_seconds(recs, b), 3),
             "cp_vs_ar": round(sum(r["cp"] for r in ar) / sum(r["cp"] for r in recs), 3)}
    if b == 1 and all(r["forward_tokens"] for r in recs + ar):   # the most this hardware allows
        roof = lambda rs: sum(floors(r["forward_tokens"], suite.facts, suite.ceil)[1] for r in rs)  # noqa: E731
        extra["roofline_vs_ar"] = round(roof(ar) / roof(recs), 3)
    if v and (mode, b) in suite.results:
        extra["tokens_match_dynamic"] = match_fraction(recs, suite.results[(mode, b)])
    if b > 1:
        extra["tokens_match_batch1"] = match_fraction(recs, suite.results[(mode + suffix, 1)])
    suite.bench.row(impl=mode + suffix, timing=None, **aggregate(suite, mode + suffix, mode, v, b, recs, extra=extra))


def match_fraction(a: list, b: list) -> float:
    return round(sum(x["sequence"] == y["sequence"] for x, y in zip(a, b)) / len(a), 3)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    args.model = args.model or ("dream" if cuda else "tiny")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.smoke:
        args.model, args.dtype, args.requests = "tiny", "fp32" if not cuda else args.dtype, 2
        args.batch, args.sweep_requests, args.reps, args.warmup = "1,2", 1, 1, 0
    if args.quick:   # a few minutes on an H200: the first results of a GPU session
        args.requests, args.batch, args.sweep_requests = min(args.requests, 4), "1", min(args.sweep_requests, 2)
        args.modes = ",".join(m for m in args.modes.split(",") if m != "diffusion")
        args.peer_modes = ",".join(m for m in args.peer_modes.split(",") if m in ("ar", "pd"))
    modes = [m for m in args.modes.split(",") if m]
    modes = (["ar"] if "ar" in modes else []) + [m for m in modes if m != "ar"]   # every speedup needs ar first
    peer_modes = [m for m in args.peer_modes.split(",") if m]
    for m in modes + peer_modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}: choose from {MODES}")
    if "ar" not in modes:
        raise SystemExit("--modes must include ar (every speedup is against it)")
    batches = [int(b) for b in args.batch.split(",")]
    if batches[0] != 1:
        raise SystemExit("--batch must start with 1 (latency, the reference loop and the floor are batch 1)")
    sweep = args.sweep if args.sweep != "auto" else ("short" if (args.quick or args.smoke) else "on")
    reps = 1 if args.smoke else max(1, min(args.reps, 3))   # decodes are long: the median of up to 3 runs
    warmup = 0 if args.smoke else 1
    if args.graphs == "off":
        variants = [""]
    else:
        g = "graphs" if cuda else "static"
        variants = [g] if args.graphs == "on" else ["", g]

    bench = Bench("decoder", args)
    torch.manual_seed(0)
    model, tags = load_model(args, device)
    params = (WorkloadParams.smoke(seed=args.seed) if args.smoke
              else WorkloadParams(seed=args.seed, requests=args.requests))
    reqs = make_workload(params, tags, model.config.vocab_size)
    bench.meta["workload"] = {"params": params.as_dict(), "stats": summarize(reqs, tags, args.steps_ratio),
                              "requests": [r.as_dict() for r in reqs], "diffusion_len": diffusion_length(reqs)}
    if args.tp:   # the tensor-parallel axis alone (each size in its own spawned ranks)
        from benchmarks.tp_axis import tp_axis

        D = diffusion_length(reqs)
        cap = max(len(r.prompt) for r in reqs) + max(r.new_tokens("pd", tags, D) for r in reqs) + 8
        del model
        tp_axis(bench, args, reqs, tags, dict(steps_ratio=args.steps_ratio, policy=args.policy, tau=args.tau,
                                              confidence=args.confidence, max_rounds=16, diffusion_len=D,
                                              length_scale=params.length_scale,
                                              max_new_tokens=cap - min(len(r.prompt) for r in reqs)))
        bench.finish(["impl", "tp", "ms_per_step", "steps", "vs_tp1", "tokens_match_tp1", "skipped"], only=True)
        if args.smoke:
            print("(smoke run on CPU: gloo ranks on shared cores; these timings check that the axis runs)")
        return
    facts = model_facts(model)
    bench.meta["model"] = dict(facts, name=args.model)
    bench.meta["config"] = {"steps_ratio": args.steps_ratio, "policy": args.policy, "tau": args.tau,
                            "confidence": args.confidence, "backend": args.backend, "reps": reps,
                            "warmup": warmup, "peer_top_p": args.peer_top_p}
    ceil = ceilings(bench, device, DTYPES[args.dtype])
    bench.meta["ceilings"] = ceil
    suite = Suite(args, bench, model, tags, reqs, facts, ceil, device)
    st = bench.meta["workload"]["stats"]
    print(f"workload: {len(reqs)} requests, spans/plan mean {st['spans_per_plan']['mean']}, "
          f"tokens/span mean {st['tokens_per_span']['mean']}, rounds mean {st['rounds']['mean']}, "
          f"AR tokens mean {st['ar_tokens']['mean']}; schedule critical path AR/PD at r={args.steps_ratio}: "
          f"{st['critical_path_schedule']['ar_over_pd']}x", flush=True)

    sweep_settings = []
    if sweep == "on":
        sweep_settings += [("schedule", r, args.tau) for r in SWEEP_RATIOS]
        sweep_settings += [("pd_threshold", r, 0.9) for r in SWEEP_RATIOS]
        sweep_settings += [(p, 1.0, t) for p in ("pd_threshold", "threshold") for t in SWEEP_TAUS]
    elif sweep == "short":
        sweep_settings += [("schedule", r, args.tau) for r in (0.25, 1.0)]
        sweep_settings += [("pd_threshold", 1.0, 0.9), ("threshold", 1.0, 0.5), ("threshold", 1.0, 0.9)]
        if args.quick:
            sweep_settings = sweep_settings[:3]
    sweep_settings = list(dict.fromkeys(sweep_settings))
    ng = {b: cdiv(len(reqs), b) for b in batches}
    sw_reqs = reqs[:max(1, min(args.sweep_requests, len(reqs)))]
    # progress ticks: one per decoded group (a graphs variant warms up on every group, others on the first)
    total = sum((reps * ng[b] + warmup * (ng[b] if v else 1)) * len(modes) for b in batches for v in variants)
    total += (reps * len(reqs) + warmup) * len(peer_modes)
    total += len(sweep_settings) * (reps + warmup) * len(sw_reqs) if variants[-1] else \
        len(sweep_settings) * (reps * len(sw_reqs) + warmup)
    suite.progress = Progress(total, "decoder")

    t_start = time.perf_counter()
    try:   # rows are written as they are measured: a run cut short (timeout: SIGINT) keeps what it has
        for v in variants:
            for mode in modes:
                run_and_row(suite, mode, v, 1, reps, warmup)
        for mode in peer_modes:
            peer = suite.results[("reference-loop:" + mode, 1)] = suite.run_peer(mode, reps=reps, warmup=warmup)
            ar = suite.results.get(("reference-loop:ar", 1))
            extra = {"vs_ar": round(_wall(ar) / _wall(peer), 3) if ar else None}
            bench.row(impl="reference-loop", timing=None, **aggregate(suite, "reference-loop", mode, "reference", 1,
                                                                     peer, part="reference", extra=extra))
            for r in bench.rows:   # our batch-1 rows of this mode: the speedup over the reference loop
                if r.get("part") == "main" and r["mode"] == mode and r["batch"] == 1:
                    recs = suite.results[(r["impl"], 1)]
                    r["vs_reference"] = round(_wall(peer) / _wall(recs), 3)
                    r["tokens_match_reference"] = match_fraction(recs, peer)
            bench._write(complete=False)
        if sweep_settings:   # knob sweeps on pd, batch 1, the best variant
            v = variants[-1]
            suffix = "+" + v if v else ""
            ar_sub = suite.results[("ar" + suffix, 1)][:len(sw_reqs)]
            for pol, ratio, tau in sweep_settings:
                recs = suite.run_ours("pd", v, 1, reqs=sw_reqs, reps=reps, warmup=warmup, policy=pol,
                                      steps_ratio=ratio, tau=tau)
                extra = {"policy": pol, "steps_ratio": ratio, "tau": tau,
                         "vs_ar": round(_wall(ar_sub) / _wall(recs), 3),
                         "cp_vs_ar": round(sum(r["cp"] for r in ar_sub) / sum(r["cp"] for r in recs), 3)}
                bench.row(impl="pd" + suffix, timing=None, **aggregate(suite, "pd" + suffix, "pd", v, 1, recs,
                                                                      part="sweep", extra=extra))
        for b in batches[1:]:
            for v in variants:
                for mode in modes:
                    run_and_row(suite, mode, v, b, reps, warmup)
    except KeyboardInterrupt:
        bench.meta["interrupted"] = True
        print("interrupted: writing the rows measured so far", flush=True)
    bench.meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    cols = ["impl", "part", "batch", "critical_path", "cp_plan", "cp_diffusion", "wall_ms", "wall_p20_ms",
            "wall_p80_ms", "ms_per_step", "floor_ratio", "roofline_ratio", "vs_ar", "cp_vs_ar", "vs_reference",
            "tok_per_s", "tokens_match_reference", "policy", "steps_ratio", "tau"]
    bench.finish(cols, only=True)   # every field is in the JSON
    report = args.report or (os.path.splitext(args.out)[0] if args.out else None)
    if report:
        from benchmarks.report import write_report

        for line in write_report(bench._payload(complete=True), report):
            print(line)
    if args.smoke:
        print("(smoke run on CPU: these timings check that the suite runs; they are not results)")


if __name__ == "__main__":
    main()
