"""The trained tiny planned-diffusion model: a short training run (smoke, determinism, files), and the
shipped checkpoint decoding 20 fixed held-out prompts greedily with the torch backend."""
import dataclasses
import json
import os

import pytest
import torch

from pd_kernels.models import load_tiny_pd, tiny_pd_path
from pd_kernels.tiny import evaluate, task
from pd_kernels.tiny.checkpoint import META_FILE, load
from pd_kernels.tiny.train import TrainConfig, train

# What the README states for the shipped model on these 20 prompts (greedy, r = 1, schedule policy).
# A broken decoder, kernel or checkpoint lowers it; the assertion is exact so a change is noticed.
SHIPPED_PD_CORRECT_OF_20 = 20


def _smoke_cfg(**kw):
    return TrainConfig(steps=4, batch_size=6, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                       num_kv_heads=1, warmup=2, **kw)


def test_train_smoke_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    res = train(_smoke_cfg(), str(out), progress=False, log_every=2)
    for f in ("config.json", "model.safetensors", "vocab.json", "tokenizer.json", META_FILE):
        assert (out / f).is_file(), f
    meta = json.loads((out / META_FILE).read_text())
    assert meta["length_scale"] == task.LENGTH_SCALE and meta["train_config"]["steps"] == 4
    h = res["history"]
    assert h["step"] == [2, 4] and all(torch.isfinite(torch.tensor(h["loss"])))
    try:
        import matplotlib  # noqa: F401
        assert (out / "loss.png").is_file() and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        assert not (out / "loss.png").exists()
    tp = load(str(out))
    ex = evaluate.held_out(2)
    for mode in ("ar", "pd", "pd-da", "diffusion"):   # an untrained model decodes to the end, whatever it writes
        rows = evaluate.decode(tp, ex, mode, max_new_tokens=24)
        assert len(rows) == 2 and all(r["finish"] for r in rows)


def test_train_and_eval_commands(tmp_path, capsys):
    """``python -m pd_kernels train`` (the defaults' model, 2 steps) and ``eval`` on what it wrote."""
    from pd_kernels.__main__ import main

    out = tmp_path / "ckpt"
    assert main(["train", "--out", str(out), "--steps", "2", "--batch-size", "4", "--eval", "0",
                 "--no-progress"]) == 0
    meta = json.loads((out / META_FILE).read_text())
    want = {**dataclasses.asdict(TrainConfig()), "steps": 2, "batch_size": 4}
    assert meta["train_config"] == json.loads(json.dumps(want))   # as JSON keeps it (tuples become lists)
    assert main(["eval", "--model", str(out), "--n", "2", "--quick", "--out", str(tmp_path / "q"),
                 "--device", "cpu"]) == 0
    doc = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert {r["mode"] for r in doc["rows"]} == {"ar", "pd", "pd-da", "diffusion"}
    assert all(r["n"] == 2 and 0 <= r["accuracy"] <= 1 and r["critical_path"] > 0 for r in doc["rows"])
    assert "| mode | policy |" in capsys.readouterr().out
    assert main(["train", "--out", str(out), "--steps", "0"]) == 1   # one error line, not a traceback
    assert "pd-kernels: error: --steps" in capsys.readouterr().err


def test_train_is_deterministic_for_a_seed():
    a = train(_smoke_cfg(), None, progress=False)["model"]
    b = train(_smoke_cfg(), None, progress=False)["model"]
    c = train(_smoke_cfg(seed=1), None, progress=False)["model"]
    pa, pb, pc = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_load_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=META_FILE):
        load(str(tmp_path))


def test_shipped_checkpoint_is_small_and_complete():
    path = tiny_pd_path()
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert total <= 8 * 1024 * 1024
    for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", META_FILE, "loss.png"):
        assert os.path.isfile(os.path.join(path, f)), f


@pytest.fixture(scope="module")
def shipped(one_thread):
    return load_tiny_pd()


@pytest.fixture(scope="module")
def prompts():
    return evaluate.held_out(20)


def test_shipped_model_pd_accuracy_on_20_held_out_prompts(shipped, prompts):
    rows = evaluate.decode(shipped, prompts, "pd", backend="torch")
    assert sum(r["plan_errors"] for r in rows) == 0
    assert sum(r["correct"] for r in rows) == SHIPPED_PD_CORRECT_OF_20, [r["answer"] for r in rows]
