"""Shared benchmark harness: trusted timing, environment capture, GB/s and TFLOP/s, JSON rows.

Usage in a ``bench_<op>.py``::

    from benchmarks._harness import Bench, parser, time_fn
    bench = Bench("kv_cache", args)            # args from parser() (--out, --smoke, --reps, --warmup, --l2-flush)
    t = time_fn(lambda: op(...), bench)        # -> Timing(median_ms, p20_ms, p80_ms, n, method, inner, ...)
    bench.row(impl="triton", shape=..., timing=t, bytes=nbytes, flops=None, extra...)
    bench.finish()                              # prints a table, writes JSON (device, versions, commit, GPU samples)

How :func:`time_fn` times on a GPU (the host's launch time never enters a device timing):

* **batch** (default): ``inner`` back-to-back calls between two CUDA events, no host sync inside; per-call
  time = batch time / ``inner``. A device-side spin (``torch.cuda._sleep``) sized from the host time of one
  call is queued before the start event, so the host has launched the batch before the GPU reaches it:
  what is measured is device time, not the host's launch gaps. ``inner`` is chosen so a batch lasts about
  1 ms (``--inner`` overrides).
* **per call + L2 flush**: for small working sets the batch would run from a warm L2, so each call is
  preceded by a write of a buffer larger than L2, then the spin, then events around that one call.
  ``--l2-flush auto`` (default) does this when the op's counted bytes (``nbytes=``) are below
  ``--l2-flush-below`` MB (default 4x the L2 size); a call that gives no byte count is always timed this
  way, so that every peer of a point is timed alike whatever its speed (for working sets far larger than
  L2 the flush changes nothing but the run time); ``on`` / ``off`` force it.
* **per call** (``setup=`` given): ``setup`` (e.g. restoring a buffer the op mutates) is queued before the
  spin and the start event, so it is never timed.

All repetitions are queued and the host synchronises once at the end. Reported: the median per-call time
over repetitions, its 20th/80th percentiles, the method, ``inner`` and the host time of one call
(``host_ms``: how long the Python call takes to return; a call that syncs inside returns late).
:func:`time_graph` does the same with a CUDA graph of ``inner`` calls (launch cost removed).
:func:`time_host` measures host time per call with ``perf_counter`` on any machine (host-overhead
benchmarks). Without a GPU :func:`time_fn` uses the host clock (``--smoke`` runs: never results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch

from benchmarks.provenance import commit_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BATCH_TARGET_MS = 1.0        # a timed batch of back-to-back calls lasts about this long
MAX_INNER = 1000
MAX_SPIN_MS = 50.0


@dataclass
class Timing:
    """Per-call time of a timed function. ``median_ms`` / ``p20_ms`` / ``p80_ms`` over ``n`` repetitions.

    ``method``: ``events-batch``, ``events-call``, ``events-call+flush``, ``graph-batch``,
    ``graph-call+flush``, ``host-batch``, ``host-call``. ``inner``: calls per timed repetition.
    ``host_ms``: host time of one call (time for the Python call to return). ``l2_flush``: whether L2 was
    flushed before every call."""
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    method: str = "events-call"
    inner: int = 1
    host_ms: float | None = None
    l2_flush: bool = False

    def fields(self) -> dict:
        """The timing's fields as they go into a JSON row."""
        return {"median_ms": round(self.median_ms, 5), "p20_ms": round(self.p20_ms, 5),
                "p80_ms": round(self.p80_ms, 5), "reps": self.n, "timer": self.method, "inner": self.inner,
                "host_ms": None if self.host_ms is None else round(self.host_ms, 5), "l2_flush": self.l2_flush}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device: check the script runs")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per point")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up calls per point")
    p.add_argument("--inner", type=int, default=None,
                   help="back-to-back calls per timed repetition (default: enough for about 1 ms)")
    p.add_argument("--l2-flush", default="auto", choices=["auto", "on", "off"],
                   help="flush L2 before every timed call (auto: below --l2-flush-below MB, see _harness.py)")
    p.add_argument("--l2-flush-below", type=float, default=None,
                   help="auto flush threshold in MB of counted bytes (default: 4x the GPU's L2 size)")
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


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


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
        env["device"] = torch.cuda.get_device_name()
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["l2_bytes"] = getattr(props, "L2_cache_size", None)
        try:
            nv, h = _nvml_handle()
            env["driver"] = _s(nv.nvmlSystemGetDriverVersion())
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
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


class GpuSampler:
    """Samples SM/memory clocks, power, temperature, memory used and utilisation with NVML in a
    background thread every ``interval`` s while a benchmark runs. ``summary()``: min / median / max per
    metric; ``last()``: the latest sample. Does nothing (``available`` False, ``error`` set) where NVML or a
    GPU is missing."""

    METRICS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c", "mem_used_gib", "util_pct")

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[dict] = []
        self.error = None
        self._stop = threading.Event()
        self._thread = None
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
        return {"t": time.time(),
                "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
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
        if not self.samples:
            return None
        return {k: self.samples[-1][k] for k in self.METRICS}

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
_DEV: dict = {}


def _cycles_per_ms() -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond (measured once per process)."""
    if "cyc" not in _DEV:
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)  # warm the kernel
        a.record()
        torch.cuda._sleep(2_000_000)
        b.record()
        b.synchronize()
        _DEV["cyc"] = 2_000_000 / max(a.elapsed_time(b), 1e-3)
    return _DEV["cyc"]


def spin(ms: float) -> None:
    """Queue a device-side busy wait of about ``ms`` milliseconds (lets the host run ahead of the GPU)."""
    if ms > 0:
        torch.cuda._sleep(int(min(ms, MAX_SPIN_MS) * _cycles_per_ms()))


def l2_bytes() -> int:
    if "l2" not in _DEV:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        _DEV["l2"] = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    return _DEV["l2"]


def flush_l2() -> None:
    """Overwrite a buffer of max(256 MiB, 4x L2) so no input of the next call is still in L2."""
    buf = _DEV.get("flush")
    if buf is None:
        buf = _DEV["flush"] = torch.empty(max(256 * 2**20, 4 * l2_bytes()) // 4, dtype=torch.int32, device="cuda")
    buf.zero_()


def _stats(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def _args(bench):
    return bench.args if bench is not None else None


def _want_flush(bench, l2_flush, nbytes) -> bool:
    if l2_flush is not None:
        return bool(l2_flush)
    a = _args(bench)
    mode = getattr(a, "l2_flush", "auto") if a is not None else "auto"
    if mode != "auto":
        return mode == "on"
    if nbytes is None:
        return True
    below = getattr(a, "l2_flush_below", None) if a is not None else None
    return nbytes < (below * 2**20 if below is not None else 4 * l2_bytes())


def _reps_warmup(bench, reps, warmup):
    a = _args(bench)
    reps = reps if reps is not None else (a.reps if a is not None else 50)
    warmup = warmup if warmup is not None else (a.warmup if a is not None else 10)
    if a is not None and getattr(a, "smoke", False):
        reps, warmup = min(reps, 3), min(warmup, 1)
    return max(1, reps), max(0, warmup)


def _auto_inner(bench, inner, one_call_ms) -> int:
    a = _args(bench)
    if inner is None and a is not None:
        inner = getattr(a, "inner", None)
    if inner is not None:
        return max(1, int(inner))
    if a is not None and getattr(a, "smoke", False):
        return 1
    return max(1, min(MAX_INNER, math.ceil(BATCH_TARGET_MS / max(one_call_ms, 1e-4))))


def _host_call_ms(fn, setup) -> float:
    """Host time of one call (median of 3; the call is not synchronised)."""
    ts = []
    for _ in range(3):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def time_fn(fn, bench: "Bench | None" = None, *, reps: int | None = None, warmup: int | None = None,
            setup=None, inner: int | None = None, l2_flush: bool | None = None,
            nbytes: float | None = None) -> Timing:
    """Per-call time of ``fn()`` (see the module docstring for the method).

    Args:
        fn: the call to time (no arguments).
        bench: supplies ``--reps``, ``--warmup``, ``--inner``, ``--l2-flush``, ``--smoke`` (optional).
        setup: untimed, run before every call (forces per-call timing).
        inner: back-to-back calls per timed repetition (default: about 1 ms worth; 1 with ``setup``).
        l2_flush: force the flush on/off (default: ``--l2-flush``; auto: by ``nbytes``, on without it).
        nbytes: bytes the op moves, for the automatic L2-flush choice (give the same to every peer).
    """
    reps, warmup = _reps_warmup(bench, reps, warmup)
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    if not torch.cuda.is_available():
        return _time_host_clock(fn, bench, reps, setup, inner)
    torch.cuda.synchronize()
    host = _host_call_ms(fn, setup)
    torch.cuda.synchronize()
    flush = _want_flush(bench, l2_flush, nbytes)
    if flush or setup is not None:
        return _per_call(fn, reps, setup, flush, host, "events")
    one = _one_call_ms(fn, setup, host)
    n_in = _auto_inner(bench, inner, one)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        spin(1.5 * n_in * host + 0.05)
        starts[r].record()
        for _ in range(n_in):
            fn()
        ends[r].record()
    torch.cuda.synchronize()
    med, p20, p80 = _stats([s.elapsed_time(e) / n_in for s, e in zip(starts, ends)])
    return Timing(med, p20, p80, reps, "events-batch", n_in, host, False)


def _one_call_ms(fn, setup, host_ms) -> float:
    if setup:
        setup()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    spin(1.5 * host_ms + 0.05)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def _per_call(fn, reps, setup, flush, host_ms, kind) -> Timing:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        if setup:
            setup()
        if flush:
            flush_l2()
        spin(1.5 * host_ms + 0.05)
        starts[r].record()
        fn()
        ends[r].record()
    torch.cuda.synchronize()
    med, p20, p80 = _stats([s.elapsed_time(e) for s, e in zip(starts, ends)])
    return Timing(med, p20, p80, reps, f"{kind}-call" + ("+flush" if flush else ""), 1, host_ms, flush)


def _time_host_clock(fn, bench, reps, setup, inner) -> Timing:
    """Host-clock timing (no GPU): batches of ``inner`` calls, or one call after ``setup``."""
    if setup is not None:
        times = []
        for _ in range(reps):
            setup()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        med, p20, p80 = _stats(times)
        return Timing(med, p20, p80, reps, "host-call", 1, med, False)
    if inner is None and not getattr(_args(bench), "smoke", False) and getattr(_args(bench), "inner", None) is None:
        t0 = time.perf_counter()
        fn()
        inner = _auto_inner(bench, None, (time.perf_counter() - t0) * 1e3)
    n_in = _auto_inner(bench, inner, 1.0)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n_in):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / n_in)
    med, p20, p80 = _stats(times)
    return Timing(med, p20, p80, reps, "host-batch", n_in, med, False)


def time_host(fn, bench: "Bench | None" = None, *, reps: int | None = None, warmup: int | None = None,
              inner: int | None = None, sync: bool = False) -> Timing:
    """Host time per call of ``fn()`` with ``perf_counter``: ``inner`` back-to-back calls per repetition,
    median over repetitions. On a GPU the calls are asynchronous: this is the time to *issue* them (the
    host overhead of an op), unless ``sync=True`` adds a ``torch.cuda.synchronize()`` after each batch
    (then it is wall time). Valid on any machine (host microseconds per call)."""
    reps, warmup = _reps_warmup(bench, reps, warmup)
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    n_in = _auto_inner(bench, inner, _host_call_ms(fn, None))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n_in):
            fn()
        if sync and cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3 / n_in)
        if cuda and not sync:
            torch.cuda.synchronize()  # drain the queue between repetitions (untimed)
    med, p20, p80 = _stats(times)
    return Timing(med, p20, p80, reps, "host-batch", n_in, med, False)


def time_graph(fn, bench: "Bench | None" = None, *, reps: int | None = None, inner: int | None = None,
               l2_flush: bool | None = None, nbytes: float | None = None) -> Timing:
    """Per-call time of ``fn`` replayed from a CUDA graph (launch overhead removed): a graph of ``inner``
    back-to-back calls replayed between two events, or, with the L2 flush, a graph of one call replayed
    after each flush. Host-clock :func:`time_fn` off-GPU."""
    if not torch.cuda.is_available():
        return time_fn(fn, bench, reps=reps, inner=inner)
    reps, _ = _reps_warmup(bench, reps, 0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g1 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1):
        fn()
    g1.replay()
    torch.cuda.synchronize()
    host = _host_call_ms(g1.replay, None)
    if _want_flush(bench, l2_flush, nbytes):
        return _per_call(g1.replay, reps, None, True, host, "graph")
    one = _one_call_ms(g1.replay, None, host)
    n_in = _auto_inner(bench, inner, one)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_in):
            fn()
    g.replay()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        spin(0.05)
        starts[r].record()
        g.replay()
        ends[r].record()
    torch.cuda.synchronize()
    med, p20, p80 = _stats([a.elapsed_time(b) / n_in for a, b in zip(starts, ends)])
    return Timing(med, p20, p80, reps, "graph-batch", n_in, host, False)


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


# ---- progress ----------------------------------------------------------------------------------------------
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
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150) + ("\n" if self.done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---- rows and output ---------------------------------------------------------------------------------------
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
        env = dict(self.env)
        if self.sampler is not None:
            env["gpu_samples"] = self.sampler.summary()
        return {"bench": self.name, "complete": complete, "env": env, "argv": sys.argv[1:],
                "args": {k: v for k, v in vars(self.args).items() if _jsonable(v)}, "meta": self.meta,
                "rows": self.rows}

    def _write(self, complete: bool) -> None:
        out = getattr(self.args, "out", None)
        if not out:
            return
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self._payload(complete), f, indent=1, default=str)
        os.replace(tmp, out)

    def table(self, columns: list[str] | None = None, rows: list[dict] | None = None, only: bool = False) -> str:
        """Text table of ``rows``: ``columns`` first, then every other field (``only``: just ``columns``)."""
        rows = self.rows if rows is None else rows
        if not rows:
            return "no rows"
        cols = list(columns or [k for k in rows[0] if k not in _HIDDEN])
        for r in rows if not (only and columns) else []:
            for k in r:
                if k not in cols and k not in _HIDDEN:
                    cols.append(k)
        widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
        lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
        lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
        return "\n".join(lines)

    def finish(self, columns: list[str] | None = None, only: bool = False) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if not self.rows:
            print("no rows")
            self._write(complete=True)
            return
        print(f"# {self.name} on {self.env['device']} (torch {self.env['torch']}, triton {self.env['triton']}, "
              f"commit {self.env['commit'][:12]})")
        print(self.table(columns, only=only))
        self._write(complete=True)
        if getattr(self.args, "out", None):
            print(f"wrote {self.args.out}")


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, tuple))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
