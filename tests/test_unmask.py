"""commit_spans and the schedule arithmetic against the plain-torch reference (SPEC section 5).

token_confidence is tested in tests/test_token_confidence.py."""
from __future__ import annotations

import pytest
import torch

import pd_kernels
from pd_kernels import SpanState, commit_spans
from pd_kernels.reference.unmask import commit_spans_ref, pd_threshold_budget, schedule_count

from conftest import HAS_GPU

BACKENDS = ["triton"] + (["cuda"] if HAS_GPU else [])
MASK = 151666
# the interpreter evaluates both sides of tl.where: 0 * -inf in masked-out lanes warns, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _device():
    return "cuda" if HAS_GPU else "cpu"


# ---------------------------------------------------------------------------------------------------
# schedule arithmetic
# ---------------------------------------------------------------------------------------------------
def test_schedule_count_matches_linspace_rule():
    """The integer form equals the PD reference's fp32 linspace rule except where m (1 - s/t) is within
    float rounding of an integer; includes counts that round down."""
    rounded_down = 0
    for steps in range(1, 70):
        ts = torch.linspace(1, 1e-3, steps + 1)
        for k in range(steps):
            ratio = (1 - ts[k + 1] / ts[k]) if k < steps - 1 else torch.tensor(1.0)
            for m in range(0, 130, 3):
                if m == 0:
                    assert schedule_count(m, k, steps) == 0
                    continue
                prod = m * ratio
                ref = min(m, max(1, int(prod)))
                exact = m * 999 / (1000 * steps - 999 * k) if k < steps - 1 else m
                if abs(exact - round(exact)) < 1e-4:
                    continue
                assert schedule_count(m, k, steps) == ref, (m, k, steps)
                rounded_down += int(prod) != prod
    assert rounded_down > 100
    # r = 1 (m == steps): exactly one token per step, everything at the end
    for L in (1, 2, 10, 37):
        m = L
        for k in range(L):
            n = schedule_count(m, k, L)
            assert n == 1, (L, k, n)
            m -= n
        assert m == 0


def test_pd_threshold_budget():
    assert pd_threshold_budget(10, 0, 5, 0) == 2
    assert pd_threshold_budget(10, 4, 5, 0) == 10        # last original step: everything
    assert pd_threshold_budget(3, 7, 5, 2) == 3          # extra steps: 1 + deferred, capped at m
    assert pd_threshold_budget(9, 0, 10, 0) == 1         # never below 1
    assert pd_threshold_budget(9, 0, 10, 50) == 9        # never above m


# ---------------------------------------------------------------------------------------------------
# commit_spans
# ---------------------------------------------------------------------------------------------------
def _layout(lens, seed, extra_rows=True):
    """Spans laid out one after another in a 1D sequence with a tag before/after each; rows shuffled.
    With ``extra_rows`` the rows also cover the tags (non-mask positions: must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(L + 2 for L in lens) + 5
    seq = torch.full((total,), 5, dtype=torch.int64)
    dst, span = [], []
    p = 5
    for j, L in enumerate(lens):
        p += 1
        seq[p:p + L] = MASK
        dst += list(range(p, p + L))
        span += [j] * L
        if extra_rows:
            dst.append(p - 1)
            span.append(j)
        p += L + 1
    perm = torch.randperm(len(dst), generator=g)
    return seq, torch.tensor(dst, dtype=torch.int64)[perm], torch.tensor(span, dtype=torch.int32)[perm]


def _run_round(policy, tau, lens, steps, backend, seed, max_iters=400):
    """A whole round (until all_done) on the backend and on the reference, compared after every step."""
    dev = _device()
    seq, row_dst, row_span = _layout(lens, seed)
    S = len(lens) + 1  # one extra span never reset: masks_left 0, no rows
    st_k, st_r = SpanState.new(S, dev), SpanState.new(S)
    st_k.reset(list(range(len(lens))), lens, steps)
    st_r.reset(list(range(len(lens))), lens, steps)
    seq_k, seq_r = seq.clone().to(dev), seq.clone()
    g = torch.Generator().manual_seed(seed + 1)
    N = row_dst.shape[0]
    row_dst_d, row_span_d = row_dst.to(dev), row_span.to(dev)
    it = 0
    while True:
        tok = torch.randint(0, 1000, (N,), generator=g)
        conf = torch.rand(N, generator=g)
        conf = torch.where(torch.rand(N, generator=g) < 0.3, (conf * 4).round() / 4, conf)  # exact ties, 0, 1
        conf[torch.rand(N, generator=g) < 0.03] = float("nan")
        before = st_r.masks_left.clone()
        c_k, d_k = commit_spans(tok.to(dev), conf.to(dev), row_dst_d, row_span_d, seq_k, st_k, policy=policy,
                                tau=tau, mask_id=MASK, backend=backend)
        c_r, d_r = commit_spans_ref(tok, conf, row_dst, row_span, seq_r, st_r, policy, tau, MASK)
        assert torch.equal(seq_k.cpu(), seq_r), f"tokens differ at step {it}"
        assert torch.equal(c_k.cpu(), c_r), f"committed differ at step {it}: {c_k.tolist()} vs {c_r.tolist()}"
        for f in ("masks_left", "step", "deferred", "num_steps"):
            assert torch.equal(getattr(st_k, f).cpu(), getattr(st_r, f)), f"state.{f} differs at step {it}"
        assert bool(d_k.cpu()) == bool(d_r)
        # progress: every span with masks commits at least one token per step
        assert bool((c_r[before > 0] >= 1).all()) and bool((c_r[before == 0] == 0).all())
        it += 1
        if bool(d_r):
            break
        assert it < max_iters
    assert not bool((seq_r == MASK).any())
    return it, st_r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("policy", ["threshold", "schedule", "pd_threshold"])
def test_commit_round_matches_reference(backend, policy, tau):
    lens = [10, 0, 23, 4, 1]
    steps = [4, 3, 7, 4, 1]
    iters, st = _run_round(policy, tau, lens, steps, backend, seed=hash((policy, tau)) % 997)
    if policy == "schedule":
        assert iters == max(s for s, L in zip(steps, lens) if L > 0)
        assert st.step.tolist()[:len(lens)] == [s if L else 0 for s, L in zip(steps, lens)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_commit_many_rows(backend):
    """257 rows over 3 spans in a larger batch, schedule that rounds down (m = 100, steps = 7)."""
    _run_round("schedule", 0.9, [100, 120, 37], [7, 7, 7], backend, seed=3, max_iters=10)
    _run_round("pd_threshold", 0.9, [100, 120, 37], [5, 9, 2], backend, seed=4)


def test_commit_spec_examples():
    """Hand-checked cases of SPEC section 5 on the reference (deferral, extra steps, tie rule)."""
    seq = torch.full((6,), MASK, dtype=torch.int64)
    st = SpanState.new(1)
    st.reset([0], [6], [2])
    dst = torch.arange(6)
    span = torch.zeros(6, dtype=torch.int32)
    tok = torch.arange(100, 106)
    conf = torch.tensor([0.2, 0.95, 0.95, 0.1, 0.3, 0.96])
    c, d = commit_spans(tok, conf, dst, span, seq, st, policy="pd_threshold", tau=0.9, mask_id=MASK)
    # budget = max(1, 6 // 2) = 3: top-3 = rows 5, 1, 2 (0.95 tie -> lower position 1 first), all >= tau
    assert c.tolist() == [3] and seq.tolist() == [MASK, 101, 102, MASK, MASK, 105]
    assert st.deferred.tolist() == [0] and st.masks_left.tolist() == [3] and not bool(d)
    c, d = commit_spans(tok, conf, dst, span, seq, st, policy="pd_threshold", tau=0.9, mask_id=MASK)
    # k = 1 = last original step: budget = 3; top-1 (row 4) commits, rows 0 and 3 are deferred
    assert c.tolist() == [1] and st.deferred.tolist() == [2] and st.masks_left.tolist() == [2]
    c, d = commit_spans(tok, conf, dst, span, seq, st, policy="pd_threshold", tau=0.9, mask_id=MASK)
    # extra step: budget = min(2, 1 + 2); row 0 (0.2) commits as top-1, row 3 deferred again
    assert c.tolist() == [1] and st.deferred.tolist() == [1] and st.step.tolist() == [3]
    c, d = commit_spans(tok, conf, dst, span, seq, st, policy="pd_threshold", tau=0.9, mask_id=MASK)
    assert c.tolist() == [1] and bool(d) and seq.tolist() == list(range(100, 106))
    # threshold: the top-1 always, plus all >= tau; ties toward the lower position
    seq = torch.full((4,), MASK, dtype=torch.int64)
    st = SpanState.new(1)
    st.reset([0], [4], [4])
    c, _ = commit_spans(tok[:4], torch.tensor([0.5, 0.7, 0.7, 0.1]), dst[:4], span[:4], seq, st,
                        policy="threshold", tau=0.9, mask_id=MASK)
    assert c.tolist() == [1] and seq.tolist() == [MASK, 101, MASK, MASK]


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_opcheck_commit(backend):
    dev = _device()
    seq, row_dst, row_span = _layout([5, 3], seed=0)
    N = row_dst.shape[0]
    st = SpanState.new(3, dev)
    st.reset([0, 1], [5, 3], [2, 2])
    tok = torch.randint(0, 9, (N,), device=dev)
    conf = torch.rand(N, device=dev)
    committed = torch.empty(3, dtype=torch.int32, device=dev)
    done = torch.empty(1, dtype=torch.bool, device=dev)
    for policy in ("threshold", "schedule", "pd_threshold"):
        torch.library.opcheck(torch.ops.pd_kernels.commit_spans.default,
                              (tok, conf, row_dst.to(dev), row_span.to(dev), seq.clone().to(dev), st.masks_left,
                               st.step, st.num_steps, st.deferred, committed, done, policy, 0.5, MASK, backend))


def test_commit_errors():
    seq, row_dst, row_span = _layout([3], seed=0)
    st = SpanState.new(1)
    N = row_dst.shape[0]
    tok, conf = torch.zeros(N, dtype=torch.int64), torch.zeros(N)
    with pytest.raises(ValueError):
        commit_spans(tok, conf, row_dst, row_span, seq, st, policy="topk")
    with pytest.raises(TypeError):
        commit_spans(tok, conf, row_dst, row_span.long(), seq, st)
    with pytest.raises(ValueError):
        commit_spans(tok[:-1], conf, row_dst, row_span, seq, st)
    with pytest.raises(TypeError):
        commit_spans(tok, conf.double(), row_dst, row_span, seq, st)


def test_public_exports():
    for name in ("token_confidence", "commit_spans", "SpanState"):
        assert hasattr(pd_kernels, name)
    from pd_kernels.reference import commit_spans_ref as a, token_confidence_ref as b  # noqa: F401


@pytest.mark.parametrize("backend", ["torch", "triton"] + (["cuda"] if HAS_GPU else []))
def test_commit_out_of_range_rows_never_touch_memory(backend, device, monkeypatch):
    """A row_dst outside ``tokens`` is ignored by every backend (no read, no write); the debug mode raises.

    The token buffer is a view into a larger tensor whose guard zones hold the mask id: an unguarded kernel
    would take them for masked positions and commit into them."""
    mask = 7
    guard = torch.full((40,), mask, dtype=torch.int64, device=device)
    tokens = guard[10:30]                       # 20 tokens, 10 guard words either side
    tokens.fill_(mask)
    tokens[::3] = 1                             # some positions already committed
    token = torch.arange(100, 106, dtype=torch.int64, device=device)
    conf = torch.tensor([0.9, 0.2, 0.95, 0.4, 0.99, 0.3], dtype=torch.float32, device=device)
    row_dst = torch.tensor([1, 2, -3, 25, 4, 20], dtype=torch.int64, device=device)   # -3, 25 and 20 are outside [0, 20)
    row_span = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32, device=device)
    state = SpanState.new(2, device)
    state.reset([0, 1], [2, 1], [2, 2])
    monkeypatch.setenv("PD_KERNELS_DEBUG", "0")
    ref_tokens, ref_state = tokens.clone(), state.clone()
    rc, rd = commit_spans_ref(token, conf, row_dst, row_span, ref_tokens, ref_state, "threshold", 0.5, mask)
    c, d = commit_spans(token, conf, row_dst, row_span, tokens, state, policy="threshold", tau=0.5,
                           mask_id=mask, backend=backend)
    assert torch.equal(guard[:10], torch.full((10,), mask, device=device)) and torch.equal(guard[30:], torch.full((10,), mask, device=device))
    assert torch.equal(tokens, ref_tokens) and torch.equal(c, rc) and torch.equal(d, rd)
    assert tokens[1].item() == 100 and tokens[4].item() == 104      # the in-range rows were committed
    assert torch.equal(state.masks_left, ref_state.masks_left)
    monkeypatch.setenv("PD_KERNELS_DEBUG", "1")
    with pytest.raises(IndexError, match="row_dst"):
        commit_spans(token, conf, row_dst, row_span, tokens, state, mask_id=mask, backend=backend)
    with pytest.raises(IndexError, match="row_span"):
        commit_spans(token[:2], conf[:2], row_dst[:2], torch.tensor([0, 5], dtype=torch.int32, device=device), tokens, state,
                        mask_id=mask, backend=backend)
    with pytest.raises(ValueError, match="distinct"):
        commit_spans(token[:2], conf[:2], torch.tensor([1, 1], device=device), row_span[:2], tokens, state, mask_id=mask,
                        backend=backend)
