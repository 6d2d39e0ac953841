"""Run a Hugging Face transformers causal LM on pd_kernels: the drop-in attention and its guard rails.

:func:`enable` registers an attention function ``"pd_kernels"`` with transformers' ``AttentionInterface``
and switches the model to it; :func:`disable` restores the implementation the model had; :func:`enabled`
is the context-manager form (what :func:`pd_kernels.generate` uses, so the caller's model is unchanged
afterwards). Nothing else in the model changes: embeddings, RoPE, projections, MLPs and norms stay
transformers' code. The decoder then runs the model with batch 1 over the *packed* query tokens of every
sequence of a step (``position_ids = layout.q_pos``) inside ``with StepContext(...)``; each attention layer

1. writes this step's keys/values (after RoPE) into the paged cache (:func:`pd_kernels.paged_kv_write`,
   slot mapping of the packed tokens; ``module.layer_idx`` picks the layer), then
2. calls :func:`pd_kernels.span_attention` with the step's :class:`~pd_kernels.SpanLayout`.

**Never silently wrong.** The kernels implement softmax attention with a scale over the keys a layout
makes visible, nothing more. :func:`enable` refuses (:class:`UnsupportedModelError`, naming the feature)
a model with anything else: sliding-window layers, attention logit soft-capping, linear-attention / SSM /
chunked layers, RoPE whose frequencies depend on the longest position of the batch (``dynamic``,
``longrope``), attention modules that do not go through the ``AttentionInterface``, and model families
nobody has checked against transformers (:data:`VERIFIED_MODEL_TYPES`; ``allow_unverified=True`` lets
others through after a self-check of the LM head). At run time the attention function checks every
argument transformers hands it and raises on any it would ignore (a mask, a window, a soft-cap, sinks,
dropout, a transformers KV cache, ...), and :func:`forward_hidden` checks that every layer went through it.
What the LM head does after the matmul (Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma's
final soft-capping) is reproduced by :func:`logits_for_rows`.

The step context travels in a thread-local (not through the model's ``**kwargs``), so the same code works
with transformers versions that forward extra kwargs to attention functions and with those that do not
(checked with transformers 5.17 and 5.23).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch

ATTN_NAME = "pd_kernels"
_local = threading.local()
_PREVIOUS = "_pd_kernels_previous_attn"      # attribute on an enabled model: the implementation to restore
_HEAD_CHECKED = "_pd_kernels_head_checked"   # attribute: the LM-head self-check of an unverified model passed
_USERS = "_pd_kernels_users"                 # attribute: open ``enabled()`` blocks on the model
_AUTO = "_pd_kernels_auto"                   # attribute: enabled by an ``enabled()`` block, not by hand
_ENABLED_LOCK = threading.RLock()            # guards the counting and switching of ``enabled()`` blocks

#: ``config.model_type`` of the families whose pd_kernels path is tested against transformers' own forward
#: and greedy ``generate`` (tests/test_integration_transformers.py). Features of these families that the
#: kernels do not implement (e.g. Gemma 2's soft-capping, Mistral's sliding window) are still refused.
VERIFIED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi3", "olmo", "olmo2", "cohere", "granite", "starcoder2",
})

# Arguments transformers' attention modules pass that carry nothing the kernels must honour: positions
# (RoPE was applied before the call), cache bookkeeping of transformers' own KV cache (unused: ``None``
# checked below), the causal flag (visibility comes from the layout).
_IGNORED_ARGS = frozenset({"position_ids", "cache_position", "use_cache", "is_causal"})
# Arguments that are fine when falsy (None / False / 0) and would be silently ignored otherwise.
_DESCRIBE = {
    "sliding_window": "a sliding window",
    "softcap": "attention logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "head_mask": "a head mask",
    "output_attentions": "returning attention weights",
    "past_key_values": "a transformers KV cache (pd_kernels keeps K/V in its PagedKVCache)",
    "past_key_value": "a transformers KV cache (pd_kernels keeps K/V in its PagedKVCache)",
    "cu_seq_lens_q": "packed-sequence boundaries", "cu_seq_lens_k": "packed-sequence boundaries",
}


class UnsupportedModelError(ValueError):
    """A model (or an argument its attention passes) uses a feature pd_kernels does not implement."""


@dataclass
class StepContext:
    """What the attention layers of one forward pass need. Use as ``with ctx: model.model(...)``.

    Attributes:
        cache: the :class:`~pd_kernels.PagedKVCache` (all layers).
        layout: :class:`~pd_kernels.SpanLayout` of the step (packed query order).
        slot_mapping: int64 ``[Tq]`` cache slot of each packed query token (``-1``: padding, not written).
        block_table: int32 ``[B, max_pages]``, row ``b`` = pages of the layout's sequence ``b``.
        backend: pd_kernels backend for the two ops (``None``: the current default).
        layers_seen: layer indices whose attention ran in this context, in call order (host list, checked
            by :func:`forward_hidden`).
    """
    cache: object
    layout: object
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    backend: str | None = None
    layers_seen: list = field(default_factory=list, repr=False)

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


def _check_attention_args(module, layer, attention_mask, dropout, kwargs) -> None:
    """Raise on any attention argument the kernels would ignore (host-side, no tensor reads)."""
    where = f"{type(module).__name__} (layer {layer})"
    if attention_mask is not None:
        raise UnsupportedModelError(
            f"pd_kernels attention got an attention_mask from {where}: visibility comes from the step's "
            f"SpanLayout, so a mask would be ignored (a model that builds its own mask is not supported)")
    if dropout:
        raise UnsupportedModelError(f"pd_kernels attention is inference-only: {where} asked for dropout={dropout} "
                                    f"(call model.eval())")
    for name, value in kwargs.items():
        if name in _IGNORED_ARGS or value is None or value is False:
            continue
        what = _DESCRIBE.get(name, "an argument pd_kernels attention does not implement")
        shown = f"tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise UnsupportedModelError(f"{where} passed {name}={shown} ({what}); pd_kernels attention would ignore "
                                    f"it and give different results from transformers")


def pd_kernels_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]`` (after RoPE)
    -> ``(out [1, T, Hq, D], None)``.

    Visibility comes from the active :class:`StepContext`'s layout; ``scaling`` is honoured. Every other
    argument must be off (``None`` / ``False`` / ``0``): an attention mask, a sliding window, soft-capping,
    sinks, dropout or a transformers KV cache raise :class:`UnsupportedModelError` naming it."""
    from .. import paged_kv_write, span_attention

    ctx = current_context()
    if ctx is None:
        raise RuntimeError("pd_kernels attention ran outside a pd_kernels step (no StepContext active): "
                           "run the model through pd_kernels.generate / Decoder, or call "
                           "pd_kernels.disable(model) to restore its own attention")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no layer_idx: cannot pick its cache layer")
    _check_attention_args(module, layer, attention_mask, dropout, kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"pd_kernels attention runs packed queries with batch 1, got batch {query.shape[0]}")
    if value.shape[-1] != query.shape[-1]:
        raise UnsupportedModelError(f"{type(module).__name__}: value head dim {value.shape[-1]} differs from the "
                                    f"query/key head dim {query.shape[-1]} (not supported by the paged cache)")
    ctx.layers_seen.append(layer)
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


# ---------------------------------------------------------------------------------------------------
# What a model needs that the kernels do not implement
# ---------------------------------------------------------------------------------------------------
def attention_modules(model) -> list:
    """The attention module of every decoder layer, in layer order (``get_decoder().layers[i].self_attn``);
    empty when the model is not laid out that way."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        return []
    return [getattr(layer, "self_attn", None) for layer in layers]


def _rope_types(model) -> list[tuple[str, str]]:
    """``(module name, rope_type)`` of every rotary-embedding module (per-layer-type dicts flattened)."""
    out = []
    for name, m in model.named_modules():
        rt = getattr(m, "rope_type", None)
        for t in (rt.values() if isinstance(rt, dict) else [rt]):
            if isinstance(t, str):
                out.append((name or type(m).__name__, t))
    return out


def _batch_dependent_rope(rope_type: str) -> bool:
    """``dynamic`` NTK and ``longrope`` pick their frequencies from ``max(position_ids)`` of the forward pass:
    over a packed batch, a request's RoPE would depend on the other requests (and it reads the maximum on
    the host: a sync)."""
    return "dynamic" in rope_type or rope_type == "longrope"


def _layers_text(idx: list[int]) -> str:
    return f"layer {idx[0]}" if len(idx) == 1 else f"layers {idx[:8]}{'...' if len(idx) > 8 else ''}"


def unsupported_features(model, *, allow_unverified: bool = False) -> list[str]:
    """What in ``model`` pd_kernels does not implement, one readable line each (empty: nothing known).

    Checked: a transformers causal LM; ``config.model_type`` in :data:`VERIFIED_MODEL_TYPES` (unless
    ``allow_unverified``); the ``AttentionInterface``; one ``self_attn`` module with ``layer_idx == i`` per
    decoder layer ``i``; only full-attention layers (``config.layer_types``); no sliding window; no attention
    logit soft-capping; no attention sinks; value head dim = key head dim; RoPE that does not depend on the
    batch. Config-only: no tensor is read and nothing runs."""
    cfg = getattr(model, "config", None)
    if cfg is None or not callable(getattr(model, "get_output_embeddings", None)) \
            or model.get_output_embeddings() is None:
        return [f"{type(model).__name__} is not a transformers causal LM (no config / output embeddings)"]
    problems = []
    mt = getattr(cfg, "model_type", None)
    if mt not in VERIFIED_MODEL_TYPES:
        if not (allow_unverified or getattr(model, _HEAD_CHECKED, False)):
            problems.append(f"model_type {mt!r} has not been verified against transformers (verified: "
                            f"{', '.join(sorted(VERIFIED_MODEL_TYPES))}); enable(model, allow_unverified=True) "
                            f"tries it with the checks below and a self-check of its LM head")
        can_set = getattr(type(model), "_can_set_attn_implementation", None)
        if not getattr(model, "_supports_attention_backend", False) or (callable(can_set) and not can_set()):
            problems.append(f"{type(model).__name__} does not route its attention through transformers' "
                            f"AttentionInterface")
    n = getattr(cfg, "num_hidden_layers", None)
    mods = attention_modules(model)
    bad = [i for i, m in enumerate(mods) if m is None or getattr(m, "layer_idx", None) != i]
    if not mods or len(mods) != n:
        problems.append(f"expected {n} decoder layers with a self_attn module in model.get_decoder().layers, "
                        f"found {len(mods)}")
    elif bad:
        problems.append(f"{_layers_text(bad)}: no self_attn attention module with layer_idx = its index "
                        f"(linear attention, SSM or other token mixers are not supported)")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            idx = [i for i, t in enumerate(layer_types) if t != "full_attention"]
            problems.append(f"{' / '.join(other)} on {_layers_text(idx)} (config.layer_types): only full "
                            f"attention is implemented (no sliding-window, chunked or linear attention)")
    windows = sorted({(i, m.sliding_window) for i, m in enumerate(mods)
                      if m is not None and getattr(m, "sliding_window", None) is not None})
    if windows:
        if not (layer_types and set(layer_types) - {"full_attention"}):  # not already reported above
            problems.append(f"sliding-window attention (window {windows[0][1]} on "
                            f"{_layers_text([i for i, _ in windows])}) is not implemented")
    elif not layer_types and getattr(cfg, "sliding_window", None) is not None \
            and getattr(cfg, "use_sliding_window", True) is not False:
        problems.append(f"sliding-window attention (config.sliding_window={cfg.sliding_window}) is not implemented")
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap is not None:
        problems.append(f"attention logit soft-capping (config.attn_logit_softcapping={cap}) is not implemented")
    if any(m is not None and getattr(m, "sinks", None) is not None for m in mods):
        problems.append("attention sinks (self_attn.sinks) are not implemented")
    for i, m in enumerate(mods):
        kp, vp = getattr(m, "k_proj", None), getattr(m, "v_proj", None)
        if kp is not None and vp is not None and getattr(kp, "out_features", 0) != getattr(vp, "out_features", 0):
            problems.append(f"layer {i}: value projection ({vp.out_features}) and key projection "
                            f"({kp.out_features}) differ in size (one head dim for K and V is implemented)")
            break
    for name, t in _rope_types(model):
        if _batch_dependent_rope(t):
            problems.append(f"RoPE type {t!r} ({name}): its frequencies depend on the largest position of each "
                            f"forward pass, so a request's tokens would depend on the rest of its batch")
            break
    return problems


def _check_lm_head(model) -> None:
    """Self-check for a model outside :data:`VERIFIED_MODEL_TYPES`: :func:`logits_for_rows` on the decoder's
    hidden states must equal the model's own logits (catches LM-head post-processing pd_kernels does not
    know). Runs the model once on 4 tokens with its own attention; the result is remembered on the model."""
    if getattr(model, _HEAD_CHECKED, False):
        return
    p = next(model.parameters())
    ids = ((torch.arange(4, device=p.device) * 7 + 3) % model.config.vocab_size)[None]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0].float()
        base = model.get_decoder()
        ours = logits_for_rows(model, base(input_ids=ids, use_cache=False).last_hidden_state[0], None).float()
    scale = float(full.abs().max()) or 1.0
    if ours.shape != full.shape or not torch.allclose(ours, full, rtol=1e-3, atol=1e-4 * scale):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}): its logits are not lm_head(hidden) "
            f"as pd_kernels computes them (max difference {float((ours - full).abs().max()):.3g}): the LM head "
            f"does something pd_kernels does not reproduce")
    setattr(model, _HEAD_CHECKED, True)


def check_model(model, *, allow_unverified: bool = False) -> None:
    """Raise :class:`UnsupportedModelError` listing everything :func:`unsupported_features` finds; with
    ``allow_unverified`` and a family outside :data:`VERIFIED_MODEL_TYPES`, also run the LM-head self-check."""
    problems = unsupported_features(model, allow_unverified=allow_unverified)
    if problems:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        raise UnsupportedModelError(f"pd_kernels cannot run {type(model).__name__} (model_type {mt!r}) faithfully: "
                                    + "; ".join(problems))
    if model.config.model_type not in VERIFIED_MODEL_TYPES:
        _check_lm_head(model)


# ---------------------------------------------------------------------------------------------------
# Switching a model to pd_kernels attention and back
# ---------------------------------------------------------------------------------------------------
def _set_attn(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError, ImportError):  # older API / a check of the implementation's package
        pass
    if getattr(model.config, "_attn_implementation", None) != name:  # the config field is what layers read
        model.config._attn_implementation = name


def is_enabled(model) -> bool:
    """Whether the model's attention implementation is currently ``"pd_kernels"``."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTN_NAME


def enable(model, *, allow_unverified: bool = False):
    """Switch a transformers causal LM to pd_kernels attention, in place; returns the model.

    Refuses (:class:`UnsupportedModelError`, naming each feature) a model pd_kernels cannot run exactly:
    see :func:`unsupported_features`. ``allow_unverified=True`` accepts a family outside
    :data:`VERIFIED_MODEL_TYPES` that passes the feature checks and an LM-head self-check (one forward of
    4 tokens with the model's own attention).

    Afterwards the model only runs inside a :class:`StepContext` (the decoder sets it up); :func:`disable`
    restores the attention implementation it had (``"sdpa"``, ``"eager"``, ...). Enabling an enabled model
    changes nothing. :func:`pd_kernels.generate` enables and restores by itself (:func:`enabled`)."""
    if is_enabled(model):
        model.__dict__.pop(_AUTO, None)   # enabled by hand now: open enabled() blocks leave it enabled
        return model
    check_model(model, allow_unverified=allow_unverified)
    register()
    previous = model.config._attn_implementation
    _set_attn(model, ATTN_NAME)
    setattr(model, _PREVIOUS, previous)
    return model


def disable(model, attn_implementation: str | None = None):
    """Restore the attention implementation the model had before :func:`enable` (or switch to
    ``attn_implementation`` when given); returns the model. A model that is not enabled is left as it is
    unless ``attn_implementation`` is given."""
    previous = getattr(model, _PREVIOUS, None)
    target = attn_implementation or (previous if is_enabled(model) else None)
    if is_enabled(model) and target is None:
        target = "sdpa"  # enabled by hand (config field set directly): transformers' default
    if target is not None:
        _set_attn(model, target)
    if hasattr(model, _PREVIOUS):
        delattr(model, _PREVIOUS)
    model.__dict__.pop(_AUTO, None)
    return model


@contextlib.contextmanager
def enabled(model, *, allow_unverified: bool = False):
    """``with enabled(model): ...`` runs the block with pd_kernels attention and restores the model's own
    attention afterwards (also on an exception). A model that was already enabled by hand (:func:`enable`) stays
    enabled. Blocks may overlap without nesting (two :meth:`~pd_kernels.Decoder.stream` iterators on one model,
    closed in either order), also from several threads (the count and the switch are taken under one lock): the
    model's own attention comes back when the last open block ends."""
    with _ENABLED_LOCK:
        if not is_enabled(model):
            enable(model, allow_unverified=allow_unverified)
            model.__dict__[_AUTO] = True
        model.__dict__[_USERS] = model.__dict__.get(_USERS, 0) + 1
    try:
        yield model
    finally:
        with _ENABLED_LOCK:
            users = model.__dict__[_USERS] = max(model.__dict__.get(_USERS, 1) - 1, 0)
            if users == 0 and model.__dict__.get(_AUTO, False):
                disable(model)


# ---------------------------------------------------------------------------------------------------
# Running an enabled model
# ---------------------------------------------------------------------------------------------------
def model_geometry(model) -> dict:
    """Layers, KV heads and head dim of a transformers decoder (for sizing the cache), and its vocabularies:
    ``vocab_size`` the rows of the LM head (the ids it can choose; ``config.vocab_size`` when the head has no
    weight), ``input_vocab_size`` the rows of the input embeddings (the ids it can read). Raises
    :class:`UnsupportedModelError` when the LM head has more rows than the input embeddings (a chosen id could
    not be fed back)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    mods = [m for m in attention_modules(model) if m is not None]
    head_dim = (getattr(mods[0], "head_dim", None) if mods else None) or getattr(cfg, "head_dim", None) \
        or cfg.hidden_size // heads

    def rows(module):
        w = getattr(module, "weight", None)
        return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim == 2 else None

    n_out = rows(model.get_output_embeddings()) or cfg.vocab_size
    n_in = rows(model.get_input_embeddings()) if callable(getattr(model, "get_input_embeddings", None)) else None
    if n_in is not None and n_out > n_in:
        raise UnsupportedModelError(f"{type(model).__name__}: the LM head has {n_out} rows but the input embeddings "
                                    f"only {n_in}: a chosen id >= {n_in} could not be fed back")
    return {"num_layers": cfg.num_hidden_layers, "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": int(head_dim), "num_heads": heads, "vocab_size": n_out, "input_vocab_size": n_in or n_out}


def graph_capture_issues(model) -> list[str]:
    """What in a pd_kernels-enabled transformers model would break CUDA-graph capture of
    :func:`forward_hidden` (empty list: nothing known).

    Checked against the Qwen2 / Llama forward of transformers 5.17 and 5.23 with the ``"pd_kernels"``
    attention: mask creation exits early for attention implementations without a mask function (no tensor
    work), ``position_ids`` are passed (no ``arange`` from a cache length), no ``DynamicCache`` is made
    (``use_cache=False``), and the attention function only launches pd_kernels ops. What remains: the
    ``"dynamic"`` / ``"longrope"`` RoPE types read ``max(position_ids)`` on the host every forward
    (:func:`enable` refuses them anyway: they also make a request depend on its batch)."""
    issues = [f"{name}: rope_type {t!r} reads max(position_ids) on the host (a device sync) in every forward"
              for name, t in _rope_types(model) if _batch_dependent_rope(t)]
    if not is_enabled(model):
        issues.append(f"attn_implementation is {getattr(model.config, '_attn_implementation', None)!r}, "
                      f"not {ATTN_NAME!r}")
    return issues


def forward_hidden(model, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Final hidden states ``[T, hidden]`` of the packed tokens ``input_ids`` (int64 ``[T]``) at ``positions``
    (``[T]``), reading and writing the paged cache through ``ctx``. No logits are computed.

    Raises ``UnsupportedModelError`` when some decoder layer did not run its attention through pd_kernels
    (its K/V would be missing from the cache). With fixed-size inputs, a :class:`~pd_kernels.StaticSpanLayout`
    and fixed ``slot_mapping`` / ``block_table`` buffers this is capturable in a CUDA graph (no host sync,
    no data-dependent control flow) unless :func:`graph_capture_issues` lists something."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    ctx.layers_seen.clear()
    with ctx:
        out = base(input_ids=input_ids.unsqueeze(0), position_ids=positions.long().unsqueeze(0), use_cache=False)
    n = model.config.num_hidden_layers
    if ctx.layers_seen != list(range(n)):
        missing = sorted(set(range(n)) - set(ctx.layers_seen))
        raise UnsupportedModelError(
            f"{type(model).__name__}: the forward pass ran pd_kernels attention for layers {ctx.layers_seen[:16]}, "
            f"expected each of the {n} layers once in order"
            + (f" ({_layers_text(missing)} never did: their attention does not go through transformers' "
               f"AttentionInterface)" if missing else ""))
    return out.last_hidden_state[0]


def lm_head_postprocess(model, logits: torch.Tensor) -> torch.Tensor:
    """What the model's ``forward`` does to ``lm_head(hidden)`` before returning logits: Cohere's
    ``logit_scale`` (multiply), Granite's ``config.logits_scaling`` (divide), Gemma 2/3's
    ``config.final_logit_softcapping`` (``cap * tanh(logits / cap)``); the identity for the rest."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        logits = logits * scale
    div = getattr(model.config, "logits_scaling", None)
    if isinstance(div, (int, float)) and div != 1:
        logits = logits / div
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logits_for_rows(model, hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Logits ``[N, V]`` of the selected hidden rows only (``rows`` int64 ``[N]``; None = all): the LM head,
    then :func:`lm_head_postprocess`, as the model's own ``forward`` computes them."""
    h = hidden if rows is None else hidden.index_select(0, rows)
    return lm_head_postprocess(model, model.get_output_embeddings()(h))
