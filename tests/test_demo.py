"""The README's first command: ``python -m pd_kernels demo`` on its built-in default and on ``--model PATH``."""
import subprocess
import sys

import pytest

from checkpoints import write_checkpoint


def _run(args, timeout=240):
    out = subprocess.run([sys.executable, "-m", "pd_kernels", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    return out.stdout


def test_demo_default_prints_plan_spans_and_stats():
    out = _run(["demo", "--plain", "--max-new-tokens", "64"])
    assert "round 1: plan" in out and "span 0" in out
    lines = [ln.split() for ln in out.splitlines()]
    table = {ln[0]: ln for ln in lines if ln and ln[0] in ("pd", "ar") and len(ln) >= 8}
    assert set(table) == {"pd", "ar"}, out
    pd_path, ar_path = int(table["pd"][1]), int(table["ar"][1])
    assert 0 < pd_path < ar_path  # the forced plan gives PD a shorter critical path than AR
    assert f"critical path: pd {pd_path} vs AR {ar_path} steps ({ar_path / pd_path:.2f}x fewer" in out


@pytest.mark.parametrize("mode", ["pd", "ar"])
def test_demo_with_model_path(tmp_path, mode):
    """``--model PATH`` loads a Dream checkpoint into the transformers Qwen2 classes plus its tokenizer (which holds
    the PD control tags: their ids are read from it by text), and decodes with the model's own (random) plan:
    whatever it writes, the run ends with a finish reason."""
    write_checkpoint(tmp_path, "dream")
    out = _run(["demo", "--plain", "--model", str(tmp_path), "--mode", mode, "--max-new-tokens", "12",
                "--no-baseline", "--device", "cpu"])
    assert str(tmp_path) in out and "prompt: Give three tips" in out
    assert "answer (" in out, out
    assert "note:" not in out  # every tag was found in the tokenizer: no stand-ins


def test_demo_check_batch_reports_identical():
    """``--check-batch``: 8 requests of different lengths and plans, alone vs together vs joining, greedy and
    sampled (a seed per request), dynamic and static step: every case reports identical tokens."""
    out = _run(["demo", "--plain", "--max-new-tokens", "24", "--no-baseline", "--check-batch"], timeout=600)
    cases = [ln.split() for ln in out.splitlines() if ln.startswith("  greedy") or ln.startswith("  sampled")]
    assert len(cases) == 4, out
    assert {(c[0], c[-2]) for c in cases} == {
        ("greedy", "dynamic"), ("greedy", "static"), ("sampled", "dynamic"), ("sampled", "static")}, out
    assert all(c[-1] == "identical" for c in cases), out
