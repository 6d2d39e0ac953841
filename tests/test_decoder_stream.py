"""Streaming: ``Decoder.stream`` / ``generate(on_event=...)`` yield events as they happen, in a fixed order per
request, and what they carry adds up to the final result (tiny model, forced plans, torch backend)."""
import pytest

from pd_kernels.decoder import (DecodeConfig, Decoder, PlanToken, RequestFinished, RoundFinished, RoundStarted,
                                SpanCommit, SpanFinished, generate)
from pd_kernels.models import TINY_TAGS, tiny_model
from test_decoder import KW, PLANS, PROMPTS

T = TINY_TAGS
# The event stream is host logic over the torch backend, the same on any device: checked on the CPU only,
# so the GPU session spends its minutes on kernel tests.
pytestmark = pytest.mark.cpu_only


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def _check_request(evs, res, mode):
    """Order and content of one request's events against its result."""
    assert isinstance(evs[-1], RequestFinished) and evs[-1].result is res
    assert sum(isinstance(e, RequestFinished) for e in evs) == 1
    kinds = [type(e).__name__ for e in evs]
    if mode == "ar":
        assert set(kinds[:-1]) <= {"PlanToken"}
        assert [e.token for e in evs[:-1]] == res.plans[0]
        return
    rounds = max(e.round for e in evs if isinstance(e, RoundStarted))
    assert rounds == res.stats.rounds
    answer, committed = [], {}
    for k in range(1, rounds + 1):
        idx = lambda cls, **kw: [i for i, e in enumerate(evs) if isinstance(e, cls) and e.round == k  # noqa: E731
                                 and all(getattr(e, a) == v for a, v in kw.items())]
        start, end = idx(RoundStarted), idx(RoundFinished)
        assert len(start) == 1 and len(end) == 1 and start[0] < end[0]
        if mode != "diffusion":   # the round's plan tokens come before its spans, and are its plan
            plan = [evs[i].token for i in idx(PlanToken)]
            assert plan == res.plans[k - 1] == list(evs[start[0]].plan)
            assert all(i < start[0] for i in idx(PlanToken))
        lens = evs[start[0]].span_lengths
        for j, L in enumerate(lens):
            fin = idx(SpanFinished, span=j)
            assert len(fin) == 1 and start[0] < fin[0] < end[0]
            toks = list(evs[fin[0]].tokens)
            assert toks == res.spans[k - 1][j] and len(toks) == L
            commits = idx(SpanCommit, span=j)
            assert commits and all(start[0] < i <= fin[0] for i in commits)
            got = {}
            for i in commits:   # every mask position is committed exactly once, with its final token
                for p, t in zip(evs[i].positions, evs[i].tokens):
                    assert p not in got
                    got[p] = t
            assert [got[p] for p in sorted(got)] == toks
            committed[(k, j)] = (commits, fin[0])
            answer += [t for t in toks if t not in T.specials]
        assert list(evs[end[0]].answer) == answer[:len(evs[end[0]].answer)]
    if mode == "diffusion":
        assert list(evs[-2].answer) == res.answer
    else:
        assert answer == res.answer == list(evs[-2].answer)   # the streamed text is the final answer
    return committed


@pytest.mark.parametrize("mode", ["pd", "pd-da", "ar", "diffusion"])
def test_stream_order_and_text(model, mode):
    cfg = DecodeConfig(mode=mode, policy="schedule", tags=T, **KW)
    plans = PLANS if mode != "diffusion" else None   # no plan to force
    dec = Decoder(model, cfg, max_batch=2, backend="torch")
    events = list(dec.stream(PROMPTS, plans))
    results = {e.request: e.result for e in events if isinstance(e, RequestFinished)}
    assert sorted(results) == [0, 1, 2]
    plain = generate(model, PROMPTS, cfg, forced_plans=plans, max_batch=2, backend="torch")
    assert [results[i].sequence for i in range(3)] == [r.sequence for r in plain]   # streaming changes nothing
    for i in range(3):
        committed = _check_request([e for e in events if e.request == i], results[i], mode)
        if mode == "pd" and i == 0:
            # spans of 4 and 8 masks: span 0 is final while span 1 is still diffusing
            (c0, f0), (c1, f1) = committed[(1, 0)], committed[(1, 1)]
            assert f0 < max(c1)


def test_on_event_sees_the_stream(model):
    cfg = DecodeConfig(mode="pd", policy="threshold", tags=T, **KW)
    seen = []
    res = generate(model, PROMPTS[:2], cfg, forced_plans=PLANS[:2], backend="torch", on_event=seen.append)
    streamed = list(Decoder(model, cfg, backend="torch").stream(PROMPTS[:2], PLANS[:2]))
    assert [type(e) for e in seen] == [type(e) for e in streamed]
    done = {e.request: e.result for e in seen if isinstance(e, RequestFinished)}
    assert [r.sequence for r in res] == [done[i].sequence for i in range(2)]


def test_stream_checks_arguments_at_once(model):
    dec = Decoder(model, DecodeConfig(mode="pd", tags=T, **KW), backend="torch")
    with pytest.raises(TypeError, match="flat list"):
        dec.stream([1, 2, 3])   # raised by the call, not on the first next()


# ---- one call at a time: nested calls, superseded and abandoned streams, one model under two decoders ----------
def _sequences(results):
    return [r.sequence for r in results]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_nested_calls_are_refused(model, static):
    """generate / stream from inside on_event or on_step would reset the running call's state (it used to
    return wrong tokens): refused, and the decoder works normally afterwards."""
    cfg = DecodeConfig(mode="pd", tags=T, **KW)
    want = _sequences(generate(model, PROMPTS, cfg, forced_plans=PLANS, backend="torch"))
    dec = Decoder(model, cfg, backend="torch", static_step=static)

    def nested(_):
        dec.generate(PROMPTS[:1], PLANS[:1])

    with pytest.raises(RuntimeError, match="one call at a time"):
        dec.generate(PROMPTS, PLANS, on_event=nested)
    with pytest.raises(RuntimeError, match="one call at a time"):
        for _ in dec.stream(PROMPTS, PLANS):
            dec.on_step = lambda d: d.stream(PROMPTS[:1], PLANS[:1])
    dec.on_step = None
    assert _sequences(dec.generate(PROMPTS, PLANS)) == want
    with pytest.raises(RuntimeError, match="cfg cannot change during"):
        dec.generate(PROMPTS[:1], PLANS[:1], on_event=lambda e: setattr(dec, "cfg", cfg))
    assert model.config._attn_implementation == "sdpa"


def test_superseded_stream_raises_and_abandoned_stream_leaves_no_state(model):
    """A stream left open is ended by the next call on its decoder: resuming it raises instead of yielding another
    call's events (or stopping early without its RequestFinished); an abandoned stream changes nothing."""
    cfg = DecodeConfig(mode="pd", tags=T, **KW)
    dec = Decoder(model, cfg, backend="torch")
    want = _sequences(dec.generate(PROMPTS, PLANS))
    old = dec.stream(PROMPTS, PLANS)
    for _, _ in zip(range(5), old):
        pass
    assert _sequences(dec.generate(PROMPTS, PLANS)) == want   # the new call is unaffected
    with pytest.raises(RuntimeError, match="stream iterator has ended"):
        list(old)
    for _ in dec.stream(PROMPTS, PLANS):
        break   # abandoned after one event
    assert _sequences(dec.generate(PROMPTS, PLANS)) == want
    old = dec.stream(PROMPTS, PLANS)
    next(old)
    dec.cfg = cfg.replace(policy="threshold")   # a new config ends it too
    with pytest.raises(RuntimeError, match="stream iterator has ended"):
        next(old)
    assert model.config._attn_implementation == "sdpa"


def test_two_streams_on_one_model_close_in_any_order(model):
    """Two decoders streaming on one model: closing the first must not switch the model back to its own
    attention under the second (it used to, and the second failed); the last one closed restores it."""
    cfg = DecodeConfig(mode="pd", tags=T, **KW)
    want = _sequences(generate(model, PROMPTS[:2], cfg, forced_plans=PLANS[:2], backend="torch"))
    a = Decoder(model, cfg, backend="torch").stream(PROMPTS[:2], PLANS[:2])
    b = Decoder(model, cfg, backend="torch").stream(PROMPTS[:2], PLANS[:2])
    next(a), next(b)
    a.close()
    assert model.config._attn_implementation == "pd_kernels"
    done = {e.request: e.result.sequence for e in b if isinstance(e, RequestFinished)}
    assert [done[i] for i in range(2)] == want
    assert model.config._attn_implementation == "sdpa"
