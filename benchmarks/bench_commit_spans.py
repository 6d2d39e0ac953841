"""commit_spans: its cost as the step grows: the per-row-span kernel (before ``span_rows``)
against the per-span-range kernel, on the span mixes of SPEC section 8.

Without a GPU every figure here is a **CPU figure**: no timing, only work that does not depend on the machine:

* ``model_*``: a cost model computed from each kernel's launch geometry and loop bounds (worst case: the
  ranking pass of ``schedule`` / ``pd_threshold`` runs in every span). ``pairs`` = compare lanes of the
  ranking tiles (masked lanes included: a GPU pays for them), ``row_visits`` = rows read by every pass
  (Triton: lanes issued, masked ones included; CUDA: rows loaded), programs of span ids without rows
  included; ``launches`` per call. Triton and CUDA each have their own tile geometry.
  ``ideal_pairs`` = sum of m_j^2.
* ``interp_*`` (``--interp``): the same counts measured by running the Triton kernels in the interpreter on a
  real step: ``interp_load_lanes`` = lanes of every ``tl.load`` executed, ``interp_pairs`` = lanes of every
  2-D ``>`` compare (the ranking tiles). The old kernel is taken from git (``--old-rev``).
* ``sm90``: registers / spills / shared memory of the old and new kernels compiled for sm_90 (Triton through
  ``triton.compile`` + ``ptxas -v``; CUDA through ``nvcc -Xptxas -v``), not run.

On a GPU the new Triton and CUDA kernels, and the old Triton kernel when git history is there, are also timed
(``triton.testing.do_bench``, the state restore subtracted; ``--no-gpu`` skips it).

    python benchmarks/bench_commit_spans.py --interp --sm90 --out benchmarks/results/commit_cpu_costmodel.json
    python benchmarks/bench_commit_spans.py --smoke
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pd_kernels  # noqa: E402
from benchmarks._harness import ROOT, Bench, parser, time_fn  # noqa: E402
from pd_kernels import SpanState  # noqa: E402
from pd_kernels._checks import cdiv  # noqa: E402
from pd_kernels.reference import POLICIES, POLICY_ID  # noqa: E402

MASK = 151666
MAX_SPANS = 16  # DecodeConfig.max_spans: span ids per request in the decoder's SpanState
OLD_REV = "74a0aff"  # the last commit with the per-row-span kernels


# ---- span mixes (SPEC section 8) ---------------------------------------------------------------------------
def _spans_per_plan(g: torch.Generator) -> int:
    """SPEC section 8: median 2, mean 3.14, 90th percentile 6, 34% one span; 1..16."""
    u = torch.rand(1, generator=g).item()
    table = [(0.34, 1), (0.50, 2), (0.64, 3), (0.75, 4), (0.84, 5), (0.90, 6), (0.95, 8), (0.98, 11), (1.0, 16)]
    return next(n for p, n in table if u <= p)


def _span_len(g: torch.Generator) -> int:
    """About 81 tokens on average, 10 to 200 (a clipped log-normal)."""
    x = math.exp(4.25 + 0.55 * torch.randn(1, generator=g).item())
    return int(min(200, max(10, round(x))))


def mixes(smoke: bool):
    """(name, batch, spans per request) with lengths drawn from a fixed seed."""
    g = torch.Generator().manual_seed(8)
    out = []
    for n in (1, 2, 3, 6, 16):
        out.append((f"b1-{n}sp", 1, [[_span_len(g) for _ in range(n)]]))
    out.append(("b8-spec", 8, [[_span_len(g) for _ in range(_spans_per_plan(g))] for _ in range(8)]))
    out.append(("b8-spec2", 8, [[_span_len(g) for _ in range(_spans_per_plan(g))] for _ in range(8)]))
    out.append(("b8-16sp", 8, [[_span_len(g) for _ in range(16)] for _ in range(8)]))
    if smoke:
        out = [out[0], (out[1][0], 1, [[12, 30]])]
    return out


def make_step(batch: int, spans: list[list[int]], device, seed: int = 0):
    """One diffusion step of ``batch`` requests as the decoder builds it: span ids ``b * 16 + k``, each span's
    rows contiguous (its mask positions), one token row per position, random confidences."""
    g = torch.Generator().manual_seed(seed)
    S = batch * MAX_SPANS
    lens = [L for req in spans for L in req]
    N = sum(lens)
    tokens = torch.full((N + 2 * len(lens) + 4,), 5, dtype=torch.int64)
    row_dst, span_rows, masks = [], torch.zeros(S, 2, dtype=torch.int32), torch.zeros(S, dtype=torch.int32)
    p, r = 1, 0
    for b, req in enumerate(spans):
        for k, L in enumerate(req):
            tokens[p + 1:p + 1 + L] = MASK
            row_dst += range(p + 1, p + 1 + L)
            span_rows[b * MAX_SPANS + k] = torch.tensor([r, L])
            masks[b * MAX_SPANS + k] = L
            p += L + 2
            r += L
    token = torch.randint(0, 1000, (N,), generator=g)
    conf = (torch.rand(N, generator=g) * 8).round() / 8  # ties
    state = SpanState.new(S)
    ids = [b * MAX_SPANS + k for b, req in enumerate(spans) for k in range(len(req))]
    state.reset(ids, [masks[i].item() for i in ids], [max(1, masks[i].item() // 4) for i in ids])
    row_span = torch.full((N,), S, dtype=torch.int32)  # the old API: span id per row
    for j in ids:
        a, n = span_rows[j].tolist()
        row_span[a:a + n] = j
    dev = lambda t: t.to(device)  # noqa: E731
    return dict(token=dev(token), conf=dev(conf), row_dst=dev(torch.tensor(row_dst)), span_rows=dev(span_rows),
                row_span=dev(row_span), tokens=dev(tokens), state=SpanState(*(dev(t) for t in (
                    state.masks_left, state.step, state.num_steps, state.deferred))), N=N, S=S, lens=lens)


# ---- cost models from the launch geometry ------------------------------------------------------------------
def _up(n: int, b: int) -> int:
    return cdiv(n, b) * b


def cost_old_triton(N: int, S: int, lens: list[int], ranking: bool) -> dict:
    """ops/triton/unmask.py at OLD_REV: grid (S,), BLOCK = min(128, max(16, next_pow2(N))); every program
    counts its masked rows over all N rows; a program with masks ranks every row block against every row block
    (BLOCK x BLOCK lanes per pair of blocks) and writes in a third pass over N; then _all_done_kernel."""
    B = min(128, max(16, 1 << max(0, (max(N, 1) - 1).bit_length())))
    nb = cdiv(N, B)
    active = sum(1 for L in lens if L > 0)
    pairs = active * nb * nb * B * B  # pass 1 runs for every span with masks, whatever the policy
    visits = S * nb * B + active * (nb * B * (1 + nb) + nb * B)  # pass 0; pass 1 loads (i + j blocks); pass 2
    return dict(pairs=pairs, row_visits=visits, launches=2)


def cost_new_triton(lens: list[int], S: int, ranking: bool, block: int = 128, block_j: int = 32) -> dict:
    """ops/triton/commit_spans.py: grid (S,); program j: pass 0 and pass B over its own rows in blocks of BLOCK,
    pass A (ranking policies, budget < candidates) BLOCK x BLOCK_J tiles over its rows; one launch."""
    pairs = sum(_up(L, block) * _up(L, block_j) for L in lens) if ranking else 0
    visits = sum(2 * _up(L, block) + (cdiv(L, block) * _up(L, block_j) + _up(L, block) if ranking else 0)
                 for L in lens) + S  # + one span_rows entry per program
    return dict(pairs=pairs, row_visits=visits, launches=1)


def cost_old_cuda(N: int, S: int, lens: list[int], ranking: bool, threads: int = 256) -> dict:
    """csrc/unmask.cu at OLD_REV: a block of 256 threads per span id. Pass 0 reads all N rows in every block;
    a block with masks stages every 256-row tile of the step once per 256-row block of the step, and each warp
    holding a row of the span compares it against the whole tile (lanes of those warps counted); pass 2 reads
    all N rows again; then a second kernel for all_done. Rows contiguous per span."""
    nb = cdiv(N, threads)
    active = sum(1 for L in lens if L > 0)
    pairs = sum(_up(L, 32) * _up(N, threads) for L in lens if L > 0)
    visits = S * N + active * (N + nb * N + N)
    return dict(pairs=pairs, row_visits=visits, launches=2)


def cost_new_cuda(lens: list[int], S: int, ranking: bool) -> dict:
    """csrc/commit_spans.cu: a block per span id over its own rows. Pass 0 and pass B read the span's m rows; pass A
    (ranking policies) stages them (one 512-row tile when m <= 512) and each warp holding candidates compares
    them against the staged rows (at most m each; the early exit at rank >= budget only lowers it)."""
    pairs = sum(_up(L, 32) * L for L in lens) if ranking else 0
    visits = sum(2 * L + (2 * L if ranking else 0) for L in lens) + S
    return dict(pairs=pairs, row_visits=visits, launches=1)


# ---- interpreter work counts -------------------------------------------------------------------------------
@contextlib.contextmanager
def interp_counter():
    """Counts, while active, the lanes of every load the Triton interpreter executes and the lanes of every
    2-D float ``>`` (the ranking tiles of both kernels)."""
    from triton.runtime.interpreter import InterpreterBuilder

    counts = dict(load_lanes=0, pairs=0)
    load, gt = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_fcmpOGT

    def counted_load(self, ptrs, *a, **k):
        counts["load_lanes"] += int(ptrs.data.size)
        return load(self, ptrs, *a, **k)

    def counted_gt(self, lhs, rhs):
        out = gt(self, lhs, rhs)
        if out.data.ndim == 2:
            counts["pairs"] += int(out.data.size)
        return out

    InterpreterBuilder.create_masked_load, InterpreterBuilder.create_fcmpOGT = counted_load, counted_gt
    try:
        yield counts
    finally:
        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_fcmpOGT = load, gt


def old_triton_module(rev: str):
    """ops/triton/unmask.py as of ``rev``, imported from a temporary file (Triton needs the source file)."""
    src = subprocess.run(["git", "show", f"{rev}:pd_kernels/ops/triton/unmask.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    d = tempfile.mkdtemp(prefix="pdk_old_commit_")
    path = os.path.join(d, "unmask_old.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("pd_kernels.ops.triton._unmask_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_new(step, policy: str) -> None:
    st = step["state"]
    pd_kernels.commit_spans(step["token"], step["conf"], step["row_dst"], step["span_rows"], step["tokens"], st,
                            policy=policy, tau=0.9, mask_id=MASK, backend="triton")


def run_old(mod, step, policy: str) -> None:
    st = step["state"]
    N, S = step["N"], step["S"]
    committed = torch.empty(S, dtype=torch.int32, device=st.device)
    done = torch.empty(1, dtype=torch.bool, device=st.device)
    mod.commit_spans_triton(step["token"], step["conf"], step["row_dst"], step["row_span"], step["tokens"],
                            st.masks_left, st.step, st.num_steps, st.deferred, committed, done, policy, 0.9, MASK)


# ---- sm_90 registers / spills ------------------------------------------------------------------------------
_COMMIT_SIG_NEW = {"tok_ptr": "*i64", "conf_ptr": "*fp32", "dst_ptr": "*i64", "rows_ptr": "*i32", "seq_ptr": "*i64",
                   "ml_ptr": "*i32", "step_ptr": "*i32", "ns_ptr": "*i32", "def_ptr": "*i32", "arr_ptr": "*i64",
                   "committed_ptr": "*i32", "done_ptr": "*i1", "N": "i32", "S": "i32", "mask_id": "i32",
                   "tau": "fp32", "n_tok": "i32"}
_COMMIT_SIG_OLD = {"tok_ptr": "*i64", "conf_ptr": "*fp32", "dst_ptr": "*i64", "span_ptr": "*i32", "seq_ptr": "*i64",
                   "flag_ptr": "*i8", "ml_ptr": "*i32", "step_ptr": "*i32", "ns_ptr": "*i32", "def_ptr": "*i32",
                   "committed_ptr": "*i32", "N": "i32", "mask_id": "i32", "tau": "fp32", "n_tok": "i32"}


def _ptxas_v(ptx: str, bindir: str, arch: str = "sm_90a") -> str:
    """``ptxas -v`` of a PTX text with the first assembler bundled with that Triton that accepts its version."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    err = ""
    for tool in ("ptxas", "ptxas-blackwell"):
        exe = os.path.join(bindir, tool)
        if not os.path.exists(exe):
            continue
        r = subprocess.run([exe, "-v", f"-arch={arch}", f.name, "-o", os.devnull], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stderr
        err = r.stderr
    raise RuntimeError(f"no bundled ptxas accepted the PTX: {err[-300:]}")


def _parse_ptxas(text: str, kernel: str = "") -> dict:
    """registers, spill stores / loads, stack, shared memory of the entry whose name contains ``kernel``."""
    blocks = re.split(r"Compiling entry function '", text)
    for b in blocks[1:]:
        if kernel in b.split("'")[0]:
            g = lambda pat: int(m.group(1)) if (m := re.search(pat, b)) else 0  # noqa: E731
            return dict(regs=g(r"Used (\d+) registers"), spill_stores=g(r"(\d+) bytes spill stores"),
                        spill_loads=g(r"(\d+) bytes spill loads"), stack=g(r"(\d+) bytes stack frame"),
                        smem=g(r"(\d+) bytes smem"))
    return {}


def sm90_triton(fn, sig: dict, constexprs: dict, num_warps: int, triton_site: str | None = None) -> dict:
    """Compile a Triton kernel for sm_90 in a subprocess without the interpreter (as tests/test_triton_compile.py
    does) and read ``ptxas -v`` from the assembler bundled with that Triton. ``triton_site``: a site-packages
    directory holding another Triton version (e.g. 3.6, the GPU machines'), put first on the path."""
    code = f"""
import importlib.util, json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location({fn.fn.__module__!r}, {fn.fn.__code__.co_filename!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
k = getattr(mod, {fn.fn.__name__!r})
sig = dict({sig!r}, **{{c: "constexpr" for c in {constexprs!r}}})
c = triton.compile(ASTSource(k, sig, {constexprs!r}), target=GPUTarget("cuda", 90, 32), options={{"num_warps": {num_warps}}})
json.dump(dict(ptx=c.asm["ptx"], version=triton.__version__,
               bindir=os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")), sys.stdout)
"""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    path = [ROOT] + [p for p in sys.path if p.endswith("site-packages")]
    env["PYTHONPATH"] = os.pathsep.join(([triton_site] if triton_site else []) + path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-500:])
    out = json.loads(r.stdout)
    return dict(triton=out["version"], **_parse_ptxas(_ptxas_v(out["ptx"], out["bindir"])))


def sm90_cuda(rev: str | None) -> dict:
    """``nvcc -Xptxas -v`` of the commit kernel for sm_90a: csrc/commit_spans.cu of the working tree, or
    csrc/unmask.cu (its file before the split) of ``rev`` from git."""
    nvcc = os.environ.get("NVCC", "/usr/local/cuda/bin/nvcc")
    if not os.path.exists(nvcc):
        raise RuntimeError("nvcc not found")
    with tempfile.TemporaryDirectory() as d:
        if rev is None:
            inc, src = os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "commit_spans.cu")
        else:
            for name in ("unmask.cu", "unmask.h"):
                with open(os.path.join(d, name), "w") as f:
                    f.write(subprocess.run(["git", "show", f"{rev}:csrc/{name}"], cwd=ROOT, capture_output=True,
                                           text=True, check=True).stdout)
            inc, src = d, os.path.join(d, "unmask.cu")
        r = subprocess.run([nvcc, "-c", "-std=c++17", "-O3", f"-I{inc}", "-gencode=arch=compute_90a,code=sm_90a",
                            "-Xptxas", "-v", src, "-o", os.path.join(d, "u.o")], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-500:])
        ver = re.search(r"release ([\d.]+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
        return dict(nvcc=ver.group(1) if ver else None, **_parse_ptxas(r.stderr, "commit_kernel"))


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--interp", action="store_true", help="measure interpreter work counts (CPU, minutes)")
    p.add_argument("--interp-max-rows", type=int, default=2500, help="skip interpreter counts above this N")
    p.add_argument("--sm90", action="store_true", help="compile old and new kernels for sm_90, ptxas -v")
    p.add_argument("--sm90-triton-site", action="append", default=[],
                   help="also compile with the Triton found in this site-packages directory (repeatable)")
    p.add_argument("--no-gpu", action="store_true", help="do not time the kernels on a GPU")
    p.add_argument("--old-rev", default=OLD_REV, help="git revision holding the per-row-span kernels")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    timed = gpu and not args.no_gpu
    bench = Bench("commit_spans", args)
    if not gpu:
        bench.env["device"] = "cpu: cost model + Triton interpreter work counts + sm_90 ptxas (no GPU run, no timing)"
    old = None
    if args.interp or timed or args.sm90:
        try:
            old = old_triton_module(args.old_rev)
        except Exception as e:  # no git history here: the cost model still runs
            print(f"old kernel unavailable ({type(e).__name__}: {e}); cost model only")
    device = "cuda" if gpu else "cpu"

    for name, batch, spans in mixes(args.smoke):
        lens = [L for req in spans for L in req]
        N, S = sum(lens), batch * MAX_SPANS
        shape = dict(mix=name, batch=batch, spans=len(lens), N=N, S=S, mean_len=round(N / len(lens), 1),
                     max_len=max(lens))
        for policy in POLICIES:
            ranking = policy != "threshold"
            ot, nt = cost_old_triton(N, S, lens, ranking), cost_new_triton(lens, S, ranking)
            oc, nc = cost_old_cuda(N, S, lens, ranking), cost_new_cuda(lens, S, ranking)
            row = dict(shape, policy=policy, ideal_pairs=sum(L * L for L in lens) if ranking else 0,
                       **{f"model_triton_old_{k}": v for k, v in ot.items()},
                       **{f"model_triton_new_{k}": v for k, v in nt.items()},
                       **{f"model_cuda_old_{k}": v for k, v in oc.items()},
                       **{f"model_cuda_new_{k}": v for k, v in nc.items()})
            row["model_triton_pairs_ratio"] = round(ot["pairs"] / max(nt["pairs"], 1), 1) if ranking else None
            row["model_triton_visits_ratio"] = round(ot["row_visits"] / nt["row_visits"], 1)
            want_interp = args.interp and N <= args.interp_max_rows and (policy == "schedule" or args.smoke)
            if want_interp and not gpu:
                step = make_step(batch, spans, device)
                with interp_counter() as c:
                    run_new(step, policy)
                row["interp_new_load_lanes"], row["interp_new_pairs"] = c["load_lanes"], c["pairs"]
                if old is not None:
                    step = make_step(batch, spans, device)
                    with interp_counter() as c:
                        run_old(old, step, policy)
                    row["interp_old_load_lanes"], row["interp_old_pairs"] = c["load_lanes"], c["pairs"]
            if timed:
                for impl in ("triton", "cuda", "triton_old"):
                    step = make_step(batch, spans, device)
                    st0 = step["state"].clone()
                    tok0 = step["tokens"].clone()

                    def restore():
                        step["tokens"].copy_(tok0)
                        for f in ("masks_left", "step", "deferred"):
                            getattr(step["state"], f).copy_(getattr(st0, f))

                    try:
                        if impl == "triton_old":
                            if old is None:
                                raise RuntimeError("old kernel unavailable")
                            fn = lambda: run_old(old, step, policy)  # noqa: E731
                        else:
                            fn = lambda: pd_kernels.commit_spans(  # noqa: E731
                                step["token"], step["conf"], step["row_dst"], step["span_rows"], step["tokens"],
                                step["state"], policy=policy, tau=0.9, mask_id=MASK, backend=impl)
                        row[f"gpu_{impl}_us"] = round(time_fn(fn, bench, setup=restore).median_ms * 1e3, 2)
                    except Exception as e:
                        row[f"gpu_{impl}_us"] = None
                        row[f"gpu_{impl}_error"] = f"{type(e).__name__}: {e}"[:120]
            bench.row(impl="commit_spans", timing=None, **row)
            bench.rows[-1].pop("median_ms", None)
            bench.rows[-1].pop("error", None)

    if args.sm90:
        from pd_kernels.ops.triton import commit_spans as csk

        n0 = len(bench.rows)
        for site in [None] + args.sm90_triton_site:
            for policy, pid in POLICY_ID.items():   # the old kernel numbered them the same way
                for impl in ("new", "old"):
                    try:
                        if impl == "new":
                            res = sm90_triton(csk._commit_kernel, _COMMIT_SIG_NEW,
                                              dict(POLICY=pid, BLOCK=csk.COMMIT_BLOCK, BLOCK_J=csk.COMMIT_BLOCK_J),
                                              csk.COMMIT_WARPS, site)
                        else:
                            if old is None:
                                raise RuntimeError("old kernel unavailable")
                            # the old launcher: BLOCK = min(128, next_pow2(N)) (128 once N >= 65), 4 warps
                            res = sm90_triton(old._commit_kernel, _COMMIT_SIG_OLD, dict(POLICY=pid, BLOCK=128), 4, site)
                    except Exception as e:
                        res = dict(error=f"{type(e).__name__}: {e}"[:160])
                    bench.row(impl=f"triton_{impl}", timing=None, mix="sm90", policy=policy, **res)
        for impl, rev in (("new", None), ("old", args.old_rev)):
            try:
                res = sm90_cuda(rev)
            except Exception as e:
                res = dict(error=f"{type(e).__name__}: {e}"[:160])
            bench.row(impl=f"cuda_{impl}", timing=None, mix="sm90", policy="all", **res)
        for r in bench.rows[n0:]:
            r.pop("median_ms", None)

    bench.finish(["impl", "mix", "policy", "N", "S", "ideal_pairs", "model_triton_old_pairs", "model_triton_new_pairs",
                  "model_triton_pairs_ratio", "model_triton_visits_ratio", "interp_old_pairs", "interp_new_pairs",
                  "interp_old_load_lanes", "interp_new_load_lanes", "triton", "regs", "spill_stores", "stack", "smem"])


if __name__ == "__main__":
    main()
