"""DecodeConfig and generate arguments: validation (each bad value raises naming it), presets, the sampling knobs
(top-p at every temperature, top-k, float length_scale), MASK suppression, and the AR baseline's step count."""
import copy
import math

import numpy as np
import pytest
import torch

from pd_kernels._checks import cdiv
from pd_kernels.decoder import ControlTags, DecodeConfig, Decoder, generate, make_plan, parse_plan
from pd_kernels.models import TINY_TAGS, SyllableTokenizer, tiny_model

T = TINY_TAGS
KW = dict(length_scale=4, max_new_tokens=40, tags=T)
PLAN = [make_plan(T, [1, 2], topic_tokens=[[100], [101]], terminator="sync"), make_plan(T, [1], terminator="eos")]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


# ---- DecodeConfig -------------------------------------------------------------------------------------------
BAD_CONFIG = [
    ("steps_ratio", math.nan), ("steps_ratio", math.inf), ("steps_ratio", 0), ("steps_ratio", -1.0),
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.5), ("temperature", 1e-40),
    ("temperature", 2.0**127),
    ("tau", -0.1), ("tau", 1.5), ("tau", math.nan),
    ("top_p", 0.0), ("top_p", 1.2), ("top_p", math.nan), ("top_k", -1),
    ("length_scale", 0), ("length_scale", -2.5), ("length_scale", math.inf),
    ("diffusion_len", 0), ("diffusion_len", -3), ("seed", -1), ("seed", 2**63),
    ("max_new_tokens", 0), ("max_length", 1), ("max_rounds", 0), ("max_spans", 0), ("page_size", 0),
    ("num_pages", 0), ("mode", "planned"), ("policy", "greedy"), ("confidence", "entropy"),
    ("diffusion_attention", "bidirectional"), ("answer_text", "text"),
]
BAD_TYPES = [("steps_ratio", "1.0"), ("seed", 1.5), ("max_new_tokens", 12.0), ("top_k", True),
             ("suppress_mask", "yes"), ("refresh_spans", 1), ("length_scale", "10"), ("tags", {"eos": 1}),
             ("top_p", torch.tensor(0.5)), ("top_p", True), ("top_p", np.bool_(True)), ("top_p", np.array(0.5)),
             ("top_p", 0.5 + 0j), ("tau", torch.tensor(0.5)), ("temperature", torch.tensor(1.0))]


@pytest.mark.parametrize("field,value", BAD_CONFIG, ids=[f"{f}={v}" for f, v in BAD_CONFIG])
def test_bad_config_values(field, value):
    with pytest.raises(ValueError, match=field) as e:
        DecodeConfig(**{field: value})
    assert repr(value) in str(e.value) or str(value) in str(e.value)


@pytest.mark.parametrize("field,value", BAD_TYPES, ids=[f"{f}={v!r}" for f, v in BAD_TYPES])
def test_bad_config_types(field, value):
    with pytest.raises(TypeError, match=field):
        DecodeConfig(**{field: value})


@pytest.mark.parametrize("policy", ["threshold", "pd_threshold"])
def test_tau_follows_the_confidence(policy):
    """tau lies in the range of the confidence the threshold policies compare it with: [0, 1] for prob and
    margin, <= 0 for neg_entropy (minus an entropy), so neg_entropy can be used with a threshold at all; the
    schedule policy never reads tau (the default 0.9 stays valid with neg_entropy there)."""
    ok = DecodeConfig(confidence="neg_entropy", policy=policy, tau=-0.5)
    assert ok.tau == -0.5 and DecodeConfig(confidence="neg_entropy", policy=policy, tau=0).tau == 0
    assert DecodeConfig(confidence="neg_entropy", policy=policy, tau=np.float32(-2.0)).tau == -2.0
    with pytest.raises(ValueError, match=r"tau must be a finite number <= 0.0 with confidence='neg_entropy' "
                                         r"\(minus an entropy.*got 0.9"):
        DecodeConfig(confidence="neg_entropy", policy=policy)
    with pytest.raises(ValueError, match="tau.*finite"):
        DecodeConfig(confidence="neg_entropy", policy=policy, tau=-math.inf)
    for conf in ("prob", "margin"):
        with pytest.raises(ValueError, match=rf"tau must be a finite number \[0.0, 1.0\] with confidence='{conf}'"):
            DecodeConfig(confidence=conf, policy=policy, tau=-0.5)
    with pytest.raises(ValueError, match="neg_entropy"):
        ok.replace(tau=0.3)
    assert DecodeConfig(confidence="neg_entropy").tau == 0.9 and DecodeConfig.preset("reference").tau == 0.9


def test_config_is_checked_on_replace_and_frozen():
    cfg = DecodeConfig()
    with pytest.raises(ValueError, match="tau"):
        cfg.replace(tau=2.0)
    with pytest.raises(Exception):
        cfg.tau = 2.0   # frozen: a change goes through replace (and its checks)
    with pytest.raises(ValueError, match="diffusion_attention"):
        DecodeConfig(mode="pd", diffusion_attention="full")


def test_presets():
    ref = DecodeConfig.preset("reference")
    assert (ref.confidence, ref.policy, ref.top_p, ref.top_k, ref.suppress_mask, ref.max_length,
            ref.answer_text, ref.temperature) == ("neg_entropy", "schedule", 0.95, 50, False, 1024, "reference", 0.2)
    fast = DecodeConfig.preset("fast", tags=T)
    assert (fast.policy, fast.confidence, fast.suppress_mask, fast.top_p, fast.answer_text) == \
        ("pd_threshold", "prob", True, 1.0, "spans") and fast.tags == T
    assert DecodeConfig.preset("reference", max_length=300).max_length == 300
    with pytest.raises(ValueError, match="preset"):
        DecodeConfig.preset("slow")


# ---- generate / Decoder arguments ---------------------------------------------------------------------------
def test_bad_decoder_arguments(model):
    cfg = DecodeConfig(**KW)
    for mb in (0, -1, 2.0, "2"):
        with pytest.raises(ValueError, match="max_batch"):
            Decoder(model, cfg, max_batch=mb)
    with pytest.raises(ValueError, match="backend"):
        Decoder(model, cfg, backend="gpu")
    with pytest.raises(TypeError, match="DecodeConfig"):
        Decoder(model, {"mode": "pd"})
    trained = copy.deepcopy(model).train()
    with pytest.raises(ValueError, match="training mode"):
        Decoder(trained, cfg)
    dec = Decoder(model, cfg)
    dec.max_batch = 0   # re-checked at each call (was a PagedKVCache / num_pages error)
    with pytest.raises(ValueError, match="max_batch must be an int >= 1, got 0"):
        dec.generate([[40]], [PLAN])


BAD_PROMPTS = [
    ([40, 41, 42], TypeError, "flat list"),
    ("hello world", TypeError, "tokenize"),
    (torch.tensor([40, 41]), TypeError, "1-D"),
    ([], ValueError, "at least one prompt"),
    ([[40, 41], []], ValueError, "prompt 1 is empty"),
    ([[40, 256]], ValueError, "token id 256 at position 1 is outside the model's vocabulary"),
    ([[40, -1]], ValueError, "token id -1"),
    ([[40, 41.0]], TypeError, "must be ints, got float"),
    ([["a", "b"]], TypeError, "must be ints, got str"),
    ([torch.tensor([0.5, 1.5])], TypeError, "integer token ids"),
    ([[True, 41]], TypeError, "must be ints, got bool"),
    ("x", TypeError, "a str"),
    ([[40, 2**70]], ValueError, f"token id {2**70} at position 1 is outside"),   # beyond int64: no OverflowError
    ([torch.tensor([40, 41], device="meta")], ValueError, "prompt 0 is a tensor on the meta device"),
]


@pytest.mark.parametrize("prompts,exc,match", BAD_PROMPTS, ids=[m for _, _, m in BAD_PROMPTS])
def test_bad_prompts(model, prompts, exc, match):
    with pytest.raises(exc, match=match):
        generate(model, prompts, DecodeConfig(**KW))


def test_prompt_forms(model):
    """A 2-D tensor or array is a batch of prompts; numpy ints are token ids."""
    cfg = DecodeConfig(mode="ar", **dict(KW, max_new_tokens=3))
    a = generate(model, torch.tensor([[40, 41], [42, 43]]), cfg)
    b = generate(model, [np.array([40, 41]), [np.int64(42), 43]], cfg)
    assert [r.sequence for r in a] == [r.sequence for r in b]


def test_bad_forced_plans_and_seeds(model):
    cfg = DecodeConfig(**KW)
    with pytest.raises(ValueError, match="2 forced plans for 1 prompts"):
        generate(model, [[40]], cfg, forced_plans=[None, None])
    with pytest.raises(TypeError, match="list of rounds"):
        generate(model, [[40]], cfg, forced_plans=[[T.promise, T.eos]])
    with pytest.raises(ValueError, match=r"forced_plans\[0\]\[0\]: token id 999"):
        generate(model, [[40]], cfg, forced_plans=[[[999]]])
    with pytest.raises(ValueError, match=r"seeds\[0\] must be an int in \[0, 2\^63\), got -3"):
        generate(model, [[40]], cfg, seeds=[-3])
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        generate(model, [[40]], cfg, seeds=[1, 2])


def test_seeds_as_arrays(model):
    """1-D integer arrays / tensors are seed lists like any other; other shapes and dtypes are refused."""
    cfg = DecodeConfig(temperature=1.0, **KW)
    want = [r.sequence for r in generate(model, [[40], [41]], cfg, forced_plans=[PLAN] * 2, seeds=[5, 9])]
    for seeds in (np.array([5, 9]), torch.tensor([5, 9])):
        assert [r.sequence for r in generate(model, [[40], [41]], cfg, forced_plans=[PLAN] * 2, seeds=seeds)] == want
    for seeds in (np.array([[5, 9]]), torch.tensor([5.0, 9.0])):
        with pytest.raises(TypeError, match="seeds as a"):
            generate(model, [[40], [41]], cfg, seeds=seeds)


def test_numpy_scalars_in_config_and_tags():
    """numpy numbers (from a sweep) are accepted and stored as Python numbers; a digits list becomes a tuple
    (the tags stay hashable); numpy bools are still not numbers."""
    cfg = DecodeConfig(tau=np.float32(0.5), max_new_tokens=np.int64(7), length_scale=np.int32(4), seed=np.uint8(3))
    assert (cfg.tau, cfg.max_new_tokens, cfg.length_scale, cfg.seed) == (0.5, 7, 4, 3)
    assert type(cfg.tau) is float and type(cfg.max_new_tokens) is int and type(cfg.length_scale) is int
    tags = ControlTags(eos=np.int64(5), digits=list(range(15, 25)))
    assert type(tags.eos) is int and tags.digits == tuple(range(15, 25)) and hash(tags) == hash(ControlTags(eos=5))
    with pytest.raises(TypeError, match="top_k"):
        DecodeConfig(top_k=np.True_)
    with pytest.raises(ValueError, match="digits"):
        ControlTags(digits="0123456789")


def test_huge_steps_ratio_runs(model):
    """A step count beyond int32 (the device counters) is clamped; any count >= the longest span commits one
    token per span per step under ``schedule``, so the tokens equal those of steps_ratio 1."""
    one = generate(model, [[40, 41]], DecodeConfig(**KW), forced_plans=[PLAN])[0]
    for ratio in (1e12, 1e300):
        r = generate(model, [[40, 41]], DecodeConfig(**dict(KW, steps_ratio=ratio)), forced_plans=[PLAN])[0]
        assert r.sequence == one.sequence and r.stats.steps == one.stats.steps


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_num_pages_below_the_batch_waits(model, static):
    """``num_pages`` holding one request at a time: requests wait for pages instead of failing mid-run with
    OutOfPages, and each gets the tokens it gets alone."""
    cfg = DecodeConfig(**KW)
    prompts = [[40], [41, 42], [43, 44, 45]]
    alone = [generate(model, [p], cfg, forced_plans=[PLAN], static_step=static)[0].sequence for p in prompts]
    tight = cfg.replace(num_pages=cdiv(3 + KW["max_new_tokens"], cfg.page_size))   # one request's worth
    seen = []
    out = generate(model, prompts, tight, forced_plans=[PLAN] * 3, max_batch=3, static_step=static,
                   on_step=lambda d: seen.append(len(d.running)))
    assert [r.sequence for r in out] == alone and max(seen) == 1


def test_diffusion_len_is_capped_by_the_budget(model):
    """max_new_tokens / max_length cap a diffusion canvas too: a longer diffusion_len is cut to the budget
    (finish reason "length"); one within it is used as given."""
    cfg = DecodeConfig(mode="diffusion", **dict(KW, max_new_tokens=6, diffusion_len=50))
    r = generate(model, [[40, 41, 42]], cfg)[0]
    assert len(r.sequence) == 3 + 6 and r.finish_reason == "length" and [len(s) for s in r.spans[0]] == [6]
    r = generate(model, [[40, 41, 42]], cfg.replace(max_length=7))[0]
    assert len(r.sequence) == 7 and r.finish_reason == "length"
    r = generate(model, [[40, 41, 42]], cfg.replace(diffusion_len=5))[0]
    assert len(r.sequence) == 3 + 5 and r.finish_reason == ("eos" if T.eos in r.spans[0][0] else "length")


def _biased(model, tok, bias=100.0):
    """A copy of the model whose LM head adds ``bias`` to the logit of ``tok`` (100: strongly prefers it)."""
    m = copy.deepcopy(model)
    head = m.get_output_embeddings()
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.zero_()
        new.bias[tok] = bias
    m.lm_head = new
    return m


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_diffusion_finish_reason(model, static):
    """mode="diffusion" ends with "eos" only when its canvas holds an EOS (the answer stops there), else with
    "length" (the canvas ran out); it used to say "eos" either way."""
    cfg = DecodeConfig(mode="diffusion", **dict(KW, diffusion_len=6))
    r = generate(_biased(model, T.eos, -100.0), [[40, 41, 42]], cfg, static_step=static, backend="torch")[0]
    assert T.eos not in r.spans[0][0] and r.finish_reason == "length" and len(r.answer) == 6
    r = generate(_biased(model, T.eos), [[40, 41, 42]], cfg, static_step=static, backend="torch")[0]
    assert r.spans[0][0] == [T.eos] * 6 and r.finish_reason == "eos" and r.answer == []


def test_forced_plans_refused_in_diffusion_mode(model):
    """mode="diffusion" writes no plan: a forced plan would be ignored, so it is refused (None entries pass)."""
    cfg = DecodeConfig(mode="diffusion", **KW)
    with pytest.raises(ValueError, match=r"forced_plans\[1\] is given, but mode='diffusion' writes no plan"):
        generate(model, [[40, 41], [42]], cfg, forced_plans=[None, PLAN])
    with pytest.raises(ValueError, match="mode='diffusion'"):
        Decoder(model, cfg).stream([[40]], [PLAN])
    assert len(generate(model, [[40, 41]], cfg, forced_plans=[None])) == 1


def test_model_changed_after_the_decoder_was_made(model):
    """The model is checked again at every call: training mode, a new dtype or device, tags that no longer fit."""
    m = copy.deepcopy(model)
    dec = Decoder(m, DecodeConfig(**KW), backend="torch")
    m.train()
    with pytest.raises(ValueError, match="training mode"):
        dec.generate([[40]], [PLAN])
    m.eval().double()
    with pytest.raises(ValueError, match="now torch.float64 on cpu, but this Decoder was made for torch.float32"):
        dec.generate([[40]], [PLAN])
    m.float()
    dec.cfg = DecodeConfig(mode="ar")   # Dream tag ids: beyond the tiny vocabulary
    with pytest.raises(ValueError, match="control-tag ids"):
        dec.generate([[40]])
    with pytest.raises(TypeError, match="Decoder.cfg must be a DecodeConfig"):
        dec.cfg = {"mode": "ar"}


def test_models_that_cannot_run(model):
    """Refused by name: a module that is not a causal LM (even in training mode), weights on the meta device,
    a config whose vocabulary the LM head does not have (ids are checked against the head's rows)."""
    with pytest.raises(ValueError, match="Linear is not a transformers causal LM"):
        Decoder(torch.nn.Linear(2, 2), DecodeConfig(**KW))
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        meta = Qwen2ForCausalLM(model.config).eval()
    with pytest.raises(ValueError, match="meta device"):
        Decoder(meta, DecodeConfig(**KW))
    wide = copy.deepcopy(model)
    wide.config.vocab_size = 300   # the head and embeddings still have 256 rows
    with pytest.raises(ValueError, match=r"token id 299 at position 1 is outside the model's vocabulary \[0, 256\)"):
        generate(wide, [[40, 299]], DecodeConfig(**KW))
    narrow = copy.deepcopy(model)
    narrow.model.embed_tokens = torch.nn.Embedding(200, model.config.hidden_size)
    with pytest.raises(ValueError, match="LM head has 256 rows but the input embeddings only 200"):
        Decoder(narrow, DecodeConfig(**KW))


def test_on_event_must_be_callable(model):
    with pytest.raises(TypeError, match="on_event must be callable"):
        generate(model, [[40]], DecodeConfig(**KW), on_event="print")


def test_budget_too_large_for_memory(model):
    """A budget the cache cannot hold is refused up front with the memory it needs, not in the allocator."""
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000000000: .* need [0-9.]+ GiB .* free on cpu"):
        generate(model, [[40, 41]], DecodeConfig(**dict(KW, max_new_tokens=10**12)))


def test_budget_beyond_positions_and_max_length(model):
    with pytest.raises(ValueError, match="max_position_embeddings=4096"):
        generate(model, [[40, 41]], DecodeConfig(**dict(KW, max_new_tokens=5000)))
    with pytest.raises(ValueError, match="prompt 0 has 3 tokens: no room left under max_length=3"):
        generate(model, [[40, 41, 42]], DecodeConfig(**dict(KW, max_length=3)))
    with pytest.raises(ValueError, match="num_pages=1 cannot hold"):
        generate(model, [[40, 41]], DecodeConfig(**dict(KW, num_pages=1)))


def test_max_length_is_a_total_budget(model):
    cfg = DecodeConfig(mode="ar", **dict(KW, max_length=10))
    short, long_ = generate(model, [[40, 41], [40, 41, 42, 43, 44, 45]], cfg, forced_plans=[[[60] * 20]] * 2)
    assert len(short.sequence) == 10 and len(long_.sequence) == 10


# ---- AR baseline -----------------------------------------------------------------------------------------------
def test_ar_budget_costs_one_forward_per_token(model):
    """24 new tokens take 24 forward passes (prefill + 23), not 25: the token that fills the budget ends the
    request without being forwarded."""
    r = generate(model, [[40, 41, 42]], DecodeConfig(mode="ar", **dict(KW, max_new_tokens=24)),
                 forced_plans=[[[60] * 30]])[0]
    assert r.finish_reason == "length" and len(r.sequence) == 3 + 24
    assert r.stats.critical_path == 24 and r.stats.steps == {"prefill": 1, "plan": 23, "diffusion": 0, "refresh": 0}


def _mask_loving(model):
    """A copy of the model whose LM head strongly prefers MASK."""
    return _biased(model, T.mask)


def test_mask_suppression(model):
    """AR mode never suppresses MASK (an AR model does not know it); PD spans do unless ``suppress_mask=False``
    (the reference's behaviour: a committed MASK stays in the span and is dropped from the answer)."""
    m = _mask_loving(model)
    ar = generate(m, [[40, 41]], DecodeConfig(mode="ar", **dict(KW, max_new_tokens=4)))[0]
    assert ar.sequence[2:] == [T.mask] * 4
    pd = generate(m, [[40, 41]], DecodeConfig(mode="pd", **KW), forced_plans=[PLAN])[0]
    assert all(T.mask not in s for rnd in pd.spans for s in rnd) and pd.finish_reason == "eos"
    raw = generate(m, [[40, 41]], DecodeConfig(mode="pd", suppress_mask=False, **KW), forced_plans=[PLAN])[0]
    assert all(s == [T.mask] * len(s) for rnd in raw.spans for s in rnd) and raw.answer == []


# ---- sampling knobs --------------------------------------------------------------------------------------------
def test_top_p_at_temperature_zero(model):
    """top-p applies at temperature 0 too (the reference does): a row whose top-1 probability exceeds p keeps
    only that token, so its confidence is 1 and ``threshold`` at tau=0.999 commits it at once: fewer steps."""
    peaked = copy.deepcopy(model)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(6.0)   # the random model's rows are flat: sharpen them
    base = DecodeConfig(mode="pd", policy="threshold", tau=0.999, **KW)
    full = generate(peaked, [[40, 41]], base, forced_plans=[PLAN])[0]
    nucleus = generate(peaked, [[40, 41]], base.replace(top_p=0.5), forced_plans=[PLAN])[0]
    assert nucleus.stats.steps["diffusion"] < full.stats.steps["diffusion"]
    for st in (False, True):   # the same on the static step
        again = generate(peaked, [[40, 41]], base.replace(top_p=0.5), forced_plans=[PLAN], static_step=st)[0]
        assert again.sequence == nucleus.sequence


def test_top_k(model):
    """top_k=1 leaves one token per row: sampling at any temperature is then the greedy choice (greedy with the
    same filter: every confidence is 1 under both, so the commit order is the same too)."""
    cfg = DecodeConfig(mode="pd", **KW)
    greedy = generate(model, [[40, 41]], cfg.replace(top_k=1), forced_plans=[PLAN])[0]
    for st in (False, True):
        k1 = generate(model, [[40, 41]], cfg.replace(temperature=1.5, top_k=1, seed=3), forced_plans=[PLAN],
                      static_step=st)[0]
        assert k1.sequence == greedy.sequence


def test_float_length_scale(model):
    entries, errors = parse_plan(make_plan(T, [3, 1], terminator=None), T, length_scale=2.5)
    assert [e.length for e in entries] == [7, 2] and not errors
    entries, errors = parse_plan(make_plan(T, [1], terminator=None), T, length_scale=0.5)
    assert entries == [] and "0 tokens" in errors[0]
    r = generate(model, [[40, 41]], DecodeConfig(mode="pd", **dict(KW, length_scale=2.5)), forced_plans=[PLAN])[0]
    assert [[len(s) for s in rnd] for rnd in r.spans] == [[2, 5], [2]]


def test_reference_answer_text(model):
    """``answer_text="reference"``: plan text outside its entries is kept, and ``text`` joins the pieces with a
    space as the reference's clean_text does; ours keeps the spans only."""
    plan = [[60, 61] + make_plan(T, [1], terminator=None) + [62] + make_plan(T, [1], terminator="eos")]
    tok = SyllableTokenizer(T)
    ours = generate(model, [[40, 41]], DecodeConfig(mode="pd", **KW), forced_plans=[plan])[0]
    ref = generate(model, [[40, 41]], DecodeConfig(mode="pd", answer_text="reference", **KW), forced_plans=[plan])[0]
    s0, s1 = ([t for t in s if t not in T.specials] for s in ref.spans[0])
    assert ours.spans == ref.spans
    assert ours.answer == s0 + s1 and ours.text(tok.decode) == tok.decode(s0 + s1)
    assert ref.answer == [60, 61, 62] + s0 + s1
    assert ref.pieces == [[60, 61, 62], s0, s1]
    assert ref.text(tok.decode) == " ".join(tok.decode(p).strip() for p in ref.pieces)


def test_reference_preset_runs(model):
    """The reference preset on the tiny model: no MASK suppression, neg_entropy, top-p 0.95 and top-k 50,
    sampled at 0.2, the max_length budget, on both steps alike."""
    cfg = DecodeConfig.preset("reference", tags=T, length_scale=4, max_length=48)
    r = generate(model, [[40, 41]], cfg, forced_plans=[PLAN])[0]
    assert len(r.sequence) <= 48 and r.finish_reason in ("eos", "length")
    assert r.answer_text == "reference" and isinstance(r.text(SyllableTokenizer(T).decode), str)
    assert generate(model, [[40, 41]], cfg, forced_plans=[PLAN], static_step=True)[0].sequence == r.sequence
