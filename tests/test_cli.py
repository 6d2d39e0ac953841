"""``python -m pd_kernels``: every bad input ends in one clear line and a non-zero exit status, Ctrl-C exits 130
quietly, a closed output pipe prints no traceback, the control tags come from the checkpoint's tokenizer."""
import argparse
import os
import signal
import subprocess
import sys

import pytest
import torch

from checkpoints import PD_TAG_TEXTS, write_checkpoint
from pd_kernels.cli import COMMANDS, CLIError, build_parser, main
from pd_kernels.cli.demo import critical_path_line

HAS_GPU = torch.cuda.is_available()


def _main(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    """The one line of an error (transformers' weight-loading progress bars aside)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(lines) == 1 and lines[0].startswith("pd-kernels: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_critical_path_line_is_worded_right_either_way():
    assert critical_path_line("pd", 4, 6) == ("critical path: pd 4 vs AR 6 steps "
                                              "(1.50x fewer sequential forward passes than AR)")
    assert critical_path_line("pd", 6, 4) == ("critical path: pd 6 vs AR 4 steps "
                                              "(1.50x more sequential forward passes than AR)")
    assert critical_path_line("pd-da", 5, 5) == ("critical path: pd-da 5 vs AR 5 steps "
                                                 "(the same number of sequential forward passes as AR)")


def test_every_option_has_help():
    parsers = [build_parser()]
    for action in parsers[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
            assert set(action.choices) == set(COMMANDS)
    for p in parsers:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(c.help for c in COMMANDS.values())
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{p.prog} {action.option_strings} has no help"


@pytest.mark.parametrize("argv,match", [
    (["--length-scale", "0"], r"argument --length-scale: must be a finite number > 0\.0, got 0\.0"),
    (["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    (["--seed", "-2"], "--seed: must be >= 0"),
    (["--top-p", "0"], r"--top-p: must be a finite number \(0\.0, 1\.0\], got 0\.0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens: must be >= 1"),
    (["--max-new-tokens", "many"], "--max-new-tokens: invalid int value: 'many'"),
    (["--steps-ratio", "0"], "--steps-ratio: must be a finite number > 0"),
    (["--steps-ratio", "inf"], "--steps-ratio: must be a finite number > 0"),
    (["--tau", "1.5"], r"--tau: must be a finite number \[0\.0, 1\.0\] with confidence='prob', got 1\.5"),
    (["--temperature", "1e-40"], "argument --temperature: .*too small"),   # the op's bound: 1 / T a normal fp32
    (["--seed", str(2**63)], r"--seed: must be < 2\^63"),
    (["--tag", "nonsense"], "--tag: expected NAME=TOKEN or NAME=ID"),
    (["--tag", "maskk=5"], "--tag: unknown tag 'maskk'"),
    (["--mode", "fast"], "--mode: invalid choice"),
], ids=["length-scale-0", "temperature-negative", "seed-negative", "top-p-0", "max-new-negative", "max-new-text",
        "steps-ratio-0", "steps-ratio-inf", "tau", "temperature-tiny", "seed-huge", "tag-form", "tag-name", "mode"])
def test_bad_option_values_are_usage_errors(capsys, argv, match):
    import re

    with pytest.raises(SystemExit) as e:
        main(["demo", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pd-kernels demo") and "pd-kernels demo: error: argument " in err, err
    assert re.search(match, err) and "Traceback" not in err


@pytest.mark.parametrize("prompt", ["", "   \n\t "], ids=["empty", "whitespace"])
def test_empty_prompt(capsys, prompt):
    rc, out, err = _main(capsys, "demo", "--prompt", prompt, "--plain")
    assert rc == 1 and "--prompt is empty" in _one_error_line(err)


def test_tag_without_model(capsys):
    rc, out, err = _main(capsys, "demo", "--tag", "mask=5", "--plain")
    assert rc == 1 and "--tag applies to --model" in _one_error_line(err)


@pytest.mark.skipif(HAS_GPU, reason="checks the error on a machine without CUDA")
def test_device_cuda_without_a_gpu(capsys):
    rc, out, err = _main(capsys, "demo", "--device", "cuda", "--plain")
    assert rc == 1 and "no CUDA device" in _one_error_line(err)


def test_backend_that_cannot_run(capsys):
    rc, out, err = _main(capsys, "demo", "--device", "cpu", "--backend", "cuda", "--plain", "--no-baseline")
    assert rc == 1 and "backend 'cuda' unavailable" in _one_error_line(err)


def _bad_model_dirs(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text('{"model_type": "llama", "vocab_size": 64, "hidden_size": 16, '
                                           '"num_hidden_layers": 1, "num_attention_heads": 2}')
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no_such_family"}')
    dream_noweights = tmp_path / "dream"
    dream_noweights.mkdir()
    (dream_noweights / "config.json").write_text('{"model_type": "Dream", "vocab_size": 64, "hidden_size": 16, '
                                                 '"num_hidden_layers": 1, "num_attention_heads": 2}')
    return {"missing": (tmp_path / "nope", "no such file or directory"),
            "file": (tmp_path / "file.txt", "not a directory"),
            "not-a-checkpoint": (empty, r"not a checkpoint directory \(no config.json\)"),
            "bad-json": (broken, "config.json is not valid JSON"),
            "no-weights": (noweights, "cannot load the model in"),
            "unknown-family": (unknown, "cannot load the model in .*no_such_family"),
            "dream-no-weights": (dream_noweights, "no .safetensors weights")}


@pytest.mark.parametrize("case", ["missing", "file", "not-a-checkpoint", "bad-json", "no-weights", "unknown-family",
                                  "dream-no-weights"])
def test_bad_model_path(capsys, tmp_path, case):
    import re

    path, match = _bad_model_dirs(tmp_path)[case]
    rc, out, err = _main(capsys, "demo", "--model", str(path), "--plain", "--device", "cpu")
    assert rc == 1 and re.search(match, _one_error_line(err)), err


def test_model_without_tokenizer(capsys, tmp_path):
    write_checkpoint(tmp_path, "llama")
    for f in tmp_path.iterdir():
        if f.name.startswith("tokenizer"):
            f.unlink()
    rc, out, err = _main(capsys, "demo", "--model", str(tmp_path), "--plain", "--device", "cpu", "--mode", "ar")
    assert rc == 1 and "cannot load the tokenizer" in _one_error_line(err)


def test_unsupported_family_is_refused_by_name(capsys, tmp_path):
    write_checkpoint(tmp_path, "gpt_neox", pd_tags=False, eos="</s>")
    rc, out, err = _main(capsys, "demo", "--model", str(tmp_path), "--plain", "--device", "cpu", "--mode", "ar")
    assert rc == 1 and "model_type 'gpt_neox' has not been verified" in _one_error_line(err)


def test_traceback_flag_shows_the_exception(capsys):
    with pytest.raises(CLIError, match="prompt is empty"):
        main(["--traceback", "demo", "--prompt", " "])


# ---------------------------------------------------------------------------------------------------
# control tags from the checkpoint's tokenizer
# ---------------------------------------------------------------------------------------------------
def test_llama_checkpoint_without_pd_tags(capsys, tmp_path):
    """A Llama checkpoint whose tokenizer has no PD tags: PD is refused naming what is missing; AR runs with
    the tokenizer's EOS and prints exactly transformers' greedy answer."""
    from transformers import AutoModelForCausalLM

    tok = write_checkpoint(tmp_path, "llama", pd_tags=False, eos="</s>", vocab_size=len(PD_TAG_TEXTS) + 300)
    rc, out, err = _main(capsys, "demo", "--model", str(tmp_path), "--plain", "--device", "cpu")
    line = _one_error_line(err)
    assert rc == 1 and "no planned-diffusion control tag for" in line and "mask (<|mask|>)" in line
    assert "eos" not in line.split("tag for")[1].split(":")[0]  # EOS was found (the tokenizer's eos_token)

    n = 12
    rc, out, err = _main(capsys, "demo", "--model", str(tmp_path), "--plain", "--device", "cpu", "--mode", "ar",
                         "--max-new-tokens", str(n), "--prompt", "Give three tips")
    assert rc == 0, err
    assert "note: the tokenizer has no mask (<|mask|>)" in out
    answer = next(ln for ln in out.splitlines() if ln.startswith("answer ("))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = tok.encode("Give three tips")
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    if tok.eos_token_id in hf:
        hf = hf[:hf.index(tok.eos_token_id)]
    assert answer.split(": ", 1)[1] == tok.decode(hf)


def test_tag_ids_outside_the_model_vocabulary(capsys, tmp_path):
    write_checkpoint(tmp_path, "llama", pd_tags=True)
    rc, out, err = _main(capsys, "demo", "--model", str(tmp_path), "--plain", "--device", "cpu",
                         "--tag", "pad=100000", "--no-baseline")
    assert rc == 1 and "do not fit the model's vocabulary" in _one_error_line(err)


# ---------------------------------------------------------------------------------------------------
# Ctrl-C and closed pipes (subprocesses)
# ---------------------------------------------------------------------------------------------------
def _popen(*args):
    """The CLI in a child process whose SIGINT is the default one: a shell that starts a job in the background
    (``.ci/run &``) makes SIGINT ignored, the child would inherit that, and Python then never raises
    KeyboardInterrupt."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pd_kernels", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_exits_130_quietly():
    # --check-batch: seconds of work after the prompt line, so the signal always lands mid-run
    p = _popen("demo", "--plain", "--device", "cpu", "--check-batch")
    try:
        for line in p.stdout:
            if line.startswith("prompt:"):
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert err.strip() == "", err


@pytest.mark.parametrize("read_lines", [0, 2], ids=["closed-at-once", "head-2"])
def test_closed_pipe_prints_no_traceback(read_lines):
    """``demo | head -n 2`` (and a reader that never reads): no traceback, exit status 141 (SIGPIPE's)."""
    p = _popen("demo", "--plain", "--device", "cpu", "--max-new-tokens", "32")
    try:
        for _ in range(read_lines):
            p.stdout.readline()
        p.stdout.close()
        err = p.stderr.read()
        p.wait(timeout=240)
    finally:
        p.kill()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert p.returncode == 141, err


def test_edge_values_that_used_to_fail_or_overrun(capsys):
    """A steps ratio whose step count passes int32 decodes like ratio 1 (it ended in an overflow error from the
    device counters); --max-new-tokens caps a diffusion canvas too (the trained model's canvas of 26 ignored it)."""
    answers = []
    for ratio in ("1", "1e30"):
        rc, out, err = _main(capsys, "demo", "--steps-ratio", ratio, "--plain", "--no-baseline")
        assert rc == 0, err
        answers.append(next(ln for ln in out.splitlines() if ln.startswith("answer")))
    assert answers[0] == answers[1]
    rc, out, err = _main(capsys, "demo", "--mode", "diffusion", "--max-new-tokens", "6", "--policy", "schedule",
                         "--plain", "--no-baseline")
    assert rc == 0, err
    assert "answer (length):" in out and "\ndiffusion" in out
    row = next(ln for ln in out.splitlines() if ln.startswith("diffusion"))
    assert row.split()[1] == "7"   # critical path: the prefill and 6 diffusion steps (one token a step)
