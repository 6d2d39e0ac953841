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

from pd_kernels.cli.check_batch import ARRIVALS, batch_invariance, fingerprint, scenario_plans, scenario_prompts
from pd_kernels.decoder import DecodeConfig, Decoder
from pd_kernels.models import TINY_TAGS, tiny_model

from conftest import DEVICE

T = TINY_TAGS
PROMPTS = scenario_prompts(list(range(40, 60)))   # the scenario --check-batch runs too: 8 lengths, 8 plans
PLANS = scenario_plans(T)
KW = dict(length_scale=4, max_new_tokens=60, tau=0.3, diffusion_len=10)
POLICY = {"pd": "threshold", "pd-da": "pd_threshold", "ar": "schedule", "diffusion": "schedule"}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, device=DEVICE)


def _alone(model, cfg, prompts, plans, **kw):
    return [fingerprint(Decoder(model, cfg, **kw).generate([p], [f])[0]) for p, f in zip(prompts, plans)]


def _check(model, cfg, prompts=PROMPTS, plans=PLANS, arrivals=ARRIVALS, seeds=None, **kw):
    res = batch_invariance(model, cfg, prompts, plans, seeds=seeds, arrivals=arrivals, **kw)
    assert not res.differs, [f"{arrival}: request {i} differs from its run alone" for arrival, i in res.differs]
    assert set(res.steps) == set(arrivals)
    for arrival, (run, path) in res.steps.items():
        assert run < path, f"{arrival}: no step was shared"   # steps really were shared
    return res.alone


def test_the_scenario_is_the_documented_one():
    assert PROMPTS == [[40 + i for i in range(n)] for n in (3, 9, 1, 14, 5, 20, 7, 11)]
    assert [len(p) for p in PLANS] == [2, 1, 1, 3, 1, 1, 2, 1]   # rounds per request
    assert PLANS[4] == [[60, 61, 62, T.eos]]   # no usable plan entry: the plan text is the answer


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
    alone = _check(model, cfg, seeds=seeds, arrivals=("together", "joining"), backend="torch", static_step=static)
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
