"""Tiny checkpoint directories for the CLI tests: random weights, a byte-level BPE tokenizer trained on the
spot (0.04 s), optionally the planned-diffusion control tags added to the tokenizer by their text."""
import json

import torch

PD_TAG_TEXTS = ["<|im_end|>", "<|mask|>", "<async>", "</async>", "<promise>", "</topic>", "<sync/>", "[PAD]"]
TEXT = ["Give three tips for staying healthy.", "Eat well, sleep well, and move every day.",
        "0 1 2 3 4 5 6 7 8 9 planned diffusion writes a plan then fills the spans."] * 20


def _tokenizer(path, *, pd_tags: bool, eos: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)
    if pd_tags:
        fast.add_special_tokens({"additional_special_tokens": PD_TAG_TEXTS})
    fast.save_pretrained(str(path))
    return fast


def write_checkpoint(path, family: str = "dream", *, vocab_size: int = 400, pd_tags: bool = True,
                     eos: str | None = None, seed: int = 0):
    """Write a checkpoint into ``path`` and return its tokenizer.

    ``family``: ``"dream"`` (a Dream ``config.json``, ``model_type: Dream``, safetensors, loaded by pd_kernels'
    Dream loader), or a transformers ``model_type`` (``"llama"``, ``"gpt_neox"``, ...: ``save_pretrained``)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tokenizer(path, pd_tags=pd_tags, eos=eos)
    assert len(tok) <= vocab_size
    small = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                 tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
                 eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    if family == "dream":
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **small))
        raw = {"model_type": "Dream", "architectures": ["DreamModel"], "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
               "torch_dtype": "float32", "mask_token_id": tok.convert_tokens_to_ids("<|mask|>") if pd_tags else None,
               **{k: v for k, v in small.items() if v is not None}}
        (path / "config.json").write_text(json.dumps(raw))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **small))
        with torch.no_grad():  # weights larger than the default init: greedy choices not decided by rounding
            for name, p in model.named_parameters():
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
        model.save_pretrained(str(path))
    return tok
