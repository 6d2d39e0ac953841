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


def test_demo_default_runs_the_shipped_model_and_checks_its_answer():
    """The default: the shipped tiny planned-diffusion model writes its own plan (no forced plan) on a held-out
    prompt; the answer is checked against the task's ground truth and every mode is compared on the prompt."""
    from pd_kernels.cli.demo import TINY_PD_PROMPT
    from pd_kernels.tiny import task

    out = _run(["demo", "--plain"])
    assert "tiny planned-diffusion model (shipped)" in out
    assert "round 1: plan <promise>-<topic>" in out and "span 0" in out and "span 1" in out
    ex = task.parse_prompt(TINY_PD_PROMPT)
    truth = [ln for ln in out.splitlines() if ln.startswith("ground truth: ")]
    assert len(truth) == 1 and truth[0].startswith("ground truth: " + " ".join(ex.answer) + "  -> ")
    verdict = truth[0].rsplit("-> ", 1)[1]
    answer = next(ln for ln in out.splitlines() if ln.startswith("answer ("))
    assert verdict == ("correct" if ex.check(answer.split(": ", 1)[1]) else "WRONG")
    table = {ln.split()[0]: ln.split() for ln in out.splitlines()
             if ln.split() and ln.split()[0] in ("ar", "pd", "pd-da", "diffusion") and len(ln.split()) >= 9}
    assert set(table) == {"ar", "pd", "pd-da", "diffusion"}, out
    assert all(row[1] in ("ok", "WRONG") for row in table.values())
    assert f"critical path: pd {table['pd'][2]} vs AR {table['ar'][2]} steps" in out
    # the default prompt is held out of training and shows the trade: every mode right, PD in fewer forwards
    assert task.is_held_out(ex) and "policy: threshold (tau 0.999)" in out
    assert all(row[1] == "ok" for row in table.values()), out
    assert int(table["pd"][2]) < int(table["ar"][2]) and "x fewer sequential forward passes than AR" in out


def test_demo_task_prompt_and_bad_task_prompt():
    out = _run(["demo", "--plain", "--prompt", "rev a b", "--mode", "ar", "--no-baseline"])
    assert "ground truth: b a ;" in out
    bad = subprocess.run([sys.executable, "-m", "pd_kernels", "demo", "--prompt", "rev a b c d"],
                         capture_output=True, text=True, timeout=240)
    assert bad.returncode == 1 and "pd-kernels: error: --prompt: part 1 has 4 letters" in bad.stderr


def test_demo_random_model_prints_plan_spans_and_stats():
    out = _run(["demo", "--model", "random", "--plain", "--max-new-tokens", "64"])
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
