"""The benchmark runner every ``bench_*.py`` uses: library timers, environment capture, NVML samples, JSON rows.

Usage in a ``bench_<op>.py``::

    from benchmarks._harness import Bench, parser, time_fn
    bench = Bench("paged_kv_write", args)      # args from parser() (--out, --smoke, --reps, --warmup-ms, --rep-ms)
    t = time_fn(lambda: op(...), bench)        # -> Timing(median_ms, p20_ms, p80_ms, n, method, inner, host_ms)
    bench.row(impl="triton", shape=..., timing=t, bytes=nbytes, flops=None, extra...)
    bench.finish()                              # prints a table, writes JSON (device, versions, commit, GPU samples)

The timers are the libraries' own; this module only picks one and reports its samples alike:

* :func:`time_fn` on a GPU: ``triton.testing.do_bench`` (CUDA events around every call, the L2 cache cleared
  before each one, ``--warmup-ms`` / ``--rep-ms`` windows); a mutating op's ``setup`` (restoring its inputs) is
  timed alone with the same timer and subtracted (``do_bench-setup``).
* :func:`time_graph` on a GPU: ``triton.testing.do_bench_cudagraph`` (calls replayed from a CUDA graph, launch
  cost removed).
* :func:`time_host`, and both of the above without a GPU: ``torch.utils.benchmark.Timer`` (``blocked_autorange``,
  or ``--reps`` blocks of ``inner`` calls; with ``setup``, one call per block after it). Host (wall) time per
  call; on a CUDA machine the default timer synchronises the device at block boundaries (wall time including
  the device work), ``timer=time.perf_counter`` does not (issue time), ``timer=time.thread_time`` gives the
  calling thread's CPU time. Without a GPU these are CPU figures (``--smoke`` runs: never results).

Reported per point: the median per-call time over the timer's samples, its 20th/80th percentiles, their count
(``reps``), the method, calls per sample (``inner``) and, on a GPU, the host time of one call (``host_ms``: how
long the Python call takes to return; a call that syncs inside returns late); :meth:`Bench.row` adds GB/s and
TFLOP/s from counted bytes / flops.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Measurement, Timer

from benchmarks.provenance import commit_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Timing:
    """Per-call time of a timed function: ``median_ms`` / ``p20_ms`` / ``p80_ms`` over ``n`` samples.

    ``method``: ``do_bench``, ``do_bench-setup``, ``do_bench_cudagraph``, ``torch-timer``. ``inner``: calls per
    sample. ``host_ms``: host time of one call. ``l2_flush``: whether L2 was cleared before every call."""
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    method: str = "do_bench"
    inner: int = 1
    host_ms: float | None = None
    l2_flush: bool = False

    @classmethod
    def of(cls, times_ms: list[float], method: str, inner: int = 1, host_ms: float | None = None,
           l2_flush: bool = False) -> "Timing":
        return cls(*spread(times_ms), len(times_ms), method, inner, host_ms, l2_flush)

    def fields(self) -> dict:
        """The timing's fields as they go into a JSON row."""
        return {"median_ms": round(self.median_ms, 5), "p20_ms": round(self.p20_ms, 5),
                "p80_ms": round(self.p80_ms, 5), "reps": self.n, "timer": self.method, "inner": self.inner,
                "host_ms": None if self.host_ms is None else round(self.host_ms, 5), "l2_flush": self.l2_flush}


def spread(values: list[float]) -> tuple[float, float, float]:
    """``(median, 20th percentile, 80th percentile)`` of samples (nearest rank)."""
    v = sorted(values)
    q = lambda f: v[min(len(v) - 1, int(f * len(v)))]  # noqa: E731
    return statistics.median(v), q(0.2), q(0.8)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device: check the script runs")
    p.add_argument("--reps", type=int, default=50, help="host timers given a call count: samples per point")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs where a script counts them")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up window per point (ms)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench / do_bench_cudagraph timed window (ms)")
    return p


# ---- environment -----------------------------------------------------------------------------------------
def _nvml_handle():
    """(pynvml, handle) of the current CUDA device, matched by PCI bus id where torch exposes it."""
    import pynvml

    pynvml.nvmlInit()
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        try:
            pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
            return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(pci)
        except Exception:
            pass
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(idx)


def environment() -> dict:
    """Versions, commit, date and the device (GPU name, driver, clocks, power limit, memory, L2 via NVML)."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit_id(),   # $PD_KERNELS_COMMIT, git, or the stamp benchmarks/COMMIT (provenance.py)
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(device=torch.cuda.get_device_name(), sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   l2_bytes=getattr(props, "L2_cache_size", None))
        try:
            nv, h = _nvml_handle()
            drv = nv.nvmlSystemGetDriverVersion()
            env["driver"] = drv.decode() if isinstance(drv, bytes) else drv
            env["max_sm_clock_mhz"] = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)
            env["max_mem_clock_mhz"] = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)
            env["power_limit_w"] = round(nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000, 1)
        except Exception as e:
            env["driver"] = f"unknown ({type(e).__name__})"
    else:   # no GPU: the figures are CPU figures (host time, interpreter), never GPU performance
        env["device"] = f"cpu ({_cpu_model()})"
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


class GpuSampler:
    """Samples SM/memory clocks, power, temperature, memory used and utilisation with NVML in a
    background thread every ``interval`` s while a benchmark runs. ``summary()``: min / median / max per
    metric; ``last()``: the latest sample. Does nothing (``available`` False, ``error`` set) where NVML or a
    GPU is missing."""

    METRICS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c", "mem_used_gib", "util_pct")

    def __init__(self, interval: float = 0.5):
        self.interval, self.samples, self.error = interval, [], None
        self._stop, self._thread = threading.Event(), None
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            self._nv, self._h = _nvml_handle()
            self.samples.append(self._sample())
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"[:160]

    @property
    def available(self) -> bool:
        return self.error is None

    def _sample(self) -> dict:
        nv, h = self._nv, self._h
        return {"t": time.time(), "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                "mem_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
                "power_w": round(nv.nvmlDeviceGetPowerUsage(h) / 1000, 1),
                "temp_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                "mem_used_gib": round(nv.nvmlDeviceGetMemoryInfo(h).used / 2**30, 2),
                "util_pct": nv.nvmlDeviceGetUtilizationRates(h).gpu}

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self._sample())
            except Exception as e:  # keep what we have
                self.error = f"{type(e).__name__}: {e}"[:160]
                return

    def start(self) -> "GpuSampler":
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="nvml-sampler")
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)

    def last(self) -> dict | None:
        return {k: self.samples[-1][k] for k in self.METRICS} if self.samples else None

    def summary(self) -> dict:
        if not self.samples:
            return {"available": False, "error": self.error}
        out = {"available": True, "n": len(self.samples), "interval_s": self.interval}
        for k in self.METRICS:
            v = [s[k] for s in self.samples]
            out[k] = {"min": min(v), "median": statistics.median(v), "max": max(v)}
        if self.error:
            out["error"] = self.error
        return out


# ---- timing ------------------------------------------------------------------------------------------------
def _arg(bench, name, default):
    return getattr(bench.args, name, default) if bench is not None else default


def time_host(fn, bench: "Bench | None" = None, *, setup=None, reps: int | None = None, inner: int | None = None,
              timer=None) -> Timing:
    """Host time per call of ``fn()`` with ``torch.utils.benchmark.Timer`` (see the module docstring).

    ``reps`` samples of ``inner`` calls each when either is given (``setup``: one call per sample, after an
    untimed ``setup()``; ``--smoke``: one sample); else ``blocked_autorange`` picks the calls per sample. Each
    sample is ``Timer.timeit``, which runs two untimed calls first."""
    kw = {"timer": timer} if timer is not None else {}
    t = Timer("fn()", setup="setup()" if setup is not None else "pass", globals={"fn": fn, "setup": setup},
              num_threads=torch.get_num_threads(), **kw)
    smoke = _arg(bench, "smoke", False)
    if setup is not None or reps is not None or inner is not None or smoke:
        n_in = 1 if setup is not None else max(1, inner or 1)
        n = 1 if smoke else max(1, reps if reps is not None else _arg(bench, "reps", 50))
        m = Measurement.merge([t.timeit(n_in) for _ in range(n)])[0]
    else:
        m = t.blocked_autorange(min_run_time=0.2)
        n_in = m.number_per_run
    return Timing.of([x * 1e3 for x in m.times], "torch-timer", n_in, None)


def _windows(bench) -> tuple[float, float]:
    if _arg(bench, "smoke", False):
        return 1.0, 5.0
    return _arg(bench, "warmup_ms", 25.0), _arg(bench, "rep_ms", 100.0)


def _host_ms(fn) -> float:
    """Host time of one call, not synchronised (how long the Python call takes to return)."""
    return Timer("fn()", globals={"fn": fn}, timer=time.perf_counter).timeit(3).median * 1e3


def time_fn(fn, bench: "Bench | None" = None, *, setup=None) -> Timing:
    """Per-call device time of ``fn()``: ``triton.testing.do_bench`` on a GPU (L2 cleared before every call),
    :func:`time_host` without one. ``setup`` (untimed: e.g. restoring a buffer the op mutates) runs before
    every call; on a GPU its own do_bench median is subtracted from that of ``setup(); fn()``."""
    if not torch.cuda.is_available():
        return time_host(fn, bench, setup=setup)
    from triton.testing import do_bench

    warm, rep = _windows(bench)
    if setup is None:
        times, method = do_bench(fn, warmup=warm, rep=rep, return_mode="all"), "do_bench"
    else:
        both = do_bench(lambda: (setup(), fn()), warmup=warm, rep=rep, return_mode="all")
        alone = statistics.median(do_bench(setup, warmup=warm, rep=rep, return_mode="all"))
        times, method = [t - alone for t in both], "do_bench-setup"
    host = _host_ms(fn if setup is None else lambda: (setup(), fn()))
    torch.cuda.synchronize()
    return Timing.of(times, method, 1, host, True)


def time_graph(fn, bench: "Bench | None" = None) -> Timing:
    """Per-call time of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``: launch cost
    removed, L2 not cleared); :func:`time_host` without a GPU."""
    if not torch.cuda.is_available():
        return time_host(fn, bench)
    from triton.testing import do_bench_cudagraph

    times = do_bench_cudagraph(fn, rep=_windows(bench)[1], return_mode="all")
    return Timing.of(times, "do_bench_cudagraph", 1, None, False)


# ---- rows and output ---------------------------------------------------------------------------------------
_JSONABLE = (str, int, float, bool, list, tuple)
_HIDDEN = ("bench", "p20_ms", "p80_ms", "reps", "bytes", "flops", "timer", "inner", "host_ms", "l2_flush", "gpu")


class Bench:
    """Rows of one benchmark run plus its environment. ``meta`` (a dict) is written to the JSON as is (e.g.
    the workload parameters). With ``--out`` the JSON is rewritten after every row (``"complete": false``)
    so a run cut short still leaves its rows; :meth:`finish` writes the final file."""

    def __init__(self, name: str, args: argparse.Namespace, *, sample_gpu: bool = True):
        self.name, self.args = name, args
        if getattr(args, "smoke", False) and not torch.cuda.is_available():
            # CPU smoke runs: one intra-op thread. On the shared 2-core CI/dev machines OpenMP's spinning
            # threads made every small op ~10x slower; smoke timings are not results anyway.
            torch.set_num_threads(1)
        self.env = environment()
        self.env["torch_threads"] = torch.get_num_threads()
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.sampler = GpuSampler().start() if sample_gpu else None

    @property
    def device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def row(self, *, impl: str, timing: Timing | None, bytes: float | None = None, flops: float | None = None,
            **fields) -> dict:
        r = {"bench": self.name, "impl": impl, **fields}
        if timing is None:
            r.update(median_ms=None, error=fields.get("error"))
        else:
            r.update(timing.fields())
            sec = timing.median_ms * 1e-3
            if bytes is not None:
                r["bytes"] = int(bytes)
                r["GB/s"] = round(bytes / sec / 1e9, 2) if sec > 0 else None
            if flops is not None:
                r["flops"] = int(flops)
                r["TFLOP/s"] = round(flops / sec / 1e12, 3) if sec > 0 else None
        if self.sampler is not None and self.sampler.available:
            r["gpu"] = self.sampler.last()
        self.rows.append(r)
        self._write(complete=False)
        return r

    def _payload(self, complete: bool) -> dict:
        env = dict(self.env, **({"gpu_samples": self.sampler.summary()} if self.sampler is not None else {}))
        return {"bench": self.name, "complete": complete, "env": env, "argv": sys.argv[1:],
                "args": {k: v for k, v in vars(self.args).items() if v is None or isinstance(v, _JSONABLE)},
                "meta": self.meta, "rows": self.rows}

    def _write(self, complete: bool) -> None:
        out = getattr(self.args, "out", None)
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out + ".tmp", "w") as f:
                json.dump(self._payload(complete), f, indent=1, default=str)
            os.replace(out + ".tmp", out)

    def table(self, columns: list[str] | None = None, rows: list[dict] | None = None, only: bool = False) -> str:
        """Text table of ``rows``: ``columns`` first, then every other field (``only``: just ``columns``)."""
        rows = self.rows if rows is None else rows
        if not rows:
            return "no rows"
        cols = list(columns or [k for k in rows[0] if k not in _HIDDEN])
        for r in rows if not (only and columns) else []:
            cols += [k for k in r if k not in cols and k not in _HIDDEN]
        widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
        lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
        lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
        return "\n".join(lines)

    def finish(self, columns: list[str] | None = None, only: bool = False) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.rows:
            print(f"# {self.name} on {self.env['device']} (torch {self.env['torch']}, triton {self.env['triton']}, "
                  f"commit {self.env['commit'][:12]})")
        print(self.table(columns, only=only))
        self._write(complete=True)
        if self.rows and getattr(self.args, "out", None):
            print(f"wrote {self.args.out}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
