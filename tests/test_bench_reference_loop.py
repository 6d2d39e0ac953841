"""The reference-style peer loop (benchmarks/reference_loop.py) gives pd_kernels.Decoder's tokens in float32.

Tiny random-weight Qwen2, fp32, CPU, torch backend, greedy, forced plans from the smoke workload (two
rounds, several spans) and the decoder tests' hand-written plans: same sequence, answer, plans, spans and
forward passes per phase, for every mode and commit policy."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.reference_loop import ReferenceLoop  # noqa: E402
from benchmarks.workload import WorkloadParams, diffusion_length, make_workload  # noqa: E402
from pd_kernels.decoder import DecodeConfig, Decoder, make_plan  # noqa: E402
from pd_kernels.models import TINY_TAGS as T  # noqa: E402
from pd_kernels.models import tiny_model  # noqa: E402

REQS = make_workload(WorkloadParams.smoke(seed=3, requests=3), T, 256)
D = diffusion_length(REQS)
HAND = [([40, 41, 42, 43, 44], [make_plan(T, [1, 2], terminator="sync"), make_plan(T, [2], terminator="eos")]),
        ([7], [make_plan(T, [2, 1, 1], topic_tokens=[[100], [101, 102], []], terminator="eos")])]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def _check(model, mode, cases, **kw):
    for prompt, forced in cases:
        cfg = DecodeConfig(mode=mode, tags=T, max_new_tokens=300, diffusion_len=D, **kw)
        ours = Decoder(model, cfg, backend="torch").generate([prompt], [forced])[0]
        peer = ReferenceLoop(model, cfg).generate(prompt, forced)
        assert peer.sequence == ours.sequence
        assert peer.answer == ours.answer
        assert peer.plans == ours.plans
        assert peer.spans == ours.spans
        assert peer.steps == ours.stats.steps
        assert peer.finish_reason == ours.finish_reason
        assert len(peer.forward_tokens) == peer.critical_path == ours.stats.critical_path


def _cases(mode):
    return [(r.prompt, r.forced(mode, T)) for r in REQS]


@pytest.mark.parametrize("policy", ["schedule", "pd_threshold", "threshold"])
@pytest.mark.parametrize("mode", ["pd", "pd-da", "ar", "diffusion"])
def test_same_tokens_as_decoder(model, mode, policy):
    _check(model, mode, _cases(mode), policy=policy, tau=0.3, steps_ratio=0.5, length_scale=2)


@pytest.mark.parametrize("confidence,tau", [("margin", 0.05), ("neg_entropy", -0.5)])   # tau in the confidence's range
def test_confidence_kinds(model, confidence, tau):
    _check(model, "pd", _cases("pd"), policy="pd_threshold", confidence=confidence, tau=tau, length_scale=2)


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_hand_written_plans(model, ratio):
    _check(model, "pd", HAND, policy="schedule", steps_ratio=ratio, length_scale=4)
    _check(model, "pd-da", HAND, policy="threshold", tau=0.2, steps_ratio=ratio, length_scale=4)


def test_unforced_ar_and_no_plan(model):
    """Sampled (not forced) AR tokens, and a PD plan with no entry (the AR text becomes the answer)."""
    _check(model, "ar", [([33, 90, 91], None)])
    _check(model, "pd", [([33, 90, 91], [[60, 61, T.eos]])], length_scale=4)


def test_errors(model):
    with pytest.raises(ValueError, match="temperature"):
        ReferenceLoop(model, DecodeConfig(tags=T, temperature=0.5))
    with pytest.raises(ValueError, match="top_p"):
        ReferenceLoop(model, DecodeConfig(tags=T), top_p=1.5)
    with pytest.raises(ValueError, match="Qwen2 / Llama"):
        ReferenceLoop(torch.nn.Linear(2, 2), DecodeConfig(tags=T))
    with pytest.raises(ValueError, match="vocabulary"):
        ReferenceLoop(model, DecodeConfig())          # Dream tag ids in a 256-token model
    loop = ReferenceLoop(model, DecodeConfig(tags=T, length_scale=4))
    with pytest.raises(ValueError, match="well-formed"):
        loop.generate([5, 6], [[T.promise, 100, T.topic_close, T.eos]])   # an entry without a number
    with pytest.raises(ValueError, match="prompt"):
        loop.generate([])


def test_top_p_changes_only_confidences(model):
    """top_p=1 keeps every token: identical to no top-p; the peer runs with the reference's 0.95 too."""
    cfg = DecodeConfig(mode="pd", tags=T, length_scale=2, max_new_tokens=300)
    r = REQS[0]
    a = ReferenceLoop(model, cfg).generate(r.prompt, r.forced("pd", T))
    b = ReferenceLoop(model, cfg, top_p=1.0).generate(r.prompt, r.forced("pd", T))
    c = ReferenceLoop(model, cfg, top_p=0.95).generate(r.prompt, r.forced("pd", T))
    assert a.sequence == b.sequence
    assert c.critical_path == a.critical_path and len(c.sequence) == len(a.sequence)
