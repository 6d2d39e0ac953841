"""The benchmark harness (benchmarks/_harness.py) on a machine without a GPU: timing, rows, JSON, progress,
NVML sampling, the dynamo guards of compiled peers."""
import io
import json
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _harness as h  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the host-clock paths (no GPU)")


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()   # a --smoke Bench sets one thread for the process: restore it
    yield
    torch.set_num_threads(n)


def _args(*extra):
    return h.parser("t").parse_args(list(extra))


def test_time_fn_batches_back_to_back_calls():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    t = h.time_fn(fn, reps=5, warmup=2, inner=4)
    assert t.method == "host-batch" and t.inner == 4 and t.n == 5
    assert len(calls) == 2 + 5 * 4
    assert 1.9 <= t.p20_ms <= t.median_ms <= t.p80_ms < 50   # per call, not per batch of 4
    assert t.host_ms == t.median_ms and t.l2_flush is False


def test_time_fn_setup_is_not_timed():
    def setup():
        time.sleep(0.02)

    t = h.time_fn(lambda: time.sleep(0.001), reps=3, warmup=1, setup=setup)
    assert t.method == "host-call" and t.inner == 1
    assert t.median_ms < 15


def test_time_fn_reads_bench_arguments():
    bench = h.Bench("t", _args("--reps", "4", "--warmup", "0", "--inner", "3"), sample_gpu=False)
    n = []
    t = h.time_fn(lambda: n.append(1), bench)
    assert (t.n, t.inner, len(n)) == (4, 3, 12)
    smoke = h.Bench("t", _args("--smoke"), sample_gpu=False)
    t = h.time_fn(lambda: None, smoke)
    assert t.n == 3 and t.inner == 1
    assert torch.get_num_threads() == 1 and smoke.env["torch_threads"] == 1


def test_time_host_and_graph_fallback():
    t = h.time_host(lambda: sum(range(100)), reps=3, warmup=1, inner=10)
    assert t.method == "host-batch" and t.inner == 10 and t.median_ms > 0
    t = h.time_graph(lambda: None, reps=2, inner=2)   # no GPU: host clock
    assert t.method == "host-batch"


def test_timing_fields_and_old_positional_form():
    t = h.Timing(1.0, 0.5, 2.0, 7)       # the original four fields still construct a Timing
    f = t.fields()
    assert f["median_ms"] == 1.0 and f["reps"] == 7 and f["timer"] == "events-call" and f["inner"] == 1


def test_bench_rows_json_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "sub" / "b.json"
    bench = h.Bench("demo", _args("--out", str(out)), sample_gpu=False)
    bench.meta["workload"] = {"seed": 1}
    r = bench.row(impl="x", timing=h.Timing(2.0, 1.0, 3.0, 5, "host-batch", 10, 2.0), bytes=4e9, flops=8e12,
                  shape="s")
    assert r["GB/s"] == 2000.0 and r["TFLOP/s"] == 4000.0 and r["timer"] == "host-batch"
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


def test_gpu_sampler_without_gpu():
    s = h.GpuSampler(interval=0.01).start()
    s.stop()
    assert not s.available and s.error and s.last() is None
    assert s.summary()["available"] is False


def test_progress_lines():
    buf = io.StringIO()
    p = h.Progress(3, "demo", every=3600, stream=buf)
    for i in range(3):
        p.update(f"step {i}")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[demo] 3/3 step 2")   # throttled, last one printed


def test_strict_dynamo_makes_a_fallback_an_error():
    """Past the recompile limit dynamo would silently run eager; strict_dynamo turns that into an error,
    and dynamo_compiled_frames tells a compiled call from an eager one."""
    import torch._dynamo.config as c

    saved = {k: getattr(c, k) for k in ("recompile_limit", "accumulated_recompile_limit",
                                        "fail_on_recompile_limit_hit") if hasattr(c, k)}
    try:
        done = h.strict_dynamo(recompile_limit=2)
        assert True in done.values() and 2 in done.values()
        torch._dynamo.reset()
        f = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
        before = h.dynamo_compiled_frames()
        f(torch.ones(3))
        assert h.dynamo_compiled_frames() > before
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
