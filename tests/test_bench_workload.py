"""The SPEC section 8 workload generator (benchmarks/workload.py): its statistics, determinism, forced plans."""
import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.workload import (SPANS_PMF, WorkloadParams, diffusion_length, make_workload,  # noqa: E402
                                 summarize)
from pd_kernels.decoder import ControlTags, DecodeConfig, Decoder, parse_plan  # noqa: E402
from pd_kernels.models import TINY_TAGS, tiny_model  # noqa: E402

DREAM = ControlTags()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def big():
    return make_workload(WorkloadParams(requests=4000, seed=11), DREAM, 152064)


def test_spans_pmf_has_spec_shape():
    """The distribution itself (no sampling noise): median 2, mean 3.14, p90 6, 34% one span."""
    cdf, c = {}, 0.0
    for k, p in SPANS_PMF:
        c += p
        cdf[k] = c
    mean = sum(k * p for k, p in SPANS_PMF)
    assert abs(c - 1) < 1e-9
    assert abs(mean - 3.14) < 0.05
    assert cdf[1] < 0.5 <= cdf[2]                       # median 2
    assert cdf[5] < 0.9 <= cdf[6]                       # p90 6
    assert abs(SPANS_PMF[0][1] - 0.34) < 1e-9


def test_sampled_statistics_match_spec(big):
    first = [len(r.rounds[0]) for r in big]
    spans = [n * 10 for r in big for rnd in r.rounds for n in rnd]
    rounds = [len(r.rounds) for r in big]
    assert statistics.median(first) == 2
    assert abs(statistics.fmean(first) - 3.14) < 0.15
    assert abs(sum(x == 1 for x in first) / len(first) - 0.34) < 0.03
    assert abs(statistics.fmean(spans) - 81) < 3 and min(spans) >= 10 and max(spans) <= 200
    assert abs(sum(x > 1 for x in rounds) / len(rounds) - 0.6) < 0.03
    assert abs(statistics.fmean(rounds) - 2.23) < 0.1 and max(rounds) <= 12 and min(rounds) == 1
    assert set(rounds) - {1} and min(x for x in rounds if x > 1) == 2
    ar = [len(r.ar_answer) for r in big]
    assert abs(statistics.fmean(ar) - 367) < 15 and min(ar) >= 32 and max(ar) <= 1024
    prompts = [len(r.prompt) for r in big]
    assert 16 <= min(prompts) and max(prompts) <= 400 and 60 < statistics.median(prompts) < 140
    s = summarize(big, DREAM, 1.0)
    assert s["requests"] == len(big) and s["spans_per_plan"]["median"] == 2


def test_seeded_and_deterministic():
    a = make_workload(WorkloadParams(seed=5), DREAM, 152064)
    b = make_workload(WorkloadParams(seed=5), DREAM, 152064)
    c = make_workload(WorkloadParams(seed=6), DREAM, 152064)
    assert [(r.prompt, r.rounds, r.topics, r.ar_answer) for r in a] == \
        [(r.prompt, r.rounds, r.topics, r.ar_answer) for r in b]
    assert [r.rounds for r in a] != [r.rounds for r in c]


def test_tokens_avoid_tags_and_digits(big):
    bad = set(DREAM.specials) | set(DREAM.digits)
    for r in big[:200]:
        assert not bad & set(r.prompt) and not bad & set(r.ar_answer)
        assert not bad & {t for rnd in r.topics for e in rnd for t in e}


@pytest.mark.parametrize("tags,vocab", [(DREAM, 152064), (TINY_TAGS, 256)])
def test_forced_plans_parse_back(tags, vocab):
    for r in make_workload(WorkloadParams(seed=2, requests=30), tags, vocab):
        plans = r.plans(tags)
        assert len(plans) == len(r.rounds)
        assert all(p[-1] == tags.sync for p in plans[:-1]) and plans[-1][-1] == tags.eos
        for p, lens in zip(plans, r.span_lengths()):
            entries, errors = parse_plan(p[:-1], tags, length_scale=r.length_scale)
            assert errors == [] and [e.length for e in entries] == lens
        assert r.forced("ar", tags) == [r.ar_answer + [tags.eos]] and r.forced("diffusion", tags) is None


def test_as_dict_stores_every_parameter():
    p = WorkloadParams(seed=3)
    d = p.as_dict()
    for k in ("seed", "spans_pmf", "span_n_pmf", "p_sync", "mean_rounds", "continue_prob", "ar_mean", "prompt_range"):
        assert k in d
    assert abs(sum(x[1] for x in d["span_n_pmf"]) - 1) < 1e-4
    assert abs(sum(k * q for k, q in d["span_n_pmf"]) - 8.1) < 0.01


@pytest.mark.parametrize("bad", [dict(requests=0), dict(p_sync=1.5), dict(span_n_max=100),
                                 dict(spans_pmf=((1, 0.5),)), dict(ar_range=(10, 5))])
def test_bad_parameters_raise(bad):
    with pytest.raises(ValueError):
        WorkloadParams(**bad)


def test_vocabulary_too_small_raises():
    with pytest.raises(ValueError, match="ordinary token ids"):
        make_workload(WorkloadParams(), ControlTags(eos=40, mask=41, async_open=42, async_close=43, promise=44,
                                                    topic_close=45, sync=46, pad=47), 48)


@pytest.mark.parametrize("mode", ["ar", "pd", "pd-da", "diffusion"])
def test_critical_path_prediction_is_the_decoders(mode):
    """The schedule-policy critical path the workload predicts is what pd_kernels.Decoder takes."""
    model = tiny_model()
    reqs = make_workload(WorkloadParams.smoke(seed=4), TINY_TAGS, 256)
    D = diffusion_length(reqs)
    for ratio in (1.0, 0.5):
        for r in reqs:
            cfg = DecodeConfig(mode=mode, tags=TINY_TAGS, steps_ratio=ratio, length_scale=r.length_scale,
                               max_new_tokens=r.new_tokens(mode, TINY_TAGS, D) + 4, diffusion_len=D)
            out = Decoder(model, cfg, backend="torch").generate([r.prompt], [r.forced(mode, TINY_TAGS)])[0]
            assert out.stats.critical_path == r.critical_path(mode, TINY_TAGS, ratio, D)
            assert out.stats.plan_errors == []
            if mode in ("pd", "pd-da"):
                assert out.stats.rounds == len(r.rounds) == 2 and out.stats.span_tokens == r.span_tokens


def test_small_workload_is_representative():
    """8 requests: the chosen sample's critical-path ratio is the population's (within 10%), the choice is
    recorded and depends only on the seed."""
    a = make_workload(WorkloadParams(seed=1), DREAM, 152064)
    b = make_workload(WorkloadParams(seed=1), DREAM, 152064)
    assert [r.rounds for r in a] == [r.rounds for r in b]
    sel = summarize(a, DREAM, 0.5)["selection"]
    assert sel["sample_seed"] // 1000 == 1 and sel["shape_error"] < 0.5
    ratio = summarize(a, DREAM, 0.5)["critical_path_schedule"]["ar_over_pd"]
    assert abs(ratio - sel["population_shape"][4]) / sel["population_shape"][4] < 0.1
    assert "selection" not in {k for k, v in summarize(make_workload(WorkloadParams.smoke(), TINY_TAGS, 256),
                                                       TINY_TAGS).items() if v}
