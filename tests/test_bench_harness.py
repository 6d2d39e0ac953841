"""The benchmark runner (benchmarks/_harness.py): the library timers it delegates to, rows, JSON, the commit,
NVML sampling; the progress line and the dynamo guards of the scripts that own them. Host-clock paths run
without a GPU; ``gpu``-marked tests check the do_bench / do_bench_cudagraph paths on one."""
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _harness as h  # noqa: E402

cpu_only = pytest.mark.cpu_only   # the host-clock paths: skipped where a GPU is present (tests/conftest.py)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()   # a --smoke Bench sets one thread for the process: restore it
    yield
    torch.set_num_threads(n)


def _args(*extra):
    return h.parser("t").parse_args(list(extra))


@cpu_only
def test_time_fn_without_gpu_is_torch_timer_per_call():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    t = h.time_fn(fn)   # blocked_autorange: torch picks the samples and the calls per sample
    assert t.method == "torch-timer" and t.n >= 1 and t.inner >= 1 and len(calls) >= t.n * t.inner
    assert 1.9 <= t.p20_ms <= t.median_ms <= t.p80_ms < 50   # milliseconds per call
    assert t.host_ms is None and t.l2_flush is False


def test_time_host_samples_of_inner_calls():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    t = h.time_host(fn, reps=5, inner=4)
    assert t.method == "torch-timer" and (t.n, t.inner) == (5, 4) and len(calls) >= 5 * 4
    assert 1.9 <= t.p20_ms <= t.median_ms <= t.p80_ms < 50   # per call, not per sample of 4


def test_time_host_setup_is_not_timed():
    done = []

    def setup():
        time.sleep(0.02)
        done.append(1)

    t = h.time_host(lambda: time.sleep(0.001), reps=3, setup=setup)
    assert t.inner == 1 and t.n == 3 and len(done) >= 3
    assert t.median_ms < 15


def test_time_host_thread_time_ignores_sleep():
    t = h.time_host(lambda: time.sleep(0.002), reps=3, inner=2, timer=time.thread_time)
    assert t.median_ms < 1.0   # a sleeping thread uses no CPU


@cpu_only
def test_time_host_reads_bench_arguments():
    n = []
    t = h.time_host(lambda: n.append(1), h.Bench("t", _args("--reps", "4"), sample_gpu=False), inner=3)
    assert (t.n, t.inner) == (4, 3) and len(n) >= 12
    smoke = h.Bench("t", _args("--smoke"), sample_gpu=False)
    t = h.time_host(lambda: None, smoke)
    assert t.n == 1 and t.inner == 1
    assert torch.get_num_threads() == 1 and smoke.env["torch_threads"] == 1
    t = h.time_host(lambda: sum(range(100)))    # no count given: blocked_autorange picks the calls per sample
    assert t.n >= 1 and t.inner >= 1 and t.median_ms > 0


@cpu_only
def test_time_graph_without_gpu_uses_the_host_timer():
    t = h.time_graph(lambda: None, h.Bench("t", _args("--smoke"), sample_gpu=False))
    assert t.method == "torch-timer" and t.n == 1


@pytest.mark.gpu
def test_do_bench_paths_on_gpu():
    x = torch.empty(1 << 24, device="cuda")
    y = torch.empty_like(x)
    bench = h.Bench("t", _args("--smoke"), sample_gpu=False)
    t = h.time_fn(lambda: y.copy_(x), bench)
    assert t.method == "do_bench" and t.l2_flush and t.n > 1 and 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.host_ms is not None and t.host_ms > 0
    s = h.time_fn(lambda: y.copy_(x), bench, setup=lambda: x.add_(1))
    assert s.method == "do_bench-setup" and s.median_ms < 10 * t.median_ms + 0.05
    g = h.time_graph(lambda: y.copy_(x), bench)
    assert g.method == "do_bench_cudagraph" and g.median_ms > 0 and not g.l2_flush


def test_spread_and_timing_fields():
    assert h.spread([5.0, 1.0, 2.0, 4.0, 3.0]) == (3.0, 2.0, 5.0)
    t = h.Timing(1.0, 0.5, 2.0, 7)       # the original four fields still construct a Timing
    f = t.fields()
    assert f["median_ms"] == 1.0 and f["reps"] == 7 and f["timer"] == "do_bench" and f["inner"] == 1
    t = h.Timing.of([3.0, 1.0, 2.0], "torch-timer", inner=4)
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.n, t.inner) == (2.0, 1.0, 3.0, 3, 4)


def test_bench_rows_json_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "sub" / "b.json"
    bench = h.Bench("demo", _args("--out", str(out)), sample_gpu=False)
    bench.meta["workload"] = {"seed": 1}
    r = bench.row(impl="x", timing=h.Timing(2.0, 1.0, 3.0, 5, "torch-timer", 10, 2.0), bytes=4e9, flops=8e12,
                  shape="s")
    assert r["GB/s"] == 2000.0 and r["TFLOP/s"] == 4000.0 and r["timer"] == "torch-timer"
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and len(partial["rows"]) == 1      # written after every row
    bench.row(impl="y", timing=None, error="boom")
    bench.finish(["impl", "median_ms"])
    data = json.loads(out.read_text())
    assert data["complete"] is True and [x["impl"] for x in data["rows"]] == ["x", "y"]
    assert data["meta"] == {"workload": {"seed": 1}} and data["args"]["out"] == str(out)
    for k in ("torch", "triton", "commit", "device", "date", "python", "cuda", "torch_threads"):
        assert k in data["env"]
    printed = capsys.readouterr().out
    assert "impl" in printed and "boom" in printed and "timer" not in printed


@cpu_only
def test_gpu_sampler_without_gpu():
    s = h.GpuSampler(interval=0.01).start()
    s.stop()
    assert not s.available and s.error and s.last() is None
    assert s.summary()["available"] is False


def test_progress_lines():
    from benchmarks.bench_decoder import Progress

    buf = io.StringIO()
    p = Progress(3, "demo", every=3600, stream=buf)
    for i in range(3):
        p.update(f"step {i}")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[demo] 3/3 step 2")   # throttled, last one printed


def test_strict_dynamo_makes_a_fallback_an_error():
    """Past the recompile limit dynamo would silently run eager; strict_dynamo turns that into an error,
    and dynamo_compiled_frames tells a compiled call from an eager one."""
    import torch._dynamo.config as c

    from benchmarks.bench_span_attention import dynamo_compiled_frames, strict_dynamo

    saved = {k: getattr(c, k) for k in ("recompile_limit", "accumulated_recompile_limit",
                                        "fail_on_recompile_limit_hit") if hasattr(c, k)}
    try:
        done = strict_dynamo(recompile_limit=2)
        assert True in done.values() and 2 in done.values()
        torch._dynamo.reset()
        f = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
        before = dynamo_compiled_frames()
        f(torch.ones(3))
        assert dynamo_compiled_frames() > before
        f(torch.ones(4))
        with pytest.raises(Exception, match="(?i)limit"):
            f(torch.ones(5))
    finally:
        for k, v in saved.items():
            setattr(c, k, v)
        torch._dynamo.reset()


def test_commit_stamp_round_trip_and_staleness(tmp_path):
    """benchmarks/provenance.py: a stamp written here vouches for this tree; a changed file makes it say so."""
    from benchmarks import provenance as pv

    if pv.git_commit() is None:
        pytest.skip("needs a git checkout")
    stamp = tmp_path / "COMMIT"
    head = pv.write_stamp(str(stamp))
    assert pv.stamp_commit(str(stamp)) == head
    # a copy of the tree as stamped, then changed: the stamp is no longer believed as is
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("one")
    h = pv._sha256("a.txt", str(tmp_path / "t"))
    stamp.write_text(f"commit abc123\ndirty 1\n{h}  a.txt\n")
    assert pv.stamp_commit(str(stamp), str(tmp_path / "t")) == "abc123-dirty"
    (tmp_path / "t" / "a.txt").write_text("two")
    assert pv.stamp_commit(str(stamp), str(tmp_path / "t")) == "abc123-modified"
    assert pv.stamp_commit(str(tmp_path / "missing")) is None


def test_gpu_check_plan_fits():
    """benchmarks/gpu_check.sh --plan: both commands fit their budgets and 8 files, every file they run exists."""
    import subprocess

    for extra, budget in (([], 420), (["--second"], 180)):
        out = subprocess.run(["bash", os.path.join(h.ROOT, "benchmarks", "gpu_check.sh"), "--plan", *extra],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        last = out.stdout.strip().splitlines()[-1]
        assert last.startswith("plan: ") and f"budget {budget} s, 3 files" in last, last
