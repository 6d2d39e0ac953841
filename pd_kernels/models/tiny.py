"""A tiny random-weight Qwen2 (transformers classes) with the control tags remapped into its vocabulary.

Random weights produce no meaningful plans, so tests, benchmarks and the demo give it a *forced* plan
(:func:`pd_kernels.decoder.make_plan`); everything after the plan (spans, diffusion, rounds) is the model's.
"""
from __future__ import annotations

import torch

from ..decoder.config import ControlTags

TINY_VOCAB = 256
# Tags at the top of the vocabulary, digits where Dream has them (ids 15..24).
TINY_TAGS = ControlTags(eos=248, mask=249, async_open=250, async_close=251, promise=252, topic_close=253,
                        sync=254, pad=255, digits=tuple(range(15, 25)))


def tiny_config(*, vocab_size: int = TINY_VOCAB, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                num_kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 4096,
                init_std: float = 0.15):
    """``Qwen2Config`` of the tiny model: head dim ``hidden_size // num_heads`` (16 by default, the smallest
    ``tl.dot`` accepts). ``init_std`` larger than transformers' 0.02 makes the random model's predictions
    peaked enough for the threshold policies to commit several tokens per step."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       initializer_range=init_std, tie_word_embeddings=False)


def dream_shaped_config(num_layers: int = 28, *, vocab_size: int = 152064):
    """The Dream-7B geometry (SPEC section 2) with a chosen layer count (random weights, for benchmarks)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=num_layers, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)


@torch.no_grad()
def tiny_model(config=None, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu",
               attn_implementation: str = "sdpa"):
    """A random-weight ``Qwen2ForCausalLM`` (deterministic for a seed), eval mode.

    Weights are drawn from N(0, init_std) on the CPU (QKV biases too), so the model is the same on every
    device, then moved."""
    from transformers import Qwen2ForCausalLM

    config = config or tiny_config()
    config._attn_implementation = attn_implementation
    model = Qwen2ForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model.to(device=device, dtype=dtype).eval()


class SyllableTokenizer:
    """Readable names for the ids of the random-weight tiny model (:func:`tiny_model`), which ships no tokenizer:
    each id is shown as two syllables, a control tag by its text. Not a real tokenizer (``encode`` hashes
    words to ids). The trained tiny planned-diffusion model's word-level tokenizer is
    :class:`pd_kernels.tiny.tokenizer.TinyTokenizer`."""
    _SYL = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "we", "xa", "yo", "ze", "bi", "do", "fu"]

    def __init__(self, tags: ControlTags = TINY_TAGS):
        self.tags = tags
        self._names = {tags.eos: "<|im_end|>", tags.mask: "<|mask|>", tags.async_open: "<async>",
                       tags.async_close: "</async>", tags.promise: "<promise>", tags.topic_close: "</topic>",
                       tags.sync: "<sync/>", tags.pad: "[PAD]"}
        for i, d in enumerate(tags.digits):
            self._names[d] = str(i)

    def token(self, i: int) -> str:
        i = int(i)
        if i in self._names:
            return self._names[i]
        return " " + self._SYL[i % 16] + self._SYL[(i // 16) % 16]

    def decode(self, ids) -> str:
        return "".join(self.token(i) for i in ids)

    def encode(self, text: str) -> list[int]:
        # deterministic toy encoding: one id per whitespace word, never a tag or digit id
        out = []
        for w in text.split():
            h = sum(ord(c) * 31 ** k for k, c in enumerate(w)) % 200
            out.append(h + 30 if h + 30 < 248 else h)
        return out
