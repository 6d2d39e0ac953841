"""Load a Dream checkpoint directory (``config.json`` with ``model_type: "Dream"``, safetensors weights)
into transformers' ``Qwen2ForCausalLM``. Dream-7B and the released planned-diffusion checkpoints are the
Qwen2 architecture (QKV bias, untied LM head) with bidirectional attention; the attention pattern is the
decoder's business (pd_kernels layouts), so the weights load 1:1 into the Qwen2 classes.
"""
from __future__ import annotations

import json
import os

import torch

# Dream config keys carried into Qwen2Config (everything else is dropped).
# The sliding-window keys are carried as they are: a checkpoint that asks for windows gets them, and
# pd_kernels' enable() then refuses the model instead of running it without (no silent drop).
_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
         "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range",
         "use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


def dream_to_qwen2_config(cfg: dict):
    """A ``Qwen2Config`` equivalent to a Dream ``config.json`` dict."""
    from transformers import Qwen2Config

    mt = str(cfg.get("model_type", "")).lower()
    if mt not in ("dream", "qwen2"):
        raise ValueError(f"not a Dream/Qwen2 config: model_type={cfg.get('model_type')!r}")
    kw = {k: cfg[k] for k in _KEYS if k in cfg}
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        rope.update(scaling)
        rope["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    kw["rope_parameters"] = rope
    kw.setdefault("use_sliding_window", False)
    return Qwen2Config(**kw)


def _state_dict_files(path: str) -> list:
    """The checkpoint's ``.safetensors`` files (its index's, when sharded); raises when there are none."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    return files


def _state_dict(path: str) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for name in _state_dict_files(path):
        sd.update(load_file(os.path.join(path, name)))
    return sd


def load_dream(path: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               enable_pd_kernels: bool = False, tp_plan=None, distributed_config=None):
    """Load a Dream (or Qwen2) checkpoint directory into ``transformers.Qwen2ForCausalLM``.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (sharded checkpoints via
            ``model.safetensors.index.json``).
        dtype: parameter dtype (default: the checkpoint's ``torch_dtype``/``dtype``, else float32).
        device: where to put the model.
        enable_pd_kernels: also call :func:`pd_kernels.integrations.transformers.enable` on it.
        tp_plan, distributed_config: tensor parallelism, as transformers' ``from_pretrained`` takes them
            (``tp_plan="auto"`` or ``distributed_config=DistributedConfig(tp_size=N)``; one of them): the weights
            are loaded by ``Qwen2ForCausalLM.from_pretrained`` straight into this rank's shards, on the rank's
            device (transformers binds ``LOCAL_RANK``'s accelerator, the CPU under gloo; ``device`` must stay at
            its default). Run every rank under ``torchrun``; :class:`pd_kernels.Decoder` then runs the model as in
            one process (:mod:`pd_kernels.parallel.tp`).

    Returns the model in eval mode. Per-layer rotary buffers some Dream checkpoints store are ignored;
    a missing or unexpected weight raises ``ValueError`` naming it.
    """
    from transformers import Qwen2ForCausalLM

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    config = dream_to_qwen2_config(raw)
    if dtype is None:
        name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        dtype = getattr(torch, str(name).replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{path}/config.json: torch_dtype {name!r} is not a floating-point torch dtype: pass "
                             f"load_dream(..., dtype=torch.bfloat16) (or another)")
    if tp_plan is not None or distributed_config is not None:
        return _load_dream_tp(path, config, dtype, device, enable_pd_kernels, tp_plan, distributed_config)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    sd = {k: v for k, v in _state_dict(path).items() if "rotary_emb" not in k}
    if config.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    want = set(model.state_dict())
    missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or extra:
        raise ValueError(f"Dream checkpoint {path} does not match Qwen2 (missing: {missing[:5]}, "
                         f"unexpected: {extra[:5]})")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    # non-persistent buffers (RoPE inv_freq) were created on meta: rebuild them on the target device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model = model.to(device=device).eval()
    if enable_pd_kernels:
        from .transformers import enable

        enable(model)
    return model


def _load_dream_tp(path: str, config, dtype, device, enable_pd_kernels: bool, tp_plan, distributed_config):
    """:func:`load_dream` with tensor parallelism: transformers' ``from_pretrained`` on the Qwen2 config (the weight
    names are Qwen2's), its loading report checked like the single-process path."""
    from transformers import Qwen2ForCausalLM

    if tp_plan is not None and distributed_config is not None:
        raise ValueError("load_dream: pass tp_plan or distributed_config, not both")
    if torch.device(device) != torch.device("cpu"):
        raise ValueError(f"load_dream: with tensor parallelism each rank's device is chosen by transformers "
                         f"(LOCAL_RANK), leave device at its default (got {device!r})")
    _state_dict_files(path)   # no weights: the same error as the single-process path
    kw = {"tp_plan": tp_plan} if tp_plan is not None else {"distributed_config": distributed_config}
    model, info = Qwen2ForCausalLM.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True, **kw)
    missing = sorted(info.get("missing_keys", ()))
    extra = sorted(k for k in info.get("unexpected_keys", ()) if "rotary_emb" not in k)
    if missing or extra:
        raise ValueError(f"Dream checkpoint {path} does not match Qwen2 (missing: {missing[:5]}, "
                         f"unexpected: {extra[:5]})")
    model = model.eval()
    if enable_pd_kernels:
        from .transformers import enable

        enable(model)
    return model
