"""The decoder loop against the independent plain-torch reference decoder (tests/reference_decoder.py).

Tiny random-weight Qwen2 in fp32 on CPU, forced multi-span multi-round plans, greedy: the kernel path
(torch backend for the full matrix, Triton in the interpreter for representative cases) must produce
exactly the reference's tokens. Plus the documented outcomes of malformed plans and limits.
"""
import pytest
import torch

import pd_kernels
from pd_kernels.decoder import DecodeConfig, Decoder, generate, make_plan, parse_plan
from pd_kernels.models import TINY_TAGS, tiny_model
from reference_decoder import ReferenceDecoder

from conftest import DEVICE

T = TINY_TAGS
PROMPTS = [[40, 41, 42, 43, 44], [50, 60, 70], [33, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100]]
PLANS = [
    [make_plan(T, [1, 2], terminator="sync"), make_plan(T, [1], topic_tokens=[[77]], terminator="sync"),
     make_plan(T, [2], terminator="eos")],
    [make_plan(T, [2, 1, 1], topic_tokens=[[100], [101, 102], []], terminator="eos")],
    [make_plan(T, [3], terminator="sync"), make_plan(T, [1, 1], terminator="eos")],
]
KW = dict(length_scale=4, max_new_tokens=80, tau=0.05, diffusion_len=12)


@pytest.fixture(scope="module")
def models():
    # kernel path, reference (same weights), on the test device
    return tiny_model(seed=1, device=DEVICE), tiny_model(seed=1, device=DEVICE)


def _check_against_reference(models, mode, policy, confidence="prob", steps_ratio=1.0, backend="torch",
                             prompts=PROMPTS, plans=PLANS, **kw):
    m_kernel, m_ref = models
    if mode == "diffusion":   # no plan to force
        plans = [None] * len(prompts)
    opts = dict(KW, **kw)
    cfg = DecodeConfig(mode=mode, policy=policy, confidence=confidence, steps_ratio=steps_ratio, tags=T, **opts)
    res = generate(m_kernel, prompts, cfg, forced_plans=plans, backend=backend)
    for i, (p, f) in enumerate(zip(prompts, plans)):
        ref = ReferenceDecoder(m_ref, tags=T, mode=mode, policy=policy, confidence=confidence,
                               steps_ratio=steps_ratio, **opts).generate(p, f)
        assert res[i].sequence == ref["sequence"], f"prompt {i}: sequences differ"
        assert res[i].answer == ref["answer"]
        prefill = mode == "diffusion" and opts.get("diffusion_attention") != "full" and len(p) > 1
        assert res[i].stats.critical_path == ref["forwards"] + prefill   # our causal prefill is one more forward
    return res


@pytest.mark.parametrize("policy", ["schedule", "pd_threshold", "threshold"])
@pytest.mark.parametrize("mode", ["pd", "pd-da", "ar", "diffusion"])
def test_matches_reference_torch(models, mode, policy):
    res = _check_against_reference(models, mode, policy)
    if mode in ("pd", "pd-da"):
        assert [r.stats.rounds for r in res] == [3, 1, 2]
        assert [r.stats.spans for r in res] == [4, 3, 3]
        assert all(r.finish_reason == "eos" for r in res)


@pytest.mark.parametrize("confidence,tau", [("margin", 0.01), ("neg_entropy", -0.5)])
def test_confidence_kinds(models, confidence, tau):
    """neg_entropy (<= 0) takes a negative tau: the threshold path commits rows of entropy <= 0.5 too."""
    _check_against_reference(models, "pd", "pd_threshold", confidence=confidence, tau=tau)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_steps_ratio(models, ratio):
    res = _check_against_reference(models, "pd", "schedule", steps_ratio=ratio)
    full = generate(models[0], PROMPTS, DecodeConfig(mode="pd", tags=T, **KW), forced_plans=PLANS)
    assert sum(r.stats.steps["diffusion"] for r in res) < sum(r.stats.steps["diffusion"] for r in full)


@pytest.mark.parametrize("mode,policy", [("pd", "schedule"), ("pd-da", "threshold"), ("diffusion", "pd_threshold")])
def test_matches_reference_triton(models, mode, policy):
    _check_against_reference(models, mode, policy, backend="triton", prompts=PROMPTS[:2], plans=PLANS[:2])


def test_diffusion_full_attention_matches_reference(models):
    """``diffusion_attention="full"``: the paper's diffusion baseline (bidirectional over prompt and answer, no
    cache, every step forwards everything) against the reference run with a full mask."""
    res = _check_against_reference(models, "diffusion", "pd_threshold", diffusion_attention="full")
    assert all(r.stats.method == "diffusion-full" and r.stats.steps["prefill"] == 0 for r in res)
    ours = generate(models[0], PROMPTS, DecodeConfig(mode="diffusion", policy="pd_threshold", tags=T, **KW))
    assert all(r.stats.method == "diffusion" and r.stats.steps["prefill"] == 1 for r in ours)


def test_refresh_spans_matches_reference(models):
    """``refresh_spans=True``: one more forward of a round's finished spans before its ``<sync/>``, so later
    tokens see the spans' final K/V (the reference freezes them at that forward); one step per such round."""
    res = _check_against_reference(models, "pd", "pd_threshold", refresh_spans=True)
    base = generate(models[0], PROMPTS, DecodeConfig(mode="pd", policy="pd_threshold", tags=T, **KW),
                    forced_plans=PLANS)
    assert [r.stats.steps["refresh"] for r in res] == [2, 0, 1]   # rounds ending in <sync/>
    assert [r.stats.critical_path for r in res] == [b.stats.critical_path + r.stats.steps["refresh"]
                                                    for r, b in zip(res, base)]
    assert res[0].spans[0] == base[0].spans[0]      # round 1 is the same; later rounds see other K/V


def test_batch_size_does_not_change_tokens(models):
    cfg = DecodeConfig(mode="pd", policy="pd_threshold", tags=T, **KW)
    dec = Decoder(models[0], cfg, max_batch=2)
    a = dec.generate(PROMPTS, PLANS)
    assert dec.cache.num_free_pages == dec.cache.num_pages  # finished requests freed their pages
    b = generate(models[0], PROMPTS, cfg, forced_plans=PLANS, max_batch=1)
    assert [r.sequence for r in a] == [r.sequence for r in b]
    # shared steps: the batch takes fewer forward passes than the requests' critical paths added up
    assert dec.step_index < sum(r.stats.critical_path for r in a)


def test_stats(models):
    cfg = DecodeConfig(mode="pd", tags=T, **KW)
    r = generate(models[0], PROMPTS[:1], cfg, forced_plans=PLANS[:1])[0]
    s = r.stats
    assert s.steps["prefill"] == 1
    # every plan token and every <sync/> is one AR forward (prefill / <sync/> yield a round's first plan token,
    # the last plan token's forward yields the terminator)
    assert s.steps["plan"] == sum(len(p) for p in r.plans) + (s.rounds - 1)
    assert s.plan_tokens == sum(len(p) for p in r.plans)
    assert s.span_tokens == sum(len(x) for rnd in r.spans for x in rnd) == 4 * (1 + 2 + 1 + 2)
    assert s.steps["diffusion"] == 8 + 4 + 8  # schedule at r=1: one token per span per step
    assert s.critical_path == sum(s.steps.values()) and s.wall_s > 0
    assert set(s.as_dict()) >= {"critical_path", "steps", "time_s", "plan_tokens", "span_tokens"}


# ---- documented outcomes of malformed plans and limits -------------------------------------------------
def test_parse_plan_errors():
    bad = [T.promise, 100, T.topic_close, T.promise, T.digits[0], T.topic_close,
           T.promise, T.digits[9], T.digits[9], T.topic_close, T.promise, T.digits[2]]
    entries, errors = parse_plan(bad, T, length_scale=10, max_span_len=50)
    assert [(e.number, e.length) for e in entries] == [(99, 50)]
    assert len(errors) == 4 and "no number" in errors[0] and "0 tokens" in errors[1]
    assert "clamped" in errors[2] and "no </topic>" in errors[3]
    entries, errors = parse_plan(make_plan(T, [1, 2, 3], terminator=None), T, max_spans=2)
    assert [e.number for e in entries] == [1, 2] and "max_spans" in errors[0]
    # a float scale whose product overflows to inf is clamped like any long span (int(inf) used to raise)
    entries, errors = parse_plan(make_plan(T, [99, 2], terminator=None), T, length_scale=1e307, max_span_len=40)
    assert [e.length for e in entries] == [40, 40] and len(errors) == 2
    assert "99 x length_scale 1e+307 tokens: clamped to max_span_len=40" in errors[0]


def test_plan_without_promise_is_the_answer(models):
    plan = [60, 61, 62, T.eos]
    r = generate(models[0], [[40, 41]], DecodeConfig(mode="pd", tags=T, **KW), forced_plans=[[plan]])[0]
    assert r.finish_reason == "no_plan" and r.answer == [60, 61, 62] and r.stats.spans == 0


def test_plan_errors_do_not_crash(models):
    plan = [T.promise, 100, T.topic_close, T.promise, T.digits[9], T.digits[9], T.topic_close, T.eos]
    cfg = DecodeConfig(mode="pd", tags=T, **dict(KW, max_span_len=6))
    r = generate(models[0], [[40, 41]], cfg, forced_plans=[[plan]])[0]
    assert r.finish_reason == "eos" and [len(s) for s in r.spans[0]] == [6]
    assert len(r.stats.plan_errors) == 2


def test_max_new_tokens_and_rounds(models):
    sync = make_plan(T, [2], terminator="sync")
    cfg = DecodeConfig(mode="pd", tags=T, **dict(KW, max_rounds=2))
    r = generate(models[0], [[40, 41]], cfg, forced_plans=[[sync] * 4])[0]
    assert r.finish_reason == "max_rounds" and r.stats.rounds == 2
    cfg = DecodeConfig(mode="pd", tags=T, **dict(KW, max_new_tokens=12))
    r = generate(models[0], [[40, 41]], cfg, forced_plans=[[make_plan(T, [3, 3], terminator="eos")]])[0]
    assert r.finish_reason == "length" and len(r.sequence) - 2 <= 12
    assert [len(s) for s in r.spans[0]] == [12 - 6 - 2] and r.stats.plan_errors
    r = generate(models[0], [[40, 41]], DecodeConfig(mode="ar", tags=T, **dict(KW, max_new_tokens=7)))[0]
    assert len(r.answer) <= 7 and len(r.sequence) == 2 + 7


def test_bad_config():
    with pytest.raises(ValueError, match="mode"):
        DecodeConfig(mode="xx")
    with pytest.raises(ValueError, match="policy"):
        DecodeConfig(policy="xx")
    with pytest.raises(ValueError, match="vocabulary"):
        Decoder(tiny_model(), DecodeConfig())  # Dream tag ids do not fit a 256-token vocabulary


def test_sampling_runs(models):
    cfg = DecodeConfig(mode="pd", tags=T, temperature=1.0, seed=3, **KW)
    a = generate(models[0], PROMPTS[:2], cfg, forced_plans=PLANS[:2])
    b = generate(models[0], PROMPTS[:2], cfg, forced_plans=PLANS[:2])
    assert [r.sequence for r in a] == [r.sequence for r in b]  # counter-based RNG: reproducible
    assert all(T.mask not in r.sequence for r in a)


@pytest.mark.parametrize("refresh", [False, True], ids=["cached", "refresh_spans"])
def test_prefix_cache_equals_fresh_forward(models, refresh):
    """At the <sync/> of round 1 the prompt and plan K/V in the paged cache equal a fresh forward; the
    spans' K/V are those of their last forward (documented staleness) and equal a fresh forward of the
    sequence as it was last forwarded (PD: a span only sees the prefix and itself). With ``refresh_spans``
    they equal a fresh forward of the spans' final tokens."""
    m_kernel, m_ref = models
    cfg = DecodeConfig(mode="pd", tags=T, refresh_spans=refresh, **KW)
    seen = {}
    prev = {}

    def on_step(dec):
        for r in dec.running:
            for s in r.round_spans:
                key = (r.idx, r.stats.rounds, s.start)
                if not s.active and key not in seen.setdefault("last", {}):
                    seen["last"][key] = prev["tok"][r.buffer_row, s.start:s.start + s.length].clone()
            if r.idx == 0 and r.phase == "plan" and r.stats.rounds == 1 and "cache" not in seen:
                n = r.length - 1
                seen["cache"] = [dec.cache.gather(r.seq, l)[0][:n].clone() for l in range(dec.cache.num_layers)]
                seen["seq"] = dec.tokens[r.buffer_row, :n].clone()
                seen["spans"] = [(s.start, s.length) for s in r.round_spans]
                seen["prefix"] = r.prefix

    dec = Decoder(m_kernel, cfg, on_step=on_step)
    step = dec._step

    def step_after_admission():   # the token buffer as the step forwards it (admission writes the prompt)
        prev["tok"] = dec.tokens.clone()
        step()
    dec._step = step_after_admission
    dec.generate(PROMPTS[:1], PLANS[:1])
    seq = seen["seq"].clone()
    stale = 0
    for (a, n) in seen["spans"]:
        stale += int((seq[a:a + n] != seen["last"][(0, 1, a)]).sum())
        if not refresh:
            seq[a:a + n] = seen["last"][(0, 1, a)]
    assert stale > 0   # the spans' last forward did see other tokens than their final ones
    L, P = seq.shape[0], seen["prefix"]
    vis = torch.tril(torch.ones(L, L, dtype=torch.bool))
    for (a, n) in seen["spans"]:
        vis[a:a + n] = False
        vis[a:a + n, :P] = True
        vis[a:a + n, a:a + n] = True
    mask = torch.zeros(L, L).masked_fill(~vis, float("-inf"))[None, None]
    with torch.no_grad():
        out = m_ref(input_ids=seq[None], attention_mask=mask, position_ids=torch.arange(L)[None], use_cache=True)
    for l, k_cached in enumerate(seen["cache"]):
        k_fresh = out.past_key_values.layers[l].keys[0].transpose(0, 1)  # [L, Hkv, D]
        torch.testing.assert_close(k_cached, k_fresh, atol=1e-5, rtol=1e-5)


def test_demo_runs(capsys):
    from pd_kernels.__main__ import main

    assert main(["demo", "--plain", "--no-baseline", "--max-new-tokens", "200",
                 "--prompt", "rev I u O L B y F Y p ; rev a D n l P t C X W ; then rev"]) == 0   # two rounds
    out = capsys.readouterr().out
    assert "round 2: plan" in out and "span 1" in out and "crit.path" in out and "answer (eos)" in out


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("mode", ["ar", "pd"])
def test_ar_row_without_a_token_ends_the_request(monkeypatch, mode, static):
    """token_confidence returns -1 for a row with no usable id. For an AR / plan row the decoder never writes it
    into the sequence or the token buffer (the K/V path): the request ends with finish_reason "no_token", and
    the other requests of the batch are exactly as decoded alone."""
    import pd_kernels.decoder.step as step_mod

    real = step_mod.token_confidence
    victim = 7   # the seed of the request whose AR rows lose every id after its first few steps
    calls = []

    def no_token_for_victim(logits, *, seed, offset, **kw):
        tok, conf = real(logits, seed=seed, offset=offset, **kw)
        calls.append(1)
        if len(calls) > 3:
            late = (seed == victim) & ((offset >> 32) >= 3)   # the victim's own step counter, not the batch's
            tok.copy_(torch.where(late, -1, tok))
            conf.copy_(torch.where(late, float("-inf"), conf))
        return tok, conf

    monkeypatch.setattr(step_mod, "token_confidence", no_token_for_victim)
    cfg = DecodeConfig(mode=mode, policy="threshold", tags=T, **KW)
    model = tiny_model(seed=1)
    plans = [None, PLANS[1]]   # the victim samples its plan (AR rows), the other runs a forced plan
    dec = Decoder(model, cfg, backend="torch", static_step=static)
    out = dec.generate([PROMPTS[0], PROMPTS[1]], plans, seeds=[victim, 1])
    bad = out[0]
    assert bad.finish_reason == "no_token" and bad.stats.critical_path == 4
    assert any("no valid AR token" in e for e in bad.stats.plan_errors)
    assert -1 not in bad.sequence and -1 not in bad.answer
    assert int(dec.tokens_flat.min()) >= 0, "a -1 reached the token buffer"
    alone = Decoder(model, cfg, backend="torch", static_step=static).generate([PROMPTS[1]], [PLANS[1]], seeds=[1])[0]
    assert out[1].sequence == alone.sequence and out[1].finish_reason == alone.finish_reason
