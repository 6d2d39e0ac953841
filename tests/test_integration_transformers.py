"""The transformers drop-in path: enable(), the pd_kernels attention function, logits rows, Dream loader."""
import json

import pytest
import torch

import pd_kernels
from pd_kernels import PagedKVCache, SeqQueries, SpanLayout
from pd_kernels.integrations.dream import load_dream
from pd_kernels.integrations.transformers import (StepContext, enable, forward_hidden, is_enabled,
                                                  logits_for_rows, model_geometry)
from pd_kernels.models import tiny_config, tiny_model


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _run(model, cache, seq, seqs: SeqQueries, ids_full, backend):
    """One pd_kernels step for a single sequence whose full token list is ids_full."""
    layout = SpanLayout.build([seqs], "cpu")
    pos = layout.q_pos.long()
    slots = cache.slot_mapping(seq, 0, cache.seq_len(seq))[pos]
    ctx = StepContext(cache, layout, slots, cache.block_tables([seq]), backend)
    return forward_hidden(model, ids_full[pos], pos, ctx), layout


def _fresh(model_sdpa, ids, vis):
    L = ids.shape[0]
    mask = torch.zeros(L, L).masked_fill(~vis, float("-inf"))[None, None]
    with torch.no_grad():
        out = model_sdpa.model(input_ids=ids[None], attention_mask=mask, position_ids=torch.arange(L)[None],
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
    enable(m_pd)
    assert is_enabled(m_pd) and not is_enabled(m_ref)
    g = model_geometry(m_pd)
    cache = PagedKVCache(g["num_layers"], g["num_kv_heads"], g["head_dim"], 16, 8, max_seqs=2,
                         dtype=torch.float32, device="cpu")
    seq = cache.add_sequence()
    P, lens = 11, [5, 9, 3]
    L = P + sum(lens)
    ids = torch.randint(0, 100, (L,), generator=torch.Generator().manual_seed(0))
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
    written = torch.cat([torch.arange(P), pos])
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
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))


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


def test_decoder_on_llama():
    """The loop works on a Llama-family model too (no QKV bias, other module names)."""
    from pd_kernels.decoder import DecodeConfig, generate, make_plan
    from pd_kernels.models import TINY_TAGS

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = LlamaForCausalLM(cfg).eval()
    res = generate(m, [[40, 41, 42]], DecodeConfig(mode="pd", tags=TINY_TAGS, length_scale=3),
                   forced_plans=[[make_plan(TINY_TAGS, [1, 2], terminator="eos")]])
    assert [len(s) for s in res[0].spans[0]] == [3, 6] and TINY_TAGS.mask not in res[0].sequence
