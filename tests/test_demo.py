"""The README's first command: ``python -m pd_kernels demo`` on its built-in default and on ``--model PATH``."""
import json
import subprocess
import sys

import pytest
import torch


def _write_tiny_dream_checkpoint(path, vocab_size):
    """A Dream-format checkpoint (config ``model_type: Dream``, safetensors) with random weights, big enough
    a vocabulary for the Dream control-tag ids, and a byte-level BPE tokenizer trained on the spot."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    raw = {"model_type": "Dream", "architectures": ["DreamModel"], "vocab_size": vocab_size, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
           "tie_word_embeddings": False, "torch_dtype": "float32", "mask_token_id": 151666}
    (path / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["Give three tips for staying healthy.", "Eat well, sleep well, and move every day."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))


def _run(args, timeout=240):
    out = subprocess.run([sys.executable, "-m", "pd_kernels", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_demo_default_prints_plan_spans_and_stats():
    out = _run(["demo", "--plain", "--max-new-tokens", "64"])
    assert "round 1: plan" in out and "span 0" in out
    lines = [ln.split() for ln in out.splitlines()]
    table = {ln[0]: ln for ln in lines if ln and ln[0] in ("pd", "ar") and len(ln) >= 8}
    assert set(table) == {"pd", "ar"}, out
    pd_path, ar_path = int(table["pd"][1]), int(table["ar"][1])
    assert 0 < pd_path < ar_path  # the forced plan gives PD a shorter critical path than AR


@pytest.mark.parametrize("mode", ["pd", "ar"])
def test_demo_with_model_path(tmp_path, mode):
    """``--model PATH`` loads a Dream checkpoint into the transformers Qwen2 classes plus its tokenizer, and
    decodes with the model's own (random) plan: whatever it writes, the run ends with a finish reason."""
    _write_tiny_dream_checkpoint(tmp_path, vocab_size=151680)
    out = _run(["demo", "--plain", "--model", str(tmp_path), "--mode", mode, "--max-new-tokens", "12",
                "--no-baseline", "--device", "cpu"])
    assert str(tmp_path) in out and "prompt: Give three tips" in out
    assert "answer (" in out, out
