"""The transformers drop-in path: enable(), the pd_kernels attention function, logits rows, Dream loader.

Every family in VERIFIED_MODEL_TYPES is checked against transformers' own forward (hidden states and logits
of a prefill and a PD span step against a dense 4D-mask forward) and greedy ``generate`` (AR tokens); every
attention feature the kernels do not implement is refused with a message naming it, at enable() time from
the config and at run time from the arguments the attention interface passes."""
import json

import pytest
import torch

import pd_kernels
from pd_kernels import PagedKVCache, SeqQueries, SpanLayout
from pd_kernels.integrations.dream import load_dream
from pd_kernels.integrations.transformers import (VERIFIED_MODEL_TYPES, StepContext, UnsupportedModelError,
                                                  disable, enable, enabled, forward_hidden, is_enabled,
                                                  logits_for_rows, model_geometry, pd_kernels_attention)
from pd_kernels.models import tiny_config, tiny_model

from conftest import DEVICE


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _run(model, cache, seq, seqs: SeqQueries, ids_full, backend):
    """One pd_kernels step for a single sequence whose full token list is ids_full (on the cache's device)."""
    layout = SpanLayout.build([seqs], cache.k_cache.device)
    pos = layout.q_pos.long()
    slots = cache.slot_mapping(seq, 0, cache.seq_len(seq))[pos]
    ctx = StepContext(cache, layout, slots, cache.block_tables([seq]), backend)
    return forward_hidden(model, ids_full[pos], pos, ctx), layout


def _fresh(model_sdpa, ids, vis):
    L, dev = ids.shape[0], ids.device
    mask = torch.zeros(L, L, device=dev).masked_fill(~vis.to(dev), float("-inf"))[None, None]
    with torch.no_grad():
        out = model_sdpa.model(input_ids=ids[None], attention_mask=mask, position_ids=torch.arange(L, device=dev)[None],
                               use_cache=True)
    return out.last_hidden_state[0], out.past_key_values


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("mode", ["pd", "pd-da"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_then_spans_match_dense_sdpa(family, mode, backend):
    if family == "qwen2":
        m_pd, m_ref = tiny_model(seed=2), tiny_model(seed=2)
    else:
        m_pd, m_ref = _llama(), _llama()
        m_ref.load_state_dict(m_pd.state_dict())
    m_pd, m_ref = m_pd.to(DEVICE), m_ref.to(DEVICE)
    enable(m_pd)
    assert is_enabled(m_pd) and not is_enabled(m_ref)
    g = model_geometry(m_pd)
    cache = PagedKVCache(g["num_layers"], g["num_kv_heads"], g["head_dim"], 16, 8, max_seqs=2,
                         dtype=torch.float32, device=DEVICE)
    seq = cache.add_sequence()
    P, lens = 11, [5, 9, 3]
    L = P + sum(lens)
    ids = torch.randint(0, 100, (L,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cache.reserve(seq, L)
    with torch.no_grad():
        h_pre, _ = _run(m_pd, cache, seq, SeqQueries.causal(0, P), ids, backend)
        h_span, layout = _run(m_pd, cache, seq, SeqQueries.spans(P, lens, [True, False, True], mode), ids, backend)
    vis = torch.tril(torch.ones(L, L, dtype=torch.bool))
    a = P
    for n in lens:
        vis[a:a + n] = False
        vis[a:a + n, :P] = True
        if mode == "pd":
            vis[a:a + n, a:a + n] = True
        else:
            vis[a:a + n, P:L] = True
        a += n
    # the inactive span was never written: the dense truth must not see its K/V either -> compare the active
    # spans only for "pd"; for "pd-da" run the inactive span first so both have its K/V
    if mode == "pd-da":
        with torch.no_grad():
            _run(m_pd, cache, seq, SeqQueries.spans(P, lens, [False, True, False], mode), ids, backend)
            h_span, layout = _run(m_pd, cache, seq, SeqQueries.spans(P, lens, [True, False, True], mode), ids,
                                  backend)
    h_ref, kv = _fresh(m_ref, ids, vis)
    torch.testing.assert_close(h_pre, h_ref[:P], atol=2e-5, rtol=1e-4)
    pos = layout.q_pos.long()
    torch.testing.assert_close(h_span, h_ref[pos], atol=2e-5, rtol=1e-4)
    # cache after the step == fresh forward (keys after RoPE, values) at every written position
    written = torch.cat([torch.arange(P, device=pos.device), pos])
    for l in range(g["num_layers"]):
        k, v = cache.gather(seq, l)
        torch.testing.assert_close(k[written], kv.layers[l].keys[0].transpose(0, 1)[written], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(v[written], kv.layers[l].values[0].transpose(0, 1)[written], atol=2e-5, rtol=1e-4)


def test_logits_only_for_rows():
    m = tiny_model(seed=3)
    h = torch.randn(7, m.config.hidden_size)
    rows = torch.tensor([6, 0, 3])
    torch.testing.assert_close(logits_for_rows(m, h, rows), m.lm_head(h)[rows])


def test_attention_outside_a_step_raises():
    m = enable(tiny_model(seed=0))
    with pytest.raises(RuntimeError, match="StepContext"):
        m(input_ids=torch.tensor([[1, 2, 3]]))


def _write_dream(tmp_path, model, *, drop=None):
    from safetensors.torch import save_file

    cfg = model.config
    raw = {"model_type": "Dream", "architectures": ["DreamModel"], "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
           "num_key_value_heads": cfg.num_key_value_heads, "rope_theta": 10000.0, "rms_norm_eps": cfg.rms_norm_eps,
           "max_position_embeddings": 512, "tie_word_embeddings": False, "torch_dtype": "float32",
           "is_causal": False, "mask_token_id": 249}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != drop}
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ks in shards.items():
        part = {k: sd[k] for k in ks}
        if f.startswith("model-00001"):
            part["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # Dream stores these: ignored
        save_file(part, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))


def test_dream_loader(tmp_path):
    src = tiny_model(tiny_config(num_layers=2), seed=4)
    _write_dream(tmp_path, src)
    m = load_dream(str(tmp_path))
    assert type(m).__name__ == "Qwen2ForCausalLM" and m.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, src(ids).logits)
    m2 = load_dream(str(tmp_path), enable_pd_kernels=True)
    assert is_enabled(m2)


def test_dream_loader_missing_weight(tmp_path):
    _write_dream(tmp_path, tiny_model(seed=4), drop="lm_head.weight")
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_dream(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="Dream"):
        load_dream(str(tmp_path))
    _write_dream(tmp_path, tiny_model(seed=4))
    raw = json.loads((tmp_path / "config.json").read_text())
    for bad in ("auto", "int8"):   # not a floating-point torch dtype: named, not an AttributeError / int weights
        (tmp_path / "config.json").write_text(json.dumps(dict(raw, torch_dtype=bad)))
        with pytest.raises(ValueError, match=f"torch_dtype '{bad}' is not a floating-point torch dtype"):
            load_dream(str(tmp_path))


def test_decoder_on_llama():
    """The loop works on a Llama-family model too (no QKV bias, other module names)."""
    from pd_kernels.decoder import DecodeConfig, generate, make_plan
    from pd_kernels.models import TINY_TAGS

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = LlamaForCausalLM(cfg).eval()
    res = generate(m, [[40, 41, 42]], DecodeConfig(mode="pd", tags=TINY_TAGS, length_scale=3, max_new_tokens=64),
                   forced_plans=[[make_plan(TINY_TAGS, [1, 2], terminator="eos")]])   # 3 + 512 > 512 positions
    assert [len(s) for s in res[0].spans[0]] == [3, 6] and TINY_TAGS.mask not in res[0].sequence


# ---------------------------------------------------------------------------------------------------
# Model families against transformers' own output
# ---------------------------------------------------------------------------------------------------
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ROPE = {"rope_theta": 10000.0}

# (id, model_type, config overrides). Overrides switch off features a family has by default that pd_kernels
# refuses (Gemma 2's soft-capping and sliding layers) and switch on the variants worth checking.
FAMILIES = [
    ("llama", "llama", {}),
    ("llama-mqa", "llama", dict(num_key_value_heads=1)),
    ("llama-mha-bias-tied", "llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                          tie_word_embeddings=True)),
    ("llama-head-dim-32", "llama", dict(head_dim=32)),
    ("llama-rope-llama3", "llama", dict(rope_parameters=dict(_ROPE, rope_type="llama3", factor=8.0,
                                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_max_position_embeddings=64))),
    ("llama-rope-yarn", "llama", dict(rope_parameters=dict(_ROPE, rope_type="yarn", factor=4.0,
                                                           original_max_position_embeddings=64))),
    ("llama-rope-linear", "llama", dict(rope_parameters=dict(_ROPE, rope_type="linear", factor=2.0))),
    ("mistral", "mistral", dict(sliding_window=None)),
    ("mixtral", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("qwen2-window-unused", "qwen2", dict(use_sliding_window=False, sliding_window=4)),
    ("qwen2_moe", "qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=32)),
    ("qwen3", "qwen3", dict(head_dim=32)),
    ("qwen3_moe", "qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    ("gemma", "gemma", dict(head_dim=16)),
    ("gemma2-final-softcap", "gemma2", dict(head_dim=16, layer_types=["full_attention"] * 2,
                                            attn_logit_softcapping=None, final_logit_softcapping=5.0,
                                            query_pre_attn_scalar=8)),
    ("gemma3_text", "gemma3_text", dict(head_dim=16, layer_types=["full_attention"] * 2, query_pre_attn_scalar=8)),
    ("phi3-partial-rotary", "phi3", dict(partial_rotary_factor=0.5)),
    ("olmo-clip-qkv", "olmo", dict(clip_qkv=0.5)),
    ("olmo2", "olmo2", {}),
    ("cohere-logit-scale", "cohere", dict(logit_scale=0.25, use_qk_norm=True)),
    ("granite-multipliers", "granite", dict(attention_multiplier=0.3, logits_scaling=4.0, embedding_multiplier=2.0,
                                            residual_multiplier=0.5)),
    ("starcoder2", "starcoder2", dict(sliding_window=None)),
]


def _family(model_type, overrides, *, seed=0, std=0.1, attn="eager"):
    """A tiny random model of a transformers family, weights N(0, std) (norm weights near 1) so greedy choices
    are not decided by rounding; fp32, CPU, eval."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **dict(SMALL, **overrides))
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            base = 1.0 if ("norm" in name and name.endswith("weight") and p.dim() == 1) else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return m.eval()


def _pd_vs_dense(m, backend="torch"):
    """A causal prefill then a PD step of two spans through pd_kernels; the same tokens through the model's own
    forward with the equivalent dense 4D mask. Returns (ours, theirs) hidden states and logits of both steps."""
    g = model_geometry(m)
    cache = PagedKVCache(g["num_layers"], g["num_kv_heads"], g["head_dim"], 8, 8, max_seqs=1,
                         dtype=torch.float32, device="cpu")
    seq = cache.add_sequence()
    P, lens = 9, [6, 4]
    L = P + sum(lens)
    ids = torch.randint(3, 240, (L,), generator=torch.Generator().manual_seed(1))
    cache.reserve(seq, L)
    with enabled(m), torch.no_grad():
        h1, _ = _run(m, cache, seq, SeqQueries.causal(0, P), ids, backend)
        h2, layout = _run(m, cache, seq, SeqQueries.spans(P, lens, [True, True], "pd"), ids, backend)
        ours_h = torch.cat([h1, h2])
        ours_logits = logits_for_rows(m, ours_h, None)
    pos = torch.cat([torch.arange(P), layout.q_pos.long()])
    vis = torch.tril(torch.ones(L, L, dtype=torch.bool))
    a = P
    for n in lens:
        vis[a:a + n] = False
        vis[a:a + n, :P] = True
        vis[a:a + n, a:a + n] = True
        a += n
    mask = torch.zeros(L, L).masked_fill(~vis, float("-inf"))[None, None]
    with torch.no_grad():
        out = m(input_ids=ids[None], attention_mask=mask, position_ids=torch.arange(L)[None], use_cache=False,
                output_hidden_states=True)
    return ours_h, out.hidden_states[-1][0][pos], ours_logits, out.logits[0][pos]


@pytest.mark.parametrize("name,model_type,overrides", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_step_matches_transformers_forward(name, model_type, overrides):
    """Prefill + PD span step: final hidden states and logits (LM-head post-processing included) equal the
    model's own forward with the dense mask of the same visibility."""
    m = _family(model_type, overrides)
    assert model_type in VERIFIED_MODEL_TYPES
    h, h_ref, logits, logits_ref = _pd_vs_dense(m)
    torch.testing.assert_close(h, h_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits, logits_ref, atol=5e-5, rtol=1e-4)
    assert not is_enabled(m)


@pytest.mark.parametrize("name,model_type,overrides", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_ar_tokens_equal_transformers_generate(name, model_type, overrides):
    """AR mode gives exactly transformers' greedy ``generate`` tokens, and the model is restored afterwards.

    The control tags other than EOS are ids transformers' answer does not contain, so how AR mode treats
    them (stripped from the answer, MASK suppressed) cannot make a difference."""
    from pd_kernels.decoder import ControlTags, DecodeConfig

    m = _family(model_type, overrides)
    prompt = [5, 17, 99, 42, 7, 130, 64]
    n, eos = 10, 255
    with torch.no_grad():
        hf = m.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)[0, len(prompt):]
    hf = hf.tolist()
    if eos in hf:
        hf = hf[:hf.index(eos)]
    free = [i for i in range(254, 200, -1) if i not in hf and i not in prompt]
    tags = ControlTags(eos, *free[:7], digits=tuple(free[7:17]))
    res = pd_kernels.generate(m, [prompt], DecodeConfig(mode="ar", tags=tags, max_new_tokens=n), backend="torch")[0]
    assert res.answer == hf and len(hf) > 0
    assert m.config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------------------------
# Features the kernels do not implement: refused, naming the feature
# ---------------------------------------------------------------------------------------------------
_LONGROPE = dict(_ROPE, rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                 original_max_position_embeddings=64)
REFUSED = [
    ("qwen2-use-sliding-window", "qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
     "sliding"),
    ("qwen3-use-sliding-window", "qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
     "sliding_attention on layer 1"),
    ("qwen3_moe-use-sliding-window", "qwen3_moe", dict(use_sliding_window=True, sliding_window=4, num_experts=4,
                                                       num_experts_per_tok=2, moe_intermediate_size=32),
     "sliding-window attention"),
    ("mistral-sliding-window", "mistral", dict(sliding_window=4),
     r"sliding-window attention \(config.sliding_window=4"),
    ("mixtral-sliding-window", "mixtral", dict(sliding_window=4, num_local_experts=4, num_experts_per_tok=2),
     "sliding-window"),
    ("phi3-sliding-window", "phi3", dict(sliding_window=4), "sliding-window"),
    ("starcoder2-sliding-window", "starcoder2", dict(sliding_window=4), "sliding-window"),
    ("gemma2-default", "gemma2", dict(head_dim=16), "soft-capping"),
    ("gemma2-default-window", "gemma2", dict(head_dim=16), "sliding_attention"),
    ("gemma2-softcap-only", "gemma2", dict(head_dim=16, layer_types=["full_attention"] * 2),
     r"soft-capping \(config.attn_logit_softcapping=50.0\)"),
    ("gemma3_text-default", "gemma3_text", dict(head_dim=16), "sliding_attention"),
    ("llama-rope-dynamic", "llama", dict(rope_parameters=dict(_ROPE, rope_type="dynamic", factor=2.0)),
     "RoPE type 'dynamic'.*rest of its batch"),
    ("phi3-rope-longrope", "phi3", dict(rope_parameters=_LONGROPE), "RoPE type 'longrope'"),
    ("gpt_neox-unverified", "gpt_neox", {}, "model_type 'gpt_neox' has not been verified"),
    ("phi-unverified", "phi", {}, "model_type 'phi' has not been verified"),
]


@pytest.mark.parametrize("name,model_type,overrides,match", REFUSED, ids=[r[0] for r in REFUSED])
def test_enable_refuses_what_the_kernels_do_not_implement(name, model_type, overrides, match):
    m = _family(model_type, overrides, std=0.02)
    before = m.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=match):
        enable(m)
    with pytest.raises(UnsupportedModelError, match=match):  # the decoder refuses it at construction
        pd_kernels.Decoder(m, pd_kernels.DecodeConfig(mode="ar", tags=pd_kernels.models.TINY_TAGS))
    assert m.config._attn_implementation == before and not is_enabled(m)


def test_refused_window_changes_transformers_output():
    """The refusals are not vacuous: at the test lengths, transformers' own output with the window differs from
    the output without it (what pd_kernels would have computed had it ignored the window)."""
    with_window = _family("mistral", dict(sliding_window=4))
    without = _family("mistral", dict(sliding_window=None))
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        assert not torch.allclose(with_window(ids).logits, without(ids).logits, atol=1e-3)


UNVERIFIED_REFUSED = [
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16), "sliding_attention on layer 0"),
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16), r"attention sinks"),
    ("qwen3_next", dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                        linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32), "linear_attention"),
    ("stablelm", {}, "AttentionInterface"),
]


@pytest.mark.parametrize("model_type,overrides,match", UNVERIFIED_REFUSED,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(UNVERIFIED_REFUSED)])
def test_allow_unverified_still_refuses_features(model_type, overrides, match):
    m = _family(model_type, overrides, std=0.02)
    with pytest.raises(UnsupportedModelError, match=match):
        enable(m, allow_unverified=True)
    assert not is_enabled(m)


def test_allow_unverified_family_runs_and_matches_transformers():
    """A Llama-like family outside the verified list runs with allow_unverified=True (after the LM-head
    self-check) and gives transformers' tokens."""
    m = _family("arcee", {})
    with pytest.raises(UnsupportedModelError, match="not been verified"):
        enable(m)
    enable(m, allow_unverified=True)
    assert is_enabled(m)
    disable(m)
    h, h_ref, logits, logits_ref = _pd_vs_dense(m)  # enabled() again: remembered as checked
    torch.testing.assert_close(logits, logits_ref, atol=5e-5, rtol=1e-4)


def test_allow_unverified_catches_an_unknown_lm_head():
    """An unverified model whose forward changes the logits after the LM head is refused by the self-check."""
    from transformers import LlamaForCausalLM

    class ScaledHead(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    src = _family("llama", {})
    m = ScaledHead(src.config).eval()
    m.load_state_dict(src.state_dict())
    m.config.model_type = "mystery"
    with pytest.raises(UnsupportedModelError, match="LM head"):
        enable(m, allow_unverified=True)
    assert not is_enabled(m)


def _attn_inputs():
    cache = PagedKVCache(1, 1, 16, 2, 8, max_seqs=1, dtype=torch.float32, device="cpu")
    seq = cache.add_sequence()
    slots = cache.reserve(seq, 3)
    layout = SpanLayout.build([SeqQueries.causal(0, 3)], "cpu")
    ctx = StepContext(cache, layout, slots, cache.block_tables([seq]), "torch")
    module = torch.nn.Module()
    module.layer_idx = 0
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16)
    return ctx, module, q, k, v


@pytest.mark.parametrize("kwargs,match", [
    (dict(softcap=50.0), "softcap=50.0 .attention logit soft-capping"),
    (dict(sliding_window=4), "sliding_window=4 .a sliding window"),
    (dict(s_aux=torch.zeros(2)), r"s_aux=tensor \(2,\) .attention sinks"),
    (dict(attention_mask=torch.zeros(1, 1, 3, 3)), "attention_mask"),
    (dict(dropout=0.1), "dropout=0.1"),
    (dict(output_attentions=True), "output_attentions=True"),
    (dict(past_key_values=object()), "past_key_values=.*KV cache"),
    (dict(some_future_argument=2), "some_future_argument=2"),
], ids=["softcap", "sliding_window", "s_aux", "mask", "dropout", "output_attentions", "kv_cache", "unknown"])
def test_attention_refuses_arguments_it_would_ignore(kwargs, match):
    ctx, module, q, k, v = _attn_inputs()
    with ctx, pytest.raises(UnsupportedModelError, match=match):
        pd_kernels_attention(module, q, k, v, **kwargs)


def test_attention_accepts_what_it_honours_or_what_is_off():
    ctx, module, q, k, v = _attn_inputs()
    with ctx:
        out, w = pd_kernels_attention(module, q, k, v, attention_mask=None, scaling=0.3, dropout=0.0,
                                      sliding_window=None, softcap=None, s_aux=None, is_causal=True, use_cache=False,
                                      position_ids=torch.arange(3)[None], output_attentions=False)
    assert out.shape == (1, 3, 2, 16) and w is None
    # scaling is honoured: the causal softmax with scale 0.3 (GQA: both query heads read the one KV head)
    s = torch.einsum("hqd,kd->hqk", q[0], k[0, 0]) * 0.3
    s = s.masked_fill(~torch.tril(torch.ones(3, 3, dtype=torch.bool)), float("-inf"))
    torch.testing.assert_close(out[0].transpose(0, 1), torch.softmax(s, -1) @ v[0, 0])


def test_window_set_after_enable_fails_at_run_time():
    """A feature switched on behind enable()'s back is caught from the attention arguments."""
    from pd_kernels.decoder import DecodeConfig
    from pd_kernels.models import TINY_TAGS

    m = _family("mistral", dict(sliding_window=None))
    enable(m)
    m.config.sliding_window = 4
    with pytest.raises(UnsupportedModelError, match="sliding_window=4"):
        pd_kernels.generate(m, [[5, 6, 7]], DecodeConfig(mode="ar", tags=TINY_TAGS, max_new_tokens=2), backend="torch")
    assert is_enabled(m)  # enabled by the caller: generate leaves it so


def test_layer_outside_the_attention_interface_is_caught():
    """A layer whose attention does not reach pd_kernels would leave its cache layer empty: the forward raises."""
    from pd_kernels.decoder import DecodeConfig
    from pd_kernels.models import TINY_TAGS

    m = tiny_model(seed=0)
    m.model.layers[1].self_attn.forward = lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states), None)
    with pytest.raises(UnsupportedModelError, match="layer 1 never did"):
        pd_kernels.generate(m, [[5, 6, 7]], DecodeConfig(mode="ar", tags=TINY_TAGS, max_new_tokens=2), backend="torch")
    assert not is_enabled(m)


# ---------------------------------------------------------------------------------------------------
# enable / disable / enabled, and generate() leaving the caller's model as it was
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_restores_the_model(attn):
    from pd_kernels.decoder import DecodeConfig, make_plan
    from pd_kernels.models import TINY_TAGS

    m = tiny_model(seed=5, attn_implementation=attn)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = m(ids).logits
    dec = pd_kernels.Decoder(m, DecodeConfig(mode="pd", tags=TINY_TAGS, length_scale=2, max_new_tokens=24),
                             backend="torch")
    assert not is_enabled(m)  # constructing a Decoder changes nothing
    dec.generate([[40, 41]], [[make_plan(TINY_TAGS, [1, 2], terminator="eos")]])
    pd_kernels.generate(m, [[40, 41]], DecodeConfig(mode="ar", tags=TINY_TAGS, max_new_tokens=3), backend="torch")
    assert m.config._attn_implementation == attn and not is_enabled(m)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, before)
    with pytest.raises(Exception):  # a failing generate restores too
        pd_kernels.generate(m, [[10**6]], DecodeConfig(mode="ar", tags=TINY_TAGS, max_new_tokens=3), backend="torch")
    assert m.config._attn_implementation == attn


def test_enable_disable_enabled():
    m = tiny_model(seed=0, attn_implementation="eager")
    assert pd_kernels.enable is enable and pd_kernels.disable is disable and pd_kernels.enabled is enabled
    assert enable(m) is m and is_enabled(m)
    assert enable(m) is m  # idempotent
    with enabled(m):  # already enabled: stays enabled after the block
        assert is_enabled(m)
    assert is_enabled(m)
    assert disable(m) is m and m.config._attn_implementation == "eager"
    disable(m)  # not enabled: nothing changes
    assert m.config._attn_implementation == "eager"
    with pytest.raises(KeyError):
        with enabled(m):
            assert is_enabled(m)
            raise KeyError("boom")
    assert m.config._attn_implementation == "eager"
    enable(m)
    disable(m, "sdpa")  # an explicit implementation wins
    assert m.config._attn_implementation == "sdpa"


def test_enabled_blocks_from_many_threads():
    """enabled() blocks opened and closed by several threads at once (the GIL switching threads inside the
    counter's read-modify-write): the model stays on pd_kernels attention while any block is open, and its own
    attention is back, with no block counted, once every thread is done."""
    import sys
    import threading

    from pd_kernels.integrations.transformers import _USERS

    m = tiny_model(seed=0, attn_implementation="eager")
    errors, start = [], threading.Barrier(8)

    def worker():
        start.wait()
        try:
            for _ in range(300):
                with enabled(m):
                    if not is_enabled(m):
                        errors.append("disabled while a block was open")
        except Exception as e:   # a failure in a thread must fail the test
            errors.append(repr(e))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads as often as possible: a lost update shows up quickly
    try:
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert m.__dict__.get(_USERS, 0) == 0 and m.config._attn_implementation == "eager" and not is_enabled(m)


def test_dream_loader_keeps_the_sliding_window(tmp_path):
    """A Dream/Qwen2 config that asks for sliding windows loads with them, and enable() then refuses it (it used
    to be dropped silently)."""
    src = tiny_model(tiny_config(num_layers=2), seed=4)
    _write_dream(tmp_path, src)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    m = load_dream(str(tmp_path))
    assert m.config.layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(UnsupportedModelError, match="sliding"):
        enable(m)
