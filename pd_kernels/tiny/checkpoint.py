"""The tiny planned-diffusion checkpoint: a transformers Qwen2 directory (``config.json``,
``model.safetensors``) plus the tokenizer files (:mod:`pd_kernels.tiny.tokenizer`) and ``pd_kernels.json``
(control-tag ids, the length scale and diffusion length the model was trained with, the training
configuration and its loss history). :class:`TinyPD` bundles what decoding needs.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from ..decoder import DecodeConfig
from . import task
from .tokenizer import TinyTokenizer

META_FILE = "pd_kernels.json"
MODE_FORMAT = {"ar": "ar", "pd": "pd", "pd-da": "pd", "diffusion": "diffusion"}


@dataclass
class TinyPD:
    """A tiny planned-diffusion model ready to decode: the model, its tokenizer and the decoding constants
    it was trained with (``length_scale``, ``diffusion_len``)."""
    model: object
    tokenizer: TinyTokenizer
    length_scale: int
    diffusion_len: int
    path: str = ""

    def config(self, mode: str, **kw) -> DecodeConfig:
        """A :class:`~pd_kernels.DecodeConfig` for ``mode`` with this model's tags, length scale and diffusion
        length (``max_new_tokens`` 160 unless given)."""
        kw.setdefault("max_new_tokens", 160)
        return DecodeConfig(mode=mode, tags=self.tokenizer.tags, length_scale=self.length_scale,
                            diffusion_len=self.diffusion_len, **kw)

    def prompt_ids(self, prompt: str, mode: str) -> list[int]:
        """Ids of ``prompt`` (the task's words) followed by the format tag of ``mode`` (``<ar>``; ``<pd>`` for
        ``pd`` and ``pd-da``; ``<diffusion>``)."""
        if mode not in MODE_FORMAT:
            raise ValueError(f"mode must be one of {tuple(MODE_FORMAT)}, got {mode!r}")
        return self.tokenizer.encode_prompt(prompt, MODE_FORMAT[mode])


def save(model, tok: TinyTokenizer, out_dir: str, *, diffusion_len: int, extra: dict | None = None) -> None:
    """Write ``model`` (a transformers Qwen2 model; its weights in fp16), the tokenizer files and ``pd_kernels.json`` (with
    ``extra``, e.g. the training configuration and loss history) to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    model.config._attn_implementation = "sdpa"
    # weights in fp16 (half the file; :func:`load` upcasts to fp32): the shipped checkpoint stays under 8 MB
    copy.deepcopy(model).to(torch.float16).save_pretrained(out_dir)
    tok.save(out_dir)
    meta = {"tags": dataclasses.asdict(tok.tags), "length_scale": task.LENGTH_SCALE,
            "diffusion_len": diffusion_len, **(extra or {})}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def load(path: str, *, device="cpu", dtype: torch.dtype = torch.float32) -> TinyPD:
    """Load a checkpoint written by :func:`save` (``python -m pd_kernels train --out DIR``)."""
    from transformers import Qwen2ForCausalLM

    meta_file = os.path.join(path, META_FILE)
    if not os.path.exists(meta_file):
        raise FileNotFoundError(f"{path}: no {META_FILE}, not a tiny planned-diffusion checkpoint "
                                f"(write one with: python -m pd_kernels train --out DIR)")
    with open(meta_file) as f:
        meta = json.load(f)
    tok = TinyTokenizer.load(path)
    if dataclasses.asdict(tok.tags) != {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["tags"].items()}:
        raise ValueError(f"{path}: the control-tag ids of {META_FILE} do not match the tokenizer's vocabulary")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 2.7 MB model: no "Loading weights" bar on stderr
    try:
        model = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if model.config.vocab_size < len(tok):
        raise ValueError(f"{path}: model vocabulary {model.config.vocab_size} < tokenizer's {len(tok)}")
    return TinyPD(model, tok, int(meta["length_scale"]), int(meta["diffusion_len"]), os.path.abspath(path))


def from_model(model, tok: TinyTokenizer, diffusion_len: int) -> TinyPD:
    """Wrap a model in memory (e.g. just trained) for decoding. The model is copied: the decoder switches the
    copy's attention to pd_kernels, the original keeps SDPA (and can go on training)."""
    return TinyPD(copy.deepcopy(model).eval(), tok, task.LENGTH_SCALE, diffusion_len)
