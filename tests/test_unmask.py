"""token_confidence / commit_spans against the plain-torch reference (SPEC section 5)."""
from __future__ import annotations

import math

import pytest
import torch

import pd_kernels
from pd_kernels import token_confidence
from pd_kernels.reference.unmask import (gumbel_noise, pd_threshold_budget, schedule_count, token_confidence_ref,
                                         top_p_filter)

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
