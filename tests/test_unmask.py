"""token_confidence / commit_spans against the plain-torch reference (SPEC section 5)."""
from __future__ import annotations

import math

import pytest
import torch

import pd_kernels
from pd_kernels import SpanState, commit_spans, token_confidence
from pd_kernels.reference.unmask import (commit_spans_ref, gumbel_noise, pd_threshold_budget, schedule_count,
                                         token_confidence_ref, top_p_filter)

from conftest import HAS_GPU, triton_dtypes

KINDS = ["prob", "margin", "neg_entropy"]
BACKENDS = ["triton"] + (["cuda"] if HAS_GPU else [])
MASK = 151666
# the interpreter evaluates both sides of tl.where: 0 * -inf in masked-out lanes warns, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _device():
    return "cuda" if HAS_GPU else "cpu"


def make_logits(N: int, V: int, dtype, seed: int, *, specials: bool = True, scale: float = 3.0):
    """Random logits with the awkward rows first: exact ties at the max, -inf entries, a huge and a tiny
    row (fp16 range), a row whose max sits on a suppressed id (id 7), NaN handled separately."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g) * scale
    if specials:
        rows = iter(range(N))
        r = next(rows, None)
        if r is not None:  # ties: the max appears 3 times, the lowest index must win
            mx = x[r].max() + 1
            x[r, [V // 2, V // 3, V - 1]] = mx
        r = next(rows, None)
        if r is not None:  # -inf entries, including a would-be maximum
            x[r, torch.randperm(V, generator=g)[: V // 4]] = float("-inf")
        r = next(rows, None)
        if r is not None:  # max on the suppressed id 7
            x[r, 7] = x[r].max() + 5
        r = next(rows, None)
        if r is not None:  # huge magnitudes (fp16 range)
            x[r] = x[r].sign() * (60000.0 - torch.rand(V, generator=g) * 100)
        r = next(rows, None)
        if r is not None:  # tiny magnitudes: nearly uniform
            x[r] = x[r] * 1e-4
        r = next(rows, None)
        if r is not None:  # exact duplicates of the max and of the second value (margin 0 / ties)
            x[r] = torch.randint(-3, 3, (V,), generator=g).float()
    return x.to(dtype)


def _run(logits, backend, **kw):
    return token_confidence(logits, backend=backend, **kw)


def _check_conf(conf, logits, tok_ref, kind, T, sup, seed=0, offset=0):
    """conf vs a float64 truth: error within 2x the fp32 reference's error (+ a few ulps of slack)."""
    _, c32 = token_confidence_ref(logits.cpu(), kind, T, seed, offset, sup)
    _, c64 = token_confidence_ref(logits.cpu(), kind, T, seed, offset, sup, compute_dtype=torch.float64)
    c64 = c64.double()
    conf = conf.cpu().double()
    nan = torch.isnan(c64)
    assert torch.equal(torch.isnan(conf), nan), "NaN pattern differs"
    err = (conf - c64).abs()[~nan]
    err_ref = (c32.double() - c64).abs()[~nan]
    tol = 2 * err_ref + 1e-6 * (1 + c64.abs()[~nan])
    assert bool((err <= tol).all()), f"max err {err.max():.3g} (ref err {err_ref.max():.3g})"


# ---------------------------------------------------------------------------------------------------
# token_confidence
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
@pytest.mark.parametrize("T", [0.0, 0.7], ids=["greedy", "T0.7"])
@pytest.mark.parametrize("kind", KINDS)
def test_row_pass_matches_reference(backend, dtype, T, kind, poison):
    dev = _device()
    N, V = 13, 1000
    x = make_logits(N, V, dtype, seed=hash((kind, T, str(dtype))) % 1000).to(dev)
    sup = torch.tensor([7, 999], device=dev)
    tok, conf = poison(torch.empty(N, dtype=torch.int64, device=dev)), poison(torch.empty(N, device=dev))
    token_confidence(x, confidence=kind, temperature=T, seed=3, offset=11, suppress_ids=sup, out=(tok, conf),
                     backend=backend)
    rt, _ = token_confidence_ref(x.cpu(), kind, T, 3, 11, sup.cpu())
    assert torch.equal(tok.cpu(), rt)
    assert not bool((tok.cpu() == 7).any()), "a suppressed id was chosen"
    _check_conf(conf, x, rt, kind, T, sup.cpu(), 3, 11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,V", [(1, 152064), (3, 151936), (3, 50257), (31, 1000), (257, 1000)],
                         ids=lambda v: str(v))
def test_row_pass_shapes(backend, N, V, poison):
    """Vocab sizes that are multiples of nothing, N from 1 (split V) to 257 (one program per row)."""
    dev = _device()
    x = make_logits(N, V, torch.float16, seed=N * 7 + V % 97).to(dev)
    tok, conf = poison(torch.empty(N, dtype=torch.int64, device=dev)), poison(torch.empty(N, device=dev))
    kind = "margin" if V > 10000 else "prob"
    token_confidence(x, confidence=kind, out=(tok, conf), backend=backend)
    rt, _ = token_confidence_ref(x.cpu(), kind)
    assert torch.equal(tok.cpu(), rt)
    assert torch.equal(rt, torch.argmax(torch.nan_to_num(x.float().cpu(), nan=float("-inf")), dim=-1))
    _check_conf(conf, x, rt, kind, 0.0, None)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_split_merge_is_exact(num_splits):
    """Splitting V across programs and merging gives the same tokens, and the same conf up to rounding."""
    from pd_kernels.ops.triton.unmask import token_confidence_triton

    dev = _device()
    N, V = 6, 5000
    x = make_logits(N, V, torch.float32, seed=5).to(dev)
    rt, _ = token_confidence_ref(x.cpu(), "neg_entropy", 0.9, 1, 2, None)
    tok = torch.empty(N, dtype=torch.int64, device=dev)
    conf = torch.empty(N, device=dev)
    token_confidence_triton(x, tok, conf, None, None, 1, 2, "neg_entropy", 0.9, num_splits=num_splits, block_v=512)
    assert torch.equal(tok.cpu(), rt)
    _check_conf(conf, x, rt, "neg_entropy", 0.9, None, 1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_stride_and_gathered_rows(backend):
    dev = _device()
    big = make_logits(20, 1100, torch.float32, seed=9).to(dev)
    x = big[3:15:3, 50:1050]  # row stride 3300, column offset: no copy
    assert x.stride() == (3300, 1)
    tok, conf = token_confidence(x, confidence="margin", backend=backend)
    rt, rc = token_confidence_ref(x.contiguous().cpu(), "margin")
    assert torch.equal(tok.cpu(), rt)
    torch.testing.assert_close(conf.cpu(), rc, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_defined(backend):
    """NaN logits are never chosen and make the row's confidence NaN (other rows unaffected)."""
    dev = _device()
    x = make_logits(4, 300, torch.float32, seed=1, specials=False)
    x[0, 10] = float("nan")
    x[0, 11] = x[0].nan_to_num(nan=-1e9).max() + 1
    x[2] = float("nan")
    x = x.to(dev)
    tok, conf = token_confidence(x, backend=backend)
    tok, conf = tok.cpu(), conf.cpu()
    assert tok[0].item() == 11 and math.isnan(conf[0].item())
    assert tok[2].item() == 0 and math.isnan(conf[2].item())  # all NaN: first index, conf NaN
    assert not bool(torch.isnan(conf[[1, 3]]).any())
    rt, rc = token_confidence_ref(x.cpu())
    assert torch.equal(tok, rt) and torch.equal(torch.isnan(conf), torch.isnan(rc))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_reproducible(backend):
    dev = _device()
    x = make_logits(8, 700, torch.float32, seed=4, specials=False, scale=1.0).to(dev)
    a, _ = token_confidence(x, temperature=1.0, seed=42, offset=5, backend=backend)
    b, _ = token_confidence(x, temperature=1.0, seed=42, offset=5, backend=backend)
    c, _ = token_confidence(x, temperature=1.0, seed=42, offset=6, backend=backend)
    d, _ = token_confidence(x, temperature=1.0, seed=42, offset=torch.tensor([5], device=dev), backend=backend)
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c), "a different offset must give different samples"
    g = torch.argmax(x, dim=-1)
    assert not torch.equal(a, g), "T=1 sampling on flat logits should not be greedy"


def test_gumbel_sampling_follows_softmax():
    """The hash noise gives the right distribution: token frequencies over many rows vs softmax(z/T)."""
    V, N, T = 6, 30000, 0.8
    z = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, float("-inf")])
    tok, conf = token_confidence_ref(z.expand(N, V), "prob", T, seed=123, offset=0)
    freq = torch.bincount(tok, minlength=V).double() / N
    p = torch.softmax(z.double() / T, -1)
    sd = (p * (1 - p) / N).sqrt()
    assert bool(((freq - p).abs() <= 5 * sd + 1e-12).all()), (freq, p)
    torch.testing.assert_close(conf.double(), p[tok], rtol=1e-5, atol=1e-7)
    g = gumbel_noise(1, 2, 4, 5000)
    assert bool(torch.isfinite(g).all())
    assert abs(g.mean().item() - 0.5772) < 0.05  # Euler-Mascheroni: the Gumbel mean


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_torch_path(backend):
    dev = _device()
    x = make_logits(5, 400, torch.float32, seed=8, specials=False, scale=2.0).to(dev)
    for T in (0.0, 0.9):
        tok, conf = token_confidence(x, temperature=T, top_p=0.9, seed=1, backend=backend)
        f = top_p_filter(x.cpu(), 0.9, T)
        rt, rc = token_confidence_ref(f, "prob", T, 1, 0)
        assert torch.equal(tok.cpu(), rt)
        torch.testing.assert_close(conf.cpu(), rc, rtol=1e-5, atol=1e-6)
    # nucleus semantics: kept mass before the last kept token <= top_p, at least one token kept
    f = top_p_filter(x.cpu(), 0.5)
    p = torch.softmax(x.cpu(), -1)
    kept = torch.isfinite(f)
    assert bool((kept.sum(-1) >= 1).all())
    assert bool(((p * kept).sum(-1) >= 0.5 - 1e-6).all())


def test_token_confidence_errors():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError):
        token_confidence(x, confidence="entropy")
    with pytest.raises(ValueError):
        token_confidence(x, temperature=-1.0)
    with pytest.raises(TypeError):
        token_confidence(x.long())
    with pytest.raises(ValueError):
        token_confidence(x.t())  # non-unit stride over V
    with pytest.raises(ValueError):
        token_confidence(x, offset=torch.tensor([1, 2]))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_opcheck_token_confidence(backend):
    dev = _device()
    x = make_logits(3, 300, torch.float32, seed=2).to(dev)
    tok = torch.empty(3, dtype=torch.int64, device=dev)
    conf = torch.empty(3, device=dev)
    sup = torch.tensor([7], device=dev)
    off = torch.tensor([4], device=dev)
    torch.library.opcheck(torch.ops.pd_kernels.token_confidence.default,
                          (x, tok, conf, sup, off, 1, 0, "margin", 0.5, backend))
    torch.library.opcheck(torch.ops.pd_kernels.token_confidence.default,
                          (x, tok, conf, None, None, 0, 3, "prob", 0.0, backend))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gpu(backend):
    x = make_logits(64, 152064, torch.bfloat16, seed=3).cuda()
    for kind in KINDS:
        tok, conf = token_confidence(x, confidence=kind, backend=backend)
        rt, _ = token_confidence_ref(x, kind)
        assert torch.equal(tok, rt)
        _check_conf(conf, x, rt, kind, 0.0, None)


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


def _lane_rows(V: int, B: int, seed: int) -> torch.Tensor:
    """fp32 rows aimed at the per-lane state of the Triton row pass (lane l holds columns l, l + B, ...):
    maxima repeated across lanes and chunks, top-2 == top-1 in another lane or the same lane, the argmax
    in the last partial chunk, all -inf but one, all -inf, NaN in one lane, +inf, a suppressed maximum."""
    g = torch.Generator().manual_seed(seed)
    last = V - 1
    rows = []
    rows.append(torch.randint(-3, 3, (V,), generator=g).float())  # many exact ties everywhere
    r = torch.randn(V, generator=g)
    r[last] = 9.0  # argmax in the last (partial) chunk
    rows.append(r)
    r = torch.randn(V, generator=g)
    r[[5 % V, (B + 2) % V, last]] = 7.0  # equal maxima in different lanes and chunks: lowest index wins
    rows.append(r)
    r = torch.randn(V, generator=g)
    a = (B - 3) % V
    r[a] = 6.0
    if a + B < V:
        r[a + B] = 6.0  # the same lane, next chunk: t2 == t1 inside one lane
    rows.append(r)
    r = torch.full((V,), float("-inf"))
    r[V // 2] = 1.5  # all -inf but one
    rows.append(r)
    rows.append(torch.full((V,), float("-inf")))  # all -inf: the first selectable id
    r = torch.randn(V, generator=g)
    r[1 % V] = float("nan")  # NaN in one lane only
    rows.append(r)
    r = torch.randn(V, generator=g)
    r[[V // 2 + 1, V - 3]] = float("inf")
    rows.append(r)
    r = torch.randn(V, generator=g) * 0.1
    r[2 % V] = 5.0
    if 2 + B < V:
        r[2 + B] = 6.0  # top-2 below top-1 in the argmax lane, every other lane lower
    rows.append(r)
    r = torch.randn(V, generator=g)
    r[(B + 4) % V] = 20.0  # on suppressed ids (see the test): never chosen
    r[(2 * B) % V] = 25.0
    r[last] = 10.0
    rows.append(r)
    return torch.stack(rows)


# log(s = 0) of an all -inf row in the interpreter: that row's confidence is NaN by definition
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("V,num_splits", [(31, 1), (32, 1), (33, 1), (101, 1), (101, 3)],
                         ids=lambda v: str(v))
def test_row_pass_lane_merge(V, num_splits, poison):
    """Per-lane state merged once after the loop (BLOCK_V = 32: V = BLOCK_V - 1, BLOCK_V, BLOCK_V + 1 and
    a partial fourth chunk), with and without split-V, every kind, greedy and sampled, against the reference."""
    from pd_kernels.ops.triton.unmask import token_confidence_triton

    dev = _device()
    B = 32
    x = _lane_rows(V, B, seed=V).to(dev)
    N = x.shape[0]
    # a: out-of-range ids (ignored) widen the id range to every chunk; b: only the chunks holding
    # B + 4 and 2B take the per-id compare (2B is the first column of chunk 2: the range test's edge)
    sup_a = torch.tensor([(B + 4) % V, (2 * B) % V, -3, V + 7, 0], device=dev)
    sup_b = torch.tensor([(2 * B) % V, (B + 4) % V], device=dev)
    for kind, T, sup in [("prob", 0.0, sup_a), ("margin", 0.0, sup_a), ("neg_entropy", 0.0, sup_b),
                         (KINDS[V % 3], 0.7, sup_b)]:
        tok, conf = poison(torch.empty(N, dtype=torch.int64, device=dev)), poison(torch.empty(N, device=dev))
        token_confidence_triton(x, tok, conf, sup, None, 5, 9, kind, T, num_splits=num_splits, block_v=B)
        rt, _ = token_confidence_ref(x.cpu(), kind, T, 5, 9, sup.cpu())
        assert torch.equal(tok.cpu(), rt), (kind, T, tok.tolist(), rt.tolist())
        _check_conf(conf, x, rt, kind, T, sup.cpu(), 5, 9)
    # the rows do what they claim (greedy, nothing suppressed but id 0 and the planted maximum)
    rt, rc = token_confidence_ref(x.cpu(), "margin", 0.0, suppress_ids=sup_a.cpu())
    assert rt[1] == V - 1 and rt[2] == min(5 % V, (B + 2) % V) and rt[4] == V // 2 and rt[5] == 1
    assert rt[9] == V - 1 and token_confidence_ref(x[9:10].cpu(), suppress_ids=sup_b.cpu())[0].item() == V - 1
    assert rc[2] == 0  # top-2 == top-1 (in another lane)
    if B - 3 + B < V:
        assert rc[3] == 0  # top-2 == top-1 (the same lane, next chunk)
    assert math.isnan(rc[6]) and math.isnan(rc[7]) and not math.isnan(rc[4])


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
