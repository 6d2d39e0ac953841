"""Load a checkpoint directory for decoding: the model and its tokenizer, whatever kind of checkpoint it is.

Three kinds (:func:`checkpoint_kind`):

* ``"tiny-pd"``: written by ``python -m pd_kernels train`` (a ``pd_kernels.json`` beside the transformers
  Qwen2 files): the tiny planned-diffusion model, its word tokenizer (``tokenizer.tags`` holds the control
  tags), and the length scale and diffusion length it was trained with (:class:`pd_kernels.tiny.checkpoint.TinyPD`);
* ``"dream"``: a Dream / planned-diffusion checkpoint (``model_type: "Dream"`` in ``config.json``), loaded into
  transformers' Qwen2 classes (:func:`pd_kernels.integrations.dream.load_dream`);
* ``"transformers"``: any other ``config.json``, loaded with ``AutoModelForCausalLM``; the family must be one
  pd_kernels supports (:func:`pd_kernels.integrations.transformers.check_model`).

The control tags of a ``"dream"`` or ``"transformers"`` checkpoint come from its tokenizer:
:func:`pd_kernels.integrations.tags.tags_from_tokenizer`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

KINDS = ("tiny-pd", "dream", "transformers")


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: a transformers causal LM in eval mode.
        tokenizer: its tokenizer (a transformers tokenizer; ``"tiny-pd"``: the tiny model's word tokenizer).
        kind: one of :data:`KINDS`.
        path: the directory, absolute.
        tiny: ``"tiny-pd"`` only: the :class:`~pd_kernels.tiny.checkpoint.TinyPD` (decoding constants, the
            prompt format, :meth:`~pd_kernels.tiny.checkpoint.TinyPD.config`); otherwise ``None``.
    """
    model: object
    tokenizer: object
    kind: str
    path: str
    tiny: object = None


def checkpoint_kind(path: str) -> str:
    """The kind of the checkpoint directory ``path`` (one of :data:`KINDS`), from its files alone (no weights
    are read). Raises ``FileNotFoundError`` / ``NotADirectoryError`` for a path that is not a checkpoint
    directory and ``ValueError`` for a ``config.json`` that is not a JSON object."""
    from ..tiny.checkpoint import META_FILE

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: not a directory (expected a checkpoint directory with config.json)")
    if os.path.isfile(os.path.join(path, META_FILE)):
        return "tiny-pd"
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} does not hold a JSON object")
    return "dream" if str(raw.get("model_type", "")).lower() == "dream" else "transformers"


def load_checkpoint(path: str, *, device="cpu", dtype=None) -> Checkpoint:
    """Load the model and tokenizer of the checkpoint directory ``path`` (see the module docstring for the
    kinds), ready for :class:`pd_kernels.Decoder`.

    Args:
        path: the directory (``config.json``, weights, tokenizer files).
        device: where to put the model.
        dtype: parameter dtype; default ``float32`` on the CPU and ``bfloat16`` elsewhere (``"tiny-pd"``:
            ``float32`` everywhere, the dtype it was trained in).

    Returns a :class:`Checkpoint`. Raises what :func:`checkpoint_kind` raises;
    :class:`~pd_kernels.UnsupportedModelError` for a model the kernels cannot run (checked before the
    tokenizer loads); ``ValueError`` ("cannot load the model in ..." / "cannot load the tokenizer of ...")
    when transformers cannot load them, with its reason.
    """
    import torch

    kind = checkpoint_kind(path)
    if kind == "tiny-pd":
        from ..models import load_tiny_pd

        tp = load_tiny_pd(path, device=device, dtype=dtype)
        return Checkpoint(tp.model, tp.tokenizer, kind, os.path.abspath(path), tiny=tp)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        if kind == "dream":
            from .dream import load_dream

            model = load_dream(path, dtype=dtype, device=device)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the model in {path}: {e}") from e
    from .transformers import check_model

    check_model(model)   # refuse a model the kernels cannot run before loading anything else
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot load the tokenizer of {path}: {e}") from e
    return Checkpoint(model, tok, kind, os.path.abspath(path))
