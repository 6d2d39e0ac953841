"""Shared benchmark harness: CUDA-event timing, warm-up, medians, GB/s and TFLOP/s, JSON rows.

Usage in a ``bench_<op>.py``::

    from benchmarks._harness import Bench, time_fn
    bench = Bench("kv_cache", args)            # args from bench.parser() (adds --out, --smoke, --reps)
    t = time_fn(lambda: op(...), bench)        # -> Timing(median_ms, p20_ms, p80_ms, n)
    bench.row(impl="triton", shape=..., timing=t, bytes=nbytes, flops=None, extra...)
    bench.finish()                              # prints a table, writes JSON (device, versions, commit)

On a machine without a GPU, ``--smoke`` runs the same code paths on tiny CPU shapes to check that the
script works; its times are CPU times, are marked ``"device": "cpu (smoke)"`` and are never results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device: check the script runs")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per point")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up calls per point")
    return p


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return os.environ.get("PD_KERNELS_COMMIT", "unknown")


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": os.environ.get("PD_KERNELS_COMMIT") or _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            if isinstance(env["driver"], bytes):
                env["driver"] = env["driver"].decode()
        except Exception as e:
            env["driver"] = f"unknown ({type(e).__name__})"
    else:
        env["device"] = "cpu (smoke)"
    return env


def time_fn(fn, bench: "Bench | None" = None, *, reps: int | None = None, warmup: int | None = None,
            setup=None) -> Timing:
    """Median time of ``fn()``: CUDA events around each call on a GPU, host clock otherwise.

    ``setup`` (untimed) runs before each call, e.g. to restore a buffer the op mutates or rotate inputs.
    """
    reps = reps if reps is not None else (bench.args.reps if bench else 50)
    warmup = warmup if warmup is not None else (bench.args.warmup if bench else 10)
    if bench is not None and bench.args.smoke:
        reps, warmup = min(reps, 3), min(warmup, 1)
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    for _ in range(reps):
        if setup:
            setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return Timing(statistics.median(times), q(0.2), q(0.8), len(times))


def time_graph(fn, bench: "Bench | None" = None, *, reps: int | None = None) -> Timing:
    """Time ``fn`` captured in a CUDA graph (launch overhead removed); host timing off-GPU."""
    if not torch.cuda.is_available():
        return time_fn(fn, bench, reps=reps)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_fn(g.replay, bench, reps=reps)


class Bench:
    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.env = environment()
        self.rows: list[dict] = []

    @property
    def device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def row(self, *, impl: str, timing: Timing | None, bytes: float | None = None, flops: float | None = None,
            **fields) -> dict:
        r = {"bench": self.name, "impl": impl, **fields}
        if timing is None:
            r.update(median_ms=None, error=fields.get("error"))
        else:
            r.update(median_ms=round(timing.median_ms, 5), p20_ms=round(timing.p20_ms, 5),
                     p80_ms=round(timing.p80_ms, 5), reps=timing.n)
            sec = timing.median_ms * 1e-3
            if bytes is not None:
                r["bytes"] = int(bytes)
                r["GB/s"] = round(bytes / sec / 1e9, 2)
            if flops is not None:
                r["flops"] = int(flops)
                r["TFLOP/s"] = round(flops / sec / 1e12, 3)
        self.rows.append(r)
        return r

    def finish(self, columns: list[str] | None = None) -> None:
        if not self.rows:
            print("no rows")
            return
        cols = columns or [k for k in self.rows[0] if k not in ("bench",)]
        for r in self.rows:
            for k in r:
                if k not in cols and k not in ("bench", "p20_ms", "p80_ms", "reps", "bytes", "flops"):
                    cols.append(k)
        widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in self.rows)) for c in cols}
        print(f"# {self.name} on {self.env['device']} (torch {self.env['torch']}, triton {self.env['triton']}, "
              f"commit {self.env['commit'][:12]})")
        print("  ".join(c.ljust(widths[c]) for c in cols))
        for r in self.rows:
            print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))
        if self.args.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "w") as f:
                json.dump({"bench": self.name, "env": self.env, "argv": sys.argv[1:], "rows": self.rows}, f,
                          indent=1)
            print(f"wrote {self.args.out}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
