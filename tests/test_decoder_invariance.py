"""Batch invariance: a request's tokens do not depend on the rest of its batch, nor on when it was admitted.

Eight requests of different prompt lengths and plans (one, two or three rounds; one to three spans; one plan
with no usable entry) are decoded alone (eight runs of one request) and together: all admitted at once, in
reverse order, and joining while others run (``max_batch=3``: requests enter freed slots at every phase of the
others). Every mode, greedy and sampled, dynamic and static step, on the torch backend; the Triton
interpreter on a smaller case. The sequence, plans, spans, answer and per-phase step counts must be identical.

Greedy needs nothing but row-independent ops and a decoder that feeds no batch position into the math.
Sampling also needs the noise keyed per request: the decoder passes ``token_confidence`` one (seed, offset)
pair per row, (the request's seed, its own step counter << 32 | the absolute position), and the op hashes
only those and the column, never the packed row.
"""
import pytest

from pd_kernels.decoder import DecodeConfig, Decoder, make_plan
from pd_kernels.models import TINY_TAGS, tiny_model

T = TINY_TAGS
PROMPTS = [[40 + i for i in range(n)] for n in (3, 9, 1, 14, 5, 20, 7, 11)]
PLANS = [
    [make_plan(T, [1, 2], terminator="sync"), make_plan(T, [2], topic_tokens=[[77]], terminator="eos")],
    [make_plan(T, [3], terminator="eos")],
    [make_plan(T, [1, 1, 1], topic_tokens=[[100], [], [101, 102]], terminator="eos")],
    [make_plan(T, [2], terminator="sync"), make_plan(T, [1], terminator="sync"), make_plan(T, [1], terminator="eos")],
    [[60, 61, 62, T.eos]],                       # no usable plan entry: the plan text is the answer
    [make_plan(T, [2, 3], terminator="eos")],
    [make_plan(T, [1], terminator="sync"), make_plan(T, [2, 1], terminator="eos")],
    [make_plan(T, [3, 1], topic_tokens=[[90, 91], [92]], terminator="eos")],
]
KW = dict(length_scale=4, max_new_tokens=60, tau=0.3, diffusion_len=10)
POLICY = {"pd": "threshold", "pd-da": "pd_threshold", "ar": "schedule", "diffusion": "schedule"}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _result(r):
    s = r.stats
    return (r.sequence, r.answer, r.plans, r.spans, dict(s.steps), s.finish_reason)


def _alone(model, cfg, prompts, plans, **kw):
    return [_result(Decoder(model, cfg, **kw).generate([p], [f])[0]) for p, f in zip(prompts, plans)]


def _check(model, cfg, prompts=PROMPTS, plans=PLANS, arrivals=("together", "reversed", "joining"), **kw):
    if cfg.mode == "diffusion":   # no plan to force
        plans = [None] * len(prompts)
    alone = _alone(model, cfg, prompts, plans, **kw)
    n = len(prompts)
    for arrival in arrivals:
        order = list(range(n))[::-1] if arrival == "reversed" else list(range(n))
        dec = Decoder(model, cfg, max_batch=3 if arrival == "joining" else n, **kw)
        out = dec.generate([prompts[i] for i in order], [plans[i] for i in order])
        for k, i in enumerate(order):
            assert _result(out[k]) == alone[i], f"{arrival}: request {i} differs from its run alone"
        assert dec.step_index < sum(r.stats.critical_path for r in out)   # steps really were shared
    return alone


def _cfg(mode, **kw):
    return DecodeConfig(mode=mode, policy=POLICY[mode], tags=T, **dict(KW, **kw))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("mode", ["pd", "pd-da", "ar", "diffusion"])
def test_greedy_batch_invariant_torch(model, mode, static):
    alone = _check(model, _cfg(mode), backend="torch", static_step=static)
    if mode == "pd":   # the plans really ran: rounds, spans, a no-plan request
        assert [len(a[3]) for a in alone] == [2, 1, 1, 3, 0, 1, 2, 1]
        assert alone[4][5] == "no_plan"


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("mode", ["pd", "ar", "diffusion"])
def test_sampled_batch_invariant_torch(model, mode, static):
    _check(model, _cfg(mode, temperature=1.0, seed=11), backend="torch", static_step=static)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_per_request_seeds(model, static):
    """A request's seed, not its batch, decides its noise: each of 8 mixed requests (every prompt length and
    plan shape) with its own seed gives the same tokens alone as inside the batch of 8 (and joining, max_batch
    3); the noise really is used (not the greedy tokens), and another seed gives other tokens."""
    cfg = _cfg("pd", temperature=1.0)
    seeds = [5, 6, 7, 8, 9, 10, 11, 12]
    alone = [_result(Decoder(model, cfg, backend="torch", static_step=static).generate([p], [f], seeds=[s])[0])
             for p, f, s in zip(PROMPTS, PLANS, seeds)]
    for mb in (8, 3):
        out = Decoder(model, cfg, max_batch=mb, backend="torch", static_step=static).generate(PROMPTS, PLANS,
                                                                                              seeds=seeds)
        for i in range(8):
            assert _result(out[i]) == alone[i], f"max_batch {mb}: request {i} differs from its run alone"
    greedy = _alone(model, _cfg("pd"), PROMPTS, PLANS, backend="torch")
    assert [a[3] for a in alone] != [g[3] for g in greedy]   # the noise did change the tokens
    other = Decoder(model, cfg, backend="torch").generate([PROMPTS[0]], [PLANS[0]], seeds=[99])[0]
    assert other.spans != alone[0][3]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_batch_invariant_triton(model, sampled, static):
    """The Triton kernels (interpreter) on a smaller case: 4 requests, joining (max_batch=3)."""
    extra = dict(temperature=1.0, seed=4) if sampled else {}
    cfg = _cfg("pd", max_spans=3, **extra)
    idx = [1, 2, 4, 6]
    _check(model, cfg, prompts=[PROMPTS[i] for i in idx], plans=[PLANS[i] for i in idx], arrivals=("joining",),
           backend="triton", static_step=static)
