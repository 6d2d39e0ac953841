"""Built-in models.

* the tiny *trained* planned-diffusion model shipped inside the package (:func:`tiny_pd_path`,
  :func:`load_tiny_pd`; trained by ``python -m pd_kernels train``, see :mod:`pd_kernels.tiny`): the demo's
  default, it writes its own plans;
* a tiny *random-weight* Qwen2 for tests, smoke benchmarks and ``demo --model random`` (forced plans).
"""
import os

from .tiny import TINY_TAGS, SyllableTokenizer, dream_shaped_config, tiny_config, tiny_model

TINY_PD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_pd")


def tiny_pd_path() -> str:
    """Directory of the shipped tiny planned-diffusion checkpoint (raises ``FileNotFoundError`` when the
    installation lacks it, e.g. a wheel built without package data)."""
    if not os.path.exists(os.path.join(TINY_PD_DIR, "model.safetensors")):
        raise FileNotFoundError(f"the shipped tiny planned-diffusion checkpoint is missing from {TINY_PD_DIR} "
                                f"(reinstall pd_kernels, or train one: python -m pd_kernels train --out DIR)")
    return TINY_PD_DIR


def load_tiny_pd(path: str | None = None, *, device="cpu", dtype=None):
    """The shipped tiny planned-diffusion model (or the checkpoint at ``path``) as a
    :class:`pd_kernels.tiny.checkpoint.TinyPD` (model, tokenizer, length scale, diffusion length)."""
    import torch

    from ..tiny.checkpoint import load

    return load(path or tiny_pd_path(), device=device, dtype=dtype or torch.float32)


__all__ = ["TINY_TAGS", "SyllableTokenizer", "tiny_config", "tiny_model", "dream_shaped_config", "tiny_pd_path",
           "load_tiny_pd", "TINY_PD_DIR"]
