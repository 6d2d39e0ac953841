"""The end-to-end suite (benchmarks/bench_decoder.py) in smoke mode on CPU: it runs, its JSON holds what the
README says, its numbers are consistent with the workload, and the report writes its summary."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_decoder, report  # noqa: E402
from benchmarks.workload import WorkloadParams, diffusion_length, make_workload  # noqa: E402
from pd_kernels.models import TINY_TAGS  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("bench") / "decoder.json"
    try:
        bench_decoder.main(["--smoke", "--out", str(out), "--modes", "ar,pd,diffusion", "--peer-modes", "ar,pd",
                            "--sweep", "short", "--sweep-requests", "1"])
    finally:
        torch.set_num_threads(n)
    return out, json.loads(out.read_text())


def _rows(data, **kw):
    return [r for r in data["rows"] if all(r.get(k) == v for k, v in kw.items())]


def test_json_has_environment_workload_and_rows(run):
    _, data = run
    assert data["complete"] is True and data["bench"] == "decoder"
    assert data["env"]["device"].startswith("cpu (") and "gpu_samples" in data["env"]
    meta = data["meta"]
    assert meta["workload"]["params"]["seed"] == 0 and meta["workload"]["stats"]["requests"] == 2
    assert meta["model"]["name"] == "tiny" and meta["model"]["weight_bytes_per_step"] > 0
    assert meta["ceilings"]["copy_bytes_per_s"] > 0 and meta["ceilings"]["matmul_flops_per_s"] > 0
    assert {r["impl"] for r in _rows(data, part="ceiling")} == {"copy", "matmul"}
    impls = {(r["impl"], r["batch"]) for r in _rows(data, part="main")}
    assert impls == {(m + v, b) for m in ("ar", "pd", "diffusion") for v in ("", "+static") for b in (1, 2)}
    assert {r["mode"] for r in _rows(data, impl="reference-loop")} == {"ar", "pd"}
    assert {(r["policy"], r["steps_ratio"], r["tau"]) for r in _rows(data, part="sweep")} == {
        ("schedule", 0.25, 0.9), ("schedule", 1.0, 0.9), ("pd_threshold", 1.0, 0.9), ("threshold", 1.0, 0.5),
        ("threshold", 1.0, 0.9)}


def test_critical_paths_are_the_workloads(run):
    _, data = run
    reqs = make_workload(WorkloadParams.smoke(seed=0), TINY_TAGS, 256)
    D = diffusion_length(reqs)
    for mode in ("ar", "pd", "diffusion"):
        want = sum(r.critical_path(mode, TINY_TAGS, 0.5, D) for r in reqs) / len(reqs)
        for r in _rows(data, part="main", mode=mode) + _rows(data, impl="reference-loop", mode=mode):
            assert r["critical_path"] == pytest.approx(want)
            assert r["cp_prefill"] + r["cp_plan"] + r["cp_diffusion"] == pytest.approx(want)
    ar = _rows(data, part="main", impl="ar", batch=1)[0]
    pd = _rows(data, part="main", impl="pd", batch=1)[0]
    assert pd["cp_vs_ar"] == pytest.approx(ar["critical_path"] / pd["critical_path"], rel=1e-3)
    assert ar["vs_ar"] == 1.0


def test_same_tokens_everywhere(run):
    """fp32: the reference loop, the static step and batch 2 all give the dynamic batch-1 tokens."""
    _, data = run
    for r in _rows(data, part="main"):
        if r["batch"] == 1 and r["mode"] in ("ar", "pd"):
            assert r["tokens_match_reference"] == 1.0
        if r["variant"] != "dynamic":
            assert r["tokens_match_dynamic"] == 1.0
        if r["batch"] > 1:
            assert r["tokens_match_batch1"] == 1.0


def test_floor_and_speedup_fields(run):
    _, data = run
    for r in _rows(data, part="main", batch=1):
        assert r["wall_p20_ms"] <= r["wall_ms"] <= r["wall_p80_ms"]
        assert r["floor_ratio"] == pytest.approx(r["ms_per_step"] / r["floor_ms_per_step"], rel=2e-3)
        assert r["roofline_ratio"] is not None and r["roofline_ratio"] <= r["floor_ratio"] * 1.001
        assert r["tok_per_s"] > 0
    for r in _rows(data, part="main", mode="pd", batch=1):
        assert r["vs_reference"] > 0 and "plan_ms_per_step" in r and "diffusion_floor_ratio" in r


def test_report(run, tmp_path):
    path, data = run
    md = report.summary_markdown(data)
    assert "not results" in md and "| pd |" in md and "Knob sweep" in md and "Goals" not in md
    report.main([str(path), "--to", str(tmp_path / "r")])
    assert (tmp_path / "r.md").read_text().startswith("### Decoder end to end")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("speedup", "floor", "sweep"):
        assert (tmp_path / f"r_{name}.png").stat().st_size > 1000


def test_bad_arguments():
    with pytest.raises(SystemExit, match="unknown mode"):
        bench_decoder.main(["--smoke", "--modes", "ar,fast"])
    with pytest.raises(SystemExit, match="include ar"):
        bench_decoder.main(["--smoke", "--modes", "pd"])
    with pytest.raises(SystemExit, match="start with 1"):
        bench_decoder.main(["--batch", "8"])


def test_dream_shape_and_floor_bytes():
    """The random-weight Dream-7B model of the suite (built on the meta device here): SPEC section 2's shape,
    15.2 GB of bf16 weights, of which every step reads all but the input embedding."""
    args = bench_decoder.build_parser().parse_args(["--model", "dream", "--dtype", "bf16"])
    model, tags = bench_decoder.load_model(args, "meta")
    f = bench_decoder.model_facts(model)
    assert (f["layers"], f["hidden"], f["vocab"], f["dtype"]) == (28, 3584, 152064, "bfloat16")
    assert abs(f["param_bytes"] / 1e9 - 15.23) < 0.05
    assert f["param_bytes"] - f["weight_bytes_per_step"] == 152064 * 3584 * 2
    assert f["head_params"] == 152064 * 3584 and tags.mask == 151666
    cut = bench_decoder.load_model(bench_decoder.build_parser().parse_args(["--model", "dream", "--layers", "2",
                                                                            "--dtype", "bf16"]), "meta")[0]
    assert cut.config.num_hidden_layers == 2


def test_roofline_bound(run):
    """roofline_vs_ar is the ratio of the floors: AR's 1-token steps vs the mode's steps."""
    _, data = run
    for r in _rows(data, part="main", batch=1):
        assert r["roofline_vs_ar"] > 0
        if r["mode"] == "ar":
            assert r["roofline_vs_ar"] == 1.0
