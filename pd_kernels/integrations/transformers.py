"""Run a Hugging Face transformers model (Qwen2 / Llama family) on pd_kernels.

:func:`enable` registers an attention function ``"pd_kernels"`` with transformers' ``AttentionInterface``
and switches the model to it. Nothing else in the model changes: embeddings, RoPE, projections, MLPs and
norms stay transformers' code. The decoder then runs the model with batch 1 over the *packed* query
tokens of every sequence of a step (``position_ids = layout.q_pos``) inside ``with StepContext(...)``;
each attention layer

1. writes this step's keys/values (after RoPE) into the paged cache (:func:`pd_kernels.paged_kv_write`,
   slot mapping of the packed tokens; ``module.layer_idx`` picks the layer), then
2. calls :func:`pd_kernels.span_attention` with the step's :class:`~pd_kernels.SpanLayout`.

The step context travels in a thread-local (not through the model's ``**kwargs``), so the same code works
with transformers versions that forward extra kwargs to attention functions and with those that do not.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

ATTN_NAME = "pd_kernels"
_local = threading.local()


@dataclass
class StepContext:
    """What the attention layers of one forward pass need. Use as ``with ctx: model.model(...)``.

    Attributes:
        cache: the :class:`~pd_kernels.PagedKVCache` (all layers).
        layout: :class:`~pd_kernels.SpanLayout` of the step (packed query order).
        slot_mapping: int64 ``[Tq]`` cache slot of each packed query token (``-1``: padding, not written).
        block_table: int32 ``[B, max_pages]``, row ``b`` = pages of the layout's sequence ``b``.
        backend: pd_kernels backend for the two ops (``None``: the current default).
    """
    cache: object
    layout: object
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    backend: str | None = None

    def __enter__(self):
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _local.stack.pop()
        return False


def current_context() -> StepContext | None:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def pd_kernels_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]`` (after RoPE)
    -> ``(out [1, T, Hq, D], None)``. ``attention_mask`` is ignored: visibility comes from the layout."""
    from .. import paged_kv_write, span_attention

    ctx = current_context()
    if ctx is None:
        raise RuntimeError("pd_kernels attention ran outside a pd_kernels step (no StepContext active): "
                           "run the model through pd_kernels.decoder, or call "
                           "pd_kernels.integrations.transformers.disable(model) to go back to sdpa")
    if query.shape[0] != 1:
        raise ValueError(f"pd_kernels attention runs packed queries with batch 1, got batch {query.shape[0]}")
    if dropout:
        raise ValueError("pd_kernels attention is inference-only (dropout must be 0)")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(f"{type(module).__name__} has no layer_idx: cannot pick its cache layer")
    q = query[0].transpose(0, 1)  # [T, Hq, D] view, unit last stride
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    k_cache, v_cache = ctx.cache.layer(layer)
    paged_kv_write(k, v, k_cache, v_cache, ctx.slot_mapping, backend=ctx.backend)
    out = span_attention(q, k_cache, v_cache, ctx.block_table, ctx.layout, scale=scaling, backend=ctx.backend)
    return out.unsqueeze(0), None


def register() -> None:
    """Register ``"pd_kernels"`` with transformers' ``AttentionInterface`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, pd_kernels_attention)


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]


def enable(model):
    """Switch a transformers causal LM (Qwen2, Llama and other families whose attention modules call the
    ``AttentionInterface`` and carry ``layer_idx``) to pd_kernels attention, in place; returns the model.

    Afterwards the model only runs inside a :class:`StepContext` (the decoder sets it up)."""
    register()
    mods = _attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__}: found no attention modules with q_proj and layer_idx")
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:  # older/newer API differences: the config field is what the layers read
        model.config._attn_implementation = ATTN_NAME
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.config._attn_implementation = ATTN_NAME
    return model


def disable(model, attn_implementation: str = "sdpa"):
    """Go back to a stock transformers attention (``"sdpa"`` by default); returns the model."""
    try:
        model.set_attn_implementation(attn_implementation)
    except Exception:
        model.config._attn_implementation = attn_implementation
    return model


def is_enabled(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == ATTN_NAME


def model_geometry(model) -> dict:
    """Layers, KV heads and head dim of a transformers decoder config (for sizing the cache)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"num_layers": cfg.num_hidden_layers, "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": head_dim, "num_heads": heads, "vocab_size": cfg.vocab_size}


def graph_capture_issues(model) -> list[str]:
    """What in a pd_kernels-enabled transformers model would break CUDA-graph capture of
    :func:`forward_hidden` (empty list: nothing known).

    Checked against the Qwen2 / Llama forward of transformers 5.17 and 5.23 with the ``"pd_kernels"``
    attention: mask creation exits early for attention implementations without a mask function (no tensor
    work), ``position_ids`` are passed (no ``arange`` from a cache length), no ``DynamicCache`` is made
    (``use_cache=False``), and the attention function only launches pd_kernels ops. What remains: the
    ``"dynamic"`` / ``"longrope"`` RoPE types read ``max(position_ids)`` on the host every forward."""
    issues = []
    for name, m in model.named_modules():
        rt = getattr(m, "rope_type", None)
        for t in (rt.values() if isinstance(rt, dict) else [rt]):
            if isinstance(t, str) and ("dynamic" in t or t == "longrope"):
                issues.append(f"{name or type(m).__name__}: rope_type {t!r} reads max(position_ids) on the host "
                              f"(a device sync) in every forward")
    if not is_enabled(model):
        issues.append(f"attn_implementation is {getattr(model.config, '_attn_implementation', None)!r}, "
                      f"not {ATTN_NAME!r}")
    return issues


def forward_hidden(model, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Final hidden states ``[T, hidden]`` of the packed tokens ``input_ids`` (int64 ``[T]``) at ``positions``
    (``[T]``), reading and writing the paged cache through ``ctx``. No logits are computed.

    With fixed-size inputs, a :class:`~pd_kernels.StaticSpanLayout` and fixed ``slot_mapping`` /
    ``block_table`` buffers this is capturable in a CUDA graph (no host sync, no data-dependent control
    flow) unless :func:`graph_capture_issues` lists something."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    with ctx:
        out = base(input_ids=input_ids.unsqueeze(0), position_ids=positions.long().unsqueeze(0), use_cache=False)
    return out.last_hidden_state[0]


def logits_for_rows(model, hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """LM-head logits ``[N, V]`` of the selected hidden rows only (``rows`` int64 ``[N]``; None = all)."""
    h = hidden if rows is None else hidden.index_select(0, rows)
    return model.get_output_embeddings()(h)
