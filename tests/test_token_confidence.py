"""token_confidence against the plain-torch reference (SPEC section 5): tokens exactly, confidences within a
float64 truth's tolerance; the random numbers (exact Gumbel formula, 32-bit tail, batch invariance), the
all-suppressed rows, top-k / top-p, errors and registration."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

from pd_kernels import token_confidence
from pd_kernels.reference.token_confidence import (CONFIDENCE_KINDS, GUMBEL_MAX, GUMBEL_REACH, _M32, _mul32,
                                                   filter_threshold, gumbel_from_bits, gumbel_noise, random_bits,
                                                   row_state, token_confidence_ref)

from _csrc import cuda_enum, enum_of
from conftest import DEVICE, HAS_GPU, triton_dtypes

KINDS = CONFIDENCE_KINDS
BACKENDS = ["triton"] + (["cuda"] if HAS_GPU else [])
ALL_BACKENDS = ["torch"] + BACKENDS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The interpreter evaluates both sides of tl.where (0 * -inf, log(0) in masked lanes) and numpy's nanmax
# warns on an all-NaN vector: harmless there, every such value is selected away.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]



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
            x[r, 7 % V] = x[r].max() + 5
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


def _check_conf(conf, logits, kind, T, sup, seed=0, offset=0, **kw):
    """conf vs a float64 truth: error within 2x the fp32 reference's error (+ a few ulps of slack)."""
    _, c32 = token_confidence_ref(logits.cpu(), kind, T, seed, offset, sup, **kw)
    _, c64 = token_confidence_ref(logits.cpu(), kind, T, seed, offset, sup, compute_dtype=torch.float64, **kw)
    c64 = c64.double()
    conf = conf.cpu().double()
    nan = torch.isnan(c64)
    assert torch.equal(torch.isnan(conf), nan), "NaN pattern differs"
    inf = torch.isinf(c64)
    assert torch.equal(conf[inf], c64[inf]), "infinite confidences differ"
    fin = ~nan & ~inf
    err = (conf - c64).abs()[fin]
    err_ref = (c32.double() - c64).abs()[fin]
    tol = 2 * err_ref + 1e-6 * (1 + c64.abs()[fin])
    assert bool((err <= tol).all()), f"max err {err.max():.3g} (ref err {err_ref.max():.3g})"


def _empty_out(N, dev, poison):
    return poison(torch.empty(N, dtype=torch.int64, device=dev)), poison(torch.empty(N, device=dev))


# ---------------------------------------------------------------------------------------------------
# against the reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
@pytest.mark.parametrize("T", [0.0, 0.7], ids=["greedy", "T0.7"])
@pytest.mark.parametrize("kind", KINDS)
def test_row_pass_matches_reference(backend, dtype, T, kind, poison):
    dev = DEVICE
    N, V = 13, 1000
    x = make_logits(N, V, dtype, seed=hash((kind, T, str(dtype))) % 1000).to(dev)
    sup = torch.tensor([7, 999], device=dev)
    tok, conf = _empty_out(N, dev, poison)
    token_confidence(x, confidence=kind, temperature=T, seed=3, offset=11, suppress_ids=sup, out=(tok, conf),
                     backend=backend)
    rt, _ = token_confidence_ref(x.cpu(), kind, T, 3, 11, sup.cpu())
    assert torch.equal(tok.cpu(), rt)
    assert not bool((tok.cpu() == 7).any()), "a suppressed id was chosen"
    _check_conf(conf, x, kind, T, sup.cpu(), 3, 11)


@pytest.mark.parametrize("T", [0.0, 0.7], ids=["greedy", "T0.7"])
def test_bf16_rows(T, poison):
    """bf16 logits through the Triton row pass: full chunks read as int32 pairs (upcast by shift and mask, exact
    in the interpreter too), the partial chunk and the re-read of the winning vector upcast after the load;
    an odd row stride (no pairs) and a column offset of one element (rows not 4-byte aligned) as well."""
    from pd_kernels.ops.triton.token_confidence import token_confidence_triton

    dev = DEVICE
    big = make_logits(7, 1202, torch.bfloat16, seed=21).to(dev)
    odd = make_logits(7, 1201, torch.bfloat16, seed=23).to(dev)
    sup = torch.tensor([7, 640], device=dev)
    for x in (big[:, :1200], big[:, 1:1201], odd):  # pairs (stride 1202); offset by one element; odd stride
        N = x.shape[0]
        for kind in KINDS:
            tok, conf = _empty_out(N, dev, poison)
            token_confidence_triton(x, tok, conf, sup, None, None, None, 4, 2, kind, T, block_v=256)
            rt, _ = token_confidence_ref(x.cpu(), kind, T, 4, 2, sup.cpu())
            assert torch.equal(tok.cpu(), rt), kind
            _check_conf(conf, x, kind, T, sup.cpu(), 4, 2)
    y = make_logits(5, 1024, torch.bfloat16, seed=22).to(dev)  # stride 1024: the pairs path
    tok, conf = token_confidence(y, confidence="neg_entropy", suppress_ids=sup, backend="triton")
    rt, _ = token_confidence_ref(y.cpu(), "neg_entropy", suppress_ids=sup.cpu())
    assert torch.equal(tok.cpu(), rt)
    _check_conf(conf, y, "neg_entropy", 0.0, sup.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,V", [(1, 152064), (3, 151936), (3, 50257), (31, 1000), (257, 1000), (1, 1), (3, 3),
                                 (31, 31), (3, 257)], ids=lambda v: str(v))
def test_row_pass_shapes(backend, N, V, poison):
    """Vocab sizes that are multiples of nothing, N from 1 (split V) to 257 (one program per row)."""
    dev = DEVICE
    x = make_logits(N, V, torch.float16, seed=N * 7 + V % 97).to(dev)
    tok, conf = _empty_out(N, dev, poison)
    kind = {50257: "margin", 151936: "neg_entropy"}.get(V, "neg_entropy" if V < 100 else "prob")
    sup = torch.tensor([min(7, V - 1)], device=dev) if V > 1 else None
    token_confidence(x, confidence=kind, suppress_ids=sup, out=(tok, conf), backend=backend)
    rt, _ = token_confidence_ref(x.cpu(), kind, suppress_ids=None if sup is None else sup.cpu())
    assert torch.equal(tok.cpu(), rt)
    if sup is None:
        assert torch.equal(rt, torch.argmax(torch.nan_to_num(x.float().cpu(), nan=float("-inf")), dim=-1))
    _check_conf(conf, x, kind, 0.0, None if sup is None else sup.cpu())


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("T", [0.0, 0.9], ids=["greedy", "T0.9"])
def test_split_merge_is_exact(num_splits, T):
    """Splitting V across programs and merging gives the same tokens, and the same conf up to rounding."""
    from pd_kernels.ops.triton.token_confidence import token_confidence_triton

    dev = DEVICE
    N, V = 6, 3000
    x = make_logits(N, V, torch.float32, seed=5).to(dev)
    for kind in (KINDS if num_splits == 2 else ["neg_entropy"]):
        rt, _ = token_confidence_ref(x.cpu(), kind, T, 1, 2, None)
        tok = torch.empty(N, dtype=torch.int64, device=dev)
        conf = torch.empty(N, device=dev)
        token_confidence_triton(x, tok, conf, None, None, None, None, 1, 2, kind, T, num_splits=num_splits,
                                block_v=512)
        assert torch.equal(tok.cpu(), rt), kind
        _check_conf(conf, x, kind, T, None, 1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_stride_and_gathered_rows(backend):
    dev = DEVICE
    big = make_logits(20, 1100, torch.float32, seed=9).to(dev)
    x = big[3:15:3, 50:1050]  # row stride 3300, column offset: no copy
    assert x.stride() == (3300, 1)
    tok, conf = token_confidence(x, confidence="margin", backend=backend)
    rt, rc = token_confidence_ref(x.contiguous().cpu(), "margin")
    assert torch.equal(tok.cpu(), rt)
    torch.testing.assert_close(conf.cpu(), rc, rtol=1e-5, atol=1e-6, equal_nan=True)


def _lane_rows(V: int, B: int, seed: int) -> torch.Tensor:
    """fp32 rows aimed at the lane states of the Triton row pass (chunks of B columns, lanes of 4): maxima
    repeated across lanes and chunks, top-2 == top-1 in another lane or the same lane, the argmax in the
    last partial chunk, all -inf but one, all -inf, NaN in one lane, +inf, suppressed maxima (also one that
    ties the maximum inside the winning vector: the column is found again after the loop)."""
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
    rows.append(torch.full((V,), float("-inf")))  # all -inf: token -1
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
    r = torch.randn(V, generator=g)
    r[(B + 4) % V] = 12.0  # suppressed, ties the maximum at the next column of the same 4-wide vector
    r[(B + 5) % V] = 12.0
    rows.append(r)
    return torch.stack(rows)


@pytest.mark.parametrize("V,num_splits", [(31, 1), (32, 1), (33, 1), (101, 1), (101, 3)], ids=lambda v: str(v))
def test_row_pass_lane_merge(V, num_splits, poison):
    """Lane states merged once after the loop (BLOCK_V = 32: V = BLOCK_V - 1, BLOCK_V, BLOCK_V + 1 and a
    partial fourth chunk), with and without split-V, every kind, greedy and sampled, against the reference."""
    from pd_kernels.ops.triton.token_confidence import token_confidence_triton

    dev = DEVICE
    B = 32
    x = _lane_rows(V, B, seed=V).to(dev)
    N = x.shape[0]
    # a: out-of-range ids (ignored) widen the id range to every chunk; b: only the chunks holding
    # B + 4 and 2B take the per-id compare (2B is the first column of chunk 2: the range test's edge)
    sup_a = torch.tensor([(B + 4) % V, (2 * B) % V, -3, V + 7, 0], device=dev)
    sup_b = torch.tensor([(2 * B) % V, (B + 4) % V], device=dev)
    for kind, T, sup in [("prob", 0.0, sup_a), ("margin", 0.0, sup_a), ("neg_entropy", 0.0, sup_b),
                         (KINDS[V % 3], 0.7, sup_b)]:
        tok, conf = _empty_out(N, dev, poison)
        token_confidence_triton(x, tok, conf, sup, None, None, None, 5, 9, kind, T, num_splits=num_splits, block_v=B)
        rt, _ = token_confidence_ref(x.cpu(), kind, T, 5, 9, sup.cpu())
        assert torch.equal(tok.cpu(), rt), (kind, T, tok.tolist(), rt.tolist())
        _check_conf(conf, x, kind, T, sup.cpu(), 5, 9)
    # the rows do what they claim (greedy, nothing suppressed but id 0 and the planted maxima)
    rt, rc = token_confidence_ref(x.cpu(), "margin", 0.0, suppress_ids=sup_a.cpu())
    assert rt[1] == V - 1 and rt[2] == min(5 % V, (B + 2) % V) and rt[4] == V // 2 and rt[5] == -1
    assert rt[9] == V - 1 and token_confidence_ref(x[9:10].cpu(), suppress_ids=sup_b.cpu())[0].item() == V - 1
    if (B + 5) % V != (2 * B) % V:
        assert rt[10] == (B + 5) % V
    assert rc[2] == 0  # top-2 == top-1 (in another lane)
    if B - 3 + B < V:
        assert rc[3] == 0  # top-2 == top-1 (the same lane, next chunk)
    assert math.isnan(rc[6]) and math.isnan(rc[7]) and not math.isnan(rc[4]) and rc[5] == float("-inf")


# ---------------------------------------------------------------------------------------------------
# edge rows: NaN, all suppressed / -inf (issue 13)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_logits_defined(backend):
    """NaN logits are never chosen and make the row's confidence NaN (other rows unaffected)."""
    dev = DEVICE
    x = make_logits(4, 300, torch.float32, seed=1, specials=False)
    x[0, 10] = float("nan")
    x[0, 11] = x[0].nan_to_num(nan=-1e9).max() + 1
    x[2] = float("nan")
    x = x.to(dev)
    tok, conf = token_confidence(x, backend=backend)
    tok, conf = tok.cpu(), conf.cpu()
    assert tok[0].item() == 11 and math.isnan(conf[0].item())
    assert tok[2].item() == -1 and math.isnan(conf[2].item())  # nothing usable, a NaN present
    assert not bool(torch.isnan(conf[[1, 3]]).any())
    rt, rc = token_confidence_ref(x.cpu())
    assert torch.equal(tok, rt) and torch.equal(torch.isnan(conf), torch.isnan(rc))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("T", [0.0, 1.0], ids=["greedy", "T1"])
def test_rows_without_usable_entry(backend, T, poison):
    """Issue 13: a row whose every entry is suppressed or -inf gets token -1 and confidence -inf on every
    backend (NaN when the row holds a NaN at an unsuppressed id); the other rows are unaffected."""
    dev = DEVICE
    V = 37
    x = make_logits(6, V, torch.float32, seed=2, specials=False)
    sup = torch.tensor([3, 4, 5], device=dev)
    x[0] = float("-inf")                         # all -inf
    x[1] = float("-inf")
    x[1, [3, 4, 5]] = 50.0                       # only suppressed ids are finite
    x[2] = float("-inf")
    x[2, 4] = float("nan")                       # NaN on a suppressed id is removed with the id: still -inf
    x[3] = float("-inf")
    x[3, 9] = float("nan")                       # a NaN elsewhere: conf NaN, token still -1
    x = x.to(dev)
    for kind in KINDS:
        tok, conf = _empty_out(6, dev, poison)
        token_confidence(x, confidence=kind, temperature=T, suppress_ids=sup, out=(tok, conf), backend=backend)
        tok, conf = tok.cpu(), conf.cpu()
        assert tok[:4].tolist() == [-1, -1, -1, -1], (kind, tok.tolist())
        assert conf[:3].tolist() == [float("-inf")] * 3 and math.isnan(conf[3].item()), (kind, conf.tolist())
        assert bool((tok[4:] >= 0).all()) and bool(torch.isfinite(conf[4:]).all())
        rt, _ = token_confidence_ref(x.cpu(), kind, T, suppress_ids=sup.cpu())
        assert torch.equal(tok, rt)
        _check_conf(conf, x, kind, T, sup.cpu())
    # every id suppressed (V = 3): the whole batch is -1 / -inf
    y = torch.randn(2, 3, device=dev)
    tok, conf = token_confidence(y, suppress_ids=torch.tensor([2, 0, 1], device=dev), backend=backend)
    assert tok.tolist() == [-1, -1] and conf.tolist() == [float("-inf")] * 2


# ---------------------------------------------------------------------------------------------------
# random numbers: the exact Gumbel formula, the 32-bit tail, reproducibility and batch invariance
# ---------------------------------------------------------------------------------------------------
def _distinct_x() -> torch.Tensor:
    """Every distinct fp32 value of ``fp32(2r + 1)`` for r in [0, 2^31), ascending: exact below 2^24; above,
    the values some odd integer rounds to (an odd n rounds to f only if f - 1 or f + 1 does)."""
    parts = [torch.arange(1, 2**24, 2, dtype=torch.int64).to(torch.float32)]
    for k in range(24, 32):
        f = 2**k + torch.arange(0, 2**23, dtype=torch.int64) * 2 ** (k - 23)
        f32 = f.to(torch.float32)
        hit = ((f - 1).to(torch.float32) == f32) | ((f + 1).to(torch.float32) == f32)
        parts.append(f32[hit])
    parts.append(torch.tensor([2.0**32]))
    return torch.cat(parts)


@pytest.mark.slow
@pytest.mark.cpu_only   # the formula in fp32 on the CPU: the same on any machine, too slow for a GPU session
def test_gumbel_formula_exact_for_every_uniform():
    """The noise formula the kernels use (``gumbel_from_bits``), in fp32 on CPU, over every representable u of
    the 32-bit generator (both halves: u = x and u = 1 - x, x = fp32(2r + 1) 2^-33): finite, never decreasing
    in u, within 3 fp32 units (2^-24 max(1, |g|)) of the float64 value, and strictly increasing wherever the
    exact values differ by more than that resolution (equal neighbours only where fp32 cannot tell them
    apart). ``-log(-log(u))`` of a rounded u fails this near u = 1 (u rounds to 1: g = +inf)."""
    fx = _distinct_x()
    assert bool((fx[1:] > fx[:-1]).all()) and fx.numel() > 7 * 10**7
    x = fx * 2.0**-33
    # the kernels' formula, through the integer path on a sample, equals the direct fp32 evaluation below
    r = torch.tensor([0, 1, 2, 3, 2**23, 2**24 + 1, 2**30 + 12345, 2**31 - 1])
    for top in (0, 2**31):
        direct = (-torch.log(-torch.log1p(-((2 * r + 1).to(torch.float32) * 2.0**-33)))) if top else \
            (-torch.log(-torch.log((2 * r + 1).to(torch.float32) * 2.0**-33)))
        assert torch.equal(gumbel_from_bits(r + top), direct)
    for lo in range(0, x.numel(), 1 << 25):  # in slices: float64 copies of 1.4e8 values are large
        xs = x[lo:lo + (1 << 25) + 1]
        xd = xs.double()
        g = torch.cat([-torch.log(-torch.log(xs)), (-torch.log(-torch.log1p(-xs)))])
        g64 = torch.cat([-torch.log(-torch.log(xd)), (-torch.log(-torch.log1p(-xd)))])
        assert bool(torch.isfinite(g).all())
        unit = g64.abs().clamp(min=1.0) * 2.0**-24
        assert float(((g.double() - g64).abs() / unit).max()) <= 3.0
        n = xs.numel()
        # u = x ascending (first half of g), u = 1 - x descending (second half): both must not decrease in u
        for a, a64, un, sign in ((g[:n], g64[:n], unit[:n], 1), (g[n:], g64[n:], unit[n:], -1)):
            d = sign * (a[1:] - a[:-1])
            assert bool((d >= 0).all()), "the noise decreases somewhere as u grows"
            gap = (sign * (a64[1:] - a64[:-1]) / torch.minimum(un[1:], un[:-1]))[d == 0]
            assert gap.numel() == 0 or float(gap.max()) <= 4.0, "distinct noise values collapsed in fp32"
    # the two halves meet at u = 1/2; the ends are the generator's extremes
    assert gumbel_from_bits(torch.tensor([2**31 - 1])).item() == gumbel_from_bits(torch.tensor([2**32 - 1])).item()
    assert GUMBEL_MAX == gumbel_from_bits(torch.tensor([2**31])).item() > 22.87
    assert gumbel_from_bits(torch.tensor([0])).item() < -3.12
    assert GUMBEL_MAX < GUMBEL_REACH < GUMBEL_MAX + 0.01


def _count_above(t: float) -> int:
    """Number of 32-bit words whose noise exceeds t (t > 0.37: only the top-bit half can, where g falls as r
    grows): a binary search over r."""
    lo, hi = 0, 2**31  # g(lo) > t >= g(hi)
    g = lambda r: gumbel_from_bits(torch.tensor([2**31 + r])).item()  # noqa: E731
    if g(0) <= t:
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if g(mid) > t:
            lo = mid
        else:
            hi = mid
    return hi


def test_gumbel_tail_of_the_32_bit_generator():
    """P(g > t) of the generator, counted exactly over its 2^32 words, against the Gumbel tail
    1 - exp(-e^-t), up to t = 22: a token about 22 below the top can be drawn (23-bit uniforms stopped near 16.6:
    no word above it)."""
    for t in (1.0, 2.0, 5.0, 10.0, 15.0, 17.0, 19.0, 20.0, 21.0, 22.0):
        want = 2.0**32 * -math.expm1(-math.exp(-t))
        got = _count_above(t)
        assert got >= 1 and abs(got - want) <= 2 + 1e-5 * want, (t, got, want)


def test_gumbel_sampling_follows_softmax():
    """The hash noise gives the right distribution: token frequencies over many rows vs softmax(z/T), and a
    tail frequency (1000 tokens 9 below the top: 11% of the mass)."""
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
    N, K, d = 4000, 1000, 9.0
    z = torch.full((K + 1,), -d)
    z[0] = 0.0
    tok, _ = token_confidence_ref(z.expand(N, K + 1), "prob", 1.0, seed=7, offset=0)
    p_tail = K * math.exp(-d) / (1 + K * math.exp(-d))
    hits = int((tok != 0).sum())
    assert abs(hits - N * p_tail) <= 5 * math.sqrt(N * p_tail * (1 - p_tail)), (hits, N * p_tail)


def _inv32(a: int) -> int:
    return pow(a, -1, 2**32)


def _invert_to_column(h_row: torch.Tensor, bits: int) -> torch.Tensor:
    """The column whose hash under each row state ``h_row`` (int64 [M]) is ``bits`` (murmur3 rounds invert)."""
    def xs_inv(h, s):  # inverse of h ^= h >> s
        y = h
        for _ in range(32 // s + 1):
            y = h ^ (y >> s)
        return y
    rotr = lambda x, r: (x >> r) | ((x << (32 - r)) & _M32)  # noqa: E731
    h = xs_inv(bits, 16)
    h = (h * _inv32(0xC2B2AE35)) & _M32
    h = xs_inv(h, 13)
    h = (h * _inv32(0x85EBCA6B)) & _M32
    y = xs_inv(h, 16)                                          # = mix32(h_row, col)
    y = _mul32(torch.full_like(h_row, (y - 0xE6546B64) & _M32), _inv32(5))
    k = rotr(y, 13) ^ h_row                                    # = rotl(col * C1, 15) * C2
    k = rotr(_mul32(k, _inv32(0x1B873593)), 15)
    return _mul32(k, _inv32(0xCC9E2D51))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_deep_tail_token_is_drawn(backend):
    """End to end: a token 20.5 below the only other finite logit wins when its noise is above 21.5 (possible
    only with the 32-bit uniforms). The (counter, column) pair is found by inverting the hash."""
    V, seed = 1 << 16, 77
    counters = torch.arange(1 << 21, dtype=torch.int64)
    h_row = row_state(seed, counters, counters.numel())  # one row per counter, counter = offset[row]
    col = _invert_to_column(h_row, 2**31 + 1)             # r = 1: g = 21.78
    hit = torch.nonzero(col < V).squeeze(1)
    assert hit.numel() > 0
    ctr, c = int(counters[hit[0]]), int(col[hit[0]])
    g = gumbel_noise(seed, ctr, 1, V)[0]
    assert g[c].item() > 21.5
    a = int(torch.nonzero((g < 1.0) & (torch.arange(V) != c))[0])
    z = torch.full((1, V), float("-inf"))
    z[0, a] = 0.0
    z[0, c] = -20.5
    dev = DEVICE
    tok, conf = token_confidence(z.to(dev), temperature=1.0, seed=seed, offset=torch.tensor([ctr], device=dev),
                                 backend=backend)
    assert tok.item() == c, (tok.item(), c, a)
    assert token_confidence_ref(z, "prob", 1.0, seed, ctr)[0].item() == c


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sampling_reproducible(backend):
    dev = DEVICE
    x = make_logits(8, 700, torch.float32, seed=4, specials=False, scale=1.0).to(dev)
    a, _ = token_confidence(x, temperature=1.0, seed=42, offset=5, backend=backend)
    b, _ = token_confidence(x, temperature=1.0, seed=42, offset=5, backend=backend)
    c, _ = token_confidence(x, temperature=1.0, seed=42, offset=6, backend=backend)
    d, _ = token_confidence(x, temperature=1.0, seed=42, offset=torch.tensor([5], device=dev), backend=backend)
    # the counter forms agree: offset + row == a per-row tensor holding offset + row
    e, _ = token_confidence(x, temperature=1.0, seed=torch.full((8,), 42, device=dev),
                            offset=torch.arange(5, 13, device=dev), backend=backend)
    assert torch.equal(a, b) and torch.equal(a, d) and torch.equal(a, e)
    assert not torch.equal(a, c), "a different offset must give different samples"
    g = torch.argmax(x, dim=-1)
    assert not torch.equal(a, g), "T=1 sampling on flat logits should not be greedy"
    assert torch.equal(a.cpu(), token_confidence_ref(x.cpu(), "prob", 1.0, 42, 5)[0])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["prob", "neg_entropy"])
def test_sampling_is_batch_invariant(backend, kind):
    """Per-row seeds and counters: permuting the rows (with their keys) permutes the results exactly, and a
    row alone gets the token it gets in the batch (its confidence up to the rounding of a different split)."""
    dev = DEVICE
    N, V = 7, 900
    x = make_logits(N, V, torch.float32, seed=11, specials=False, scale=1.5).to(dev)
    g = torch.Generator().manual_seed(3)
    seeds = torch.randint(-2**62, 2**62, (N,), generator=g).to(dev)   # any int64 (a uint64 bit pattern)
    ctrs = torch.randint(0, 2**62, (N,), generator=g).to(dev)
    ctrs[0] = 2**63 - 1                                                 # the top of the range
    tok, conf = token_confidence(x, confidence=kind, temperature=0.8, seed=seeds, offset=ctrs, backend=backend)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4], device=dev)
    tp, cp = token_confidence(x[perm], confidence=kind, temperature=0.8, seed=seeds[perm], offset=ctrs[perm],
                              backend=backend)
    assert torch.equal(tp, tok[perm]) and torch.equal(cp, conf[perm])
    rt, _ = token_confidence_ref(x.cpu(), kind, 0.8, seeds.cpu(), ctrs.cpu())
    assert torch.equal(tok.cpu(), rt)
    for r in (0, 4):
        t1, c1 = token_confidence(x[r:r + 1], confidence=kind, temperature=0.8, seed=seeds[r:r + 1],
                                  offset=ctrs[r:r + 1], backend=backend)
        assert t1.item() == tok[r].item()
        torch.testing.assert_close(c1[0], conf[r], rtol=1e-5, atol=1e-6)
    # the noise of (row, column) does not depend on the row's position
    n1 = gumbel_noise(seeds.cpu(), ctrs.cpu(), N, 50)
    n2 = gumbel_noise(seeds.cpu()[perm.cpu()], ctrs.cpu()[perm.cpu()], N, 50)
    assert torch.equal(n2, n1[perm.cpu()])


def test_row_state_words():
    """Counters wrap mod 2^64 (offset + row carries into the high word); seeds are uint64 bit patterns."""
    h_a = row_state(5, 2**32 - 1, 3)
    h_b = row_state(5, torch.tensor([2**32 - 1, 2**32, 2**32 + 1]), 3)
    assert torch.equal(h_a, h_b)
    h_c = row_state(torch.tensor([-1, -1]), torch.tensor([0, 1]), 2)
    h_d = row_state(2**63 - 1, 0, 2)
    assert not torch.equal(h_c, h_d)
    bits = random_bits(h_a, 10)
    assert bits.dtype == torch.int64 and int(bits.min()) >= 0 and int(bits.max()) < 2**32


def test_cuda_source_uses_the_reference_constants():
    """csrc/token_confidence.cu carries GUMBEL_REACH and the hash constants (a GPU run compares tokens; this keeps
    the CPU-checked constants in step)."""
    src = open(os.path.join(ROOT, "csrc", "token_confidence.cu")).read()
    m = re.search(r"kGumbelReach\s*=\s*([0-9.]+)f", src)
    assert m and float(m.group(1)) == GUMBEL_REACH
    for c in ("0xCC9E2D51", "0x1B873593", "0xE6546B64", "0x85EBCA6B", "0xC2B2AE35"):
        assert c.lower() in src.lower()


def test_cuda_kind_ids_are_the_reference_ids():
    """csrc/token_confidence.h's ConfidenceKind enumerates CONFIDENCE_KINDS in their order (the ids' one home)."""
    ids = cuda_enum("token_confidence.h", "ConfidenceKind")
    assert ids.pop("kNumConfidenceKinds") == len(CONFIDENCE_KINDS)
    assert ids == enum_of(CONFIDENCE_KINDS)


# ---------------------------------------------------------------------------------------------------
# top-k / top-p
# ---------------------------------------------------------------------------------------------------
def _keep_sets(z: torch.Tensor, top_k: int, top_p: float, T: float):
    """Independent statement of the filters: per row, the kept ids as Python sets (stable order, floats)."""
    out = []
    for row in z.double().tolist():
        ids = sorted(range(len(row)), key=lambda i: -row[i])
        keep = set(ids)
        if top_p < 1.0:
            y = [row[i] / T if T > 0 else row[i] for i in ids]
            m = max(y)
            e = [math.exp(v - m) for v in y]
            tot = sum(e)
            mass, last = 0.0, None
            for i, v in zip(ids, e):
                if mass > top_p * tot * (1 + 1e-9) and last is not None:
                    break
                last = row[i]
                mass += v
            keep &= {i for i in ids if row[i] >= last}
        if 0 < top_k < len(row):
            kth = row[ids[top_k - 1]]
            keep &= {i for i in ids if row[i] >= kth}
        out.append(keep)
    return out


def test_filter_threshold_semantics():
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(6, 40, generator=g) * 2).round(decimals=1)  # rounded: ties at the boundaries
    z[0, :5] = 9.0                                                # a tie group at the top
    for top_k, top_p, T in [(5, 1.0, 0.0), (1, 1.0, 0.0), (3, 0.6, 0.0), (0, 0.9, 0.0), (0, 0.5, 0.7),
                            (7, 0.95, 1.3), (39, 1.0, 0.0)]:
        thr = filter_threshold(z, top_k=top_k, top_p=top_p, temperature=T)
        kept = [set(torch.nonzero(z[r] >= thr[r]).squeeze(1).tolist()) for r in range(z.shape[0])]
        assert kept == _keep_sets(z, top_k, top_p, T), (top_k, top_p, T)
    assert filter_threshold(z, top_k=0, top_p=1.0) is None and filter_threshold(z, top_k=40) is None
    # ties at the k-th value are all kept; suppressed ids are removed first (the k-th counts without them)
    z2 = torch.tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0]])
    assert filter_threshold(z2, top_k=2).item() == 4.0
    assert filter_threshold(z2, top_k=2, suppress_ids=torch.tensor([1, 2, 3])).item() == 1.0
    # a row with a NaN: NaN ranks first, a NaN floor keeps everything
    z3 = torch.tensor([[float("nan"), 1.0, 0.0]])
    assert filter_threshold(z3, top_k=1).item() == float("-inf")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("T", [0.0, 0.9], ids=["greedy", "T0.9"])
def test_top_k_top_p_match_reference(backend, T, poison):
    dev = DEVICE
    x = make_logits(9, 400, torch.float32, seed=8, specials=True, scale=2.0).to(dev)
    sup = torch.tensor([7], device=dev)
    for i, (top_k, top_p) in enumerate([(5, 1.0), (1, 1.0), (0, 0.9), (20, 0.8), (400, 1.0)]):
        for kind in (KINDS if i == 3 else [KINDS[i % 3]]):
            tok, conf = _empty_out(9, dev, poison)
            token_confidence(x, confidence=kind, temperature=T, top_k=top_k, top_p=top_p, seed=1, suppress_ids=sup,
                             out=(tok, conf), backend=backend)
            rt, _ = token_confidence_ref(x.cpu(), kind, T, 1, 0, sup.cpu(), top_k=top_k, top_p=top_p)
            assert torch.equal(tok.cpu(), rt), (top_k, top_p, kind)
            _check_conf(conf, x, kind, T, sup.cpu(), 1, 0, top_k=top_k, top_p=top_p)
            thr = filter_threshold(x.cpu(), top_k=top_k, top_p=top_p, temperature=T, suppress_ids=sup.cpu())
            if thr is not None:
                ok = rt >= 0
                assert bool((x.cpu()[ok, rt[ok]] >= thr[ok]).all()), "a filtered token was chosen"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_top_p_at_temperature_zero(backend):
    """The PD reference's top-p at T = 0: a row whose top-1 probability exceeds p keeps only that token, so
    prob is exactly 1 and neg_entropy exactly 0 (rows then tie); filter_greedy=False ignores the filters."""
    dev = DEVICE
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    x[0, 17] = 12.0                      # p(top1) ~ 0.997 > 0.95
    x[1, 5] = x[1, 6] = 12.0             # two tied tokens share the mass: both kept, the lower id wins
    x = x.to(dev)
    t, p = token_confidence(x, confidence="prob", top_p=0.95, backend=backend)
    _, ne = token_confidence(x, confidence="neg_entropy", top_p=0.95, backend=backend)
    assert t[0].item() == 17 and p[0].item() == 1.0 and ne[0].item() == 0.0
    assert t[1].item() == 5 and abs(p[1].item() - 0.5) < 1e-6
    _, p_off = token_confidence(x, confidence="prob", top_p=0.95, filter_greedy=False, backend=backend)
    _, p_none = token_confidence(x, confidence="prob", backend=backend)
    assert torch.equal(p_off, p_none) and p_none[0].item() < 1.0
    rt, rc = token_confidence_ref(x.cpu(), "prob", top_p=0.95)
    assert rc[0].item() == 1.0 and torch.equal(t.cpu(), rt)


# ---------------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------------
def test_token_confidence_errors():
    x = torch.randn(3, 10)
    cases = [
        (ValueError, dict(confidence="entropy"), "confidence"),
        (ValueError, dict(temperature=-1.0), "temperature"),
        (ValueError, dict(temperature=float("nan")), "temperature"),
        (ValueError, dict(offset=torch.tensor([1, 2])), "offset"),
        (TypeError, dict(offset=torch.tensor([1, 2, 3], dtype=torch.int32)), "offset"),
        (ValueError, dict(offset=-1), "offset"),
        (ValueError, dict(seed=2**63), "seed"),
        (ValueError, dict(seed=torch.tensor([1])), "seed"),
        (TypeError, dict(seed=torch.tensor([1.0, 2.0, 3.0])), "seed"),
        (ValueError, dict(top_k=-1), "top_k"),
        (ValueError, dict(top_k=2.0), "top_k"),
        (ValueError, dict(top_p=0.0), "top_p"),
        (ValueError, dict(top_p=1.5), "top_p"),
        (TypeError, dict(suppress_ids=torch.tensor([1.0])), "suppress_ids"),
        (ValueError, dict(suppress_ids=torch.tensor([[1]])), "suppress_ids"),
        (TypeError, dict(out=(torch.empty(3, dtype=torch.int32), torch.empty(3))), "token"),
        (ValueError, dict(out=(torch.empty(4, dtype=torch.int64), torch.empty(4))), "out"),
    ]
    for exc, kw, word in cases:
        with pytest.raises(exc, match=word):
            token_confidence(x, **kw)
    with pytest.raises(TypeError, match="logits"):
        token_confidence(x.long())
    with pytest.raises(ValueError, match="unit stride"):
        token_confidence(x.t())  # non-unit stride over V
    with pytest.raises(ValueError, match="logits"):
        token_confidence(x[0])
    with pytest.raises(ValueError, match="columns"):
        token_confidence(torch.randn(3, 0))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(temperature=float("inf")), ValueError, "temperature must be >= 0 and at most"),
    (dict(temperature=1e300), ValueError, "temperature must be >= 0 and at most"),
    (dict(temperature=1e-40), ValueError, "too small"),
    (dict(temperature="1"), TypeError, "temperature must be a real number"),
    (dict(temperature=torch.tensor(1.0)), TypeError, "temperature must be a real number"),
    (dict(confidence=["prob"]), ValueError, "confidence must be one of"),
    (dict(out=(torch.empty(3, dtype=torch.int64), torch.empty(3), None)), TypeError, "pair of tensors, got tuple of 3"),
], ids=["T_inf", "T_huge", "T_tiny", "T_str", "T_tensor", "confidence_list", "out_triple"])
def test_token_confidence_argument_errors(kw, exc, match):
    """Temperatures whose fp32 reciprocal is 0 or inf gave different confidences on torch and Triton (inf: 1/N
    vs NaN); the others failed deep inside Python with a message naming nothing."""
    with pytest.raises(exc, match=match):
        token_confidence(torch.randn(3, 10), **kw)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_temperature_range_edges_agree(backend):
    """Extreme accepted temperatures give the reference's tokens and confidences: the largest, and tiny ones
    while ``z / T`` stays finite in fp32 (the reference scales first; beyond that, see the docstring)."""
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(3))
    dev = DEVICE if backend != "torch" else "cpu"
    for T in (1e-30, 2.0**126):
        t, c = token_confidence(x.to(dev), temperature=T, seed=5, backend=backend)
        rt, rc = token_confidence_ref(x, "prob", T, 5, 0)
        assert t.cpu().tolist() == rt.tolist(), T
        torch.testing.assert_close(c.cpu(), rc, equal_nan=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_suppressed_ids_beyond_int32_are_ignored(backend, poison):
    """An int64 id of 2^32 + v is out of range (ignored, as documented), not column v: Triton cast ids to int32
    and suppressed v."""
    dev = DEVICE if backend != "torch" else "cpu"
    x = torch.randn(5, 70, generator=torch.Generator().manual_seed(1)).to(dev)
    top = x.argmax(1)
    for sup in (top + 2**32, top - 2**32, torch.tensor([-1, 70, 2**31 - 1, 2**31, 2**63 - 1], device=dev)):
        t, c = token_confidence(x, suppress_ids=sup, out=(poison(torch.empty(5, dtype=torch.int64, device=dev)),
                                                      poison(torch.empty(5, device=dev))),
                                backend=backend)
        rt, rc = token_confidence(x.cpu(), backend="torch")
        assert t.cpu().tolist() == rt.tolist() == top.cpu().tolist()
        torch.testing.assert_close(c.cpu(), rc)
    # in-range ids still apply, next to out-of-range ones
    t, _ = token_confidence(x, suppress_ids=torch.cat([top + 2**32, top]), backend=backend)
    assert not (t == top).any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_sharing_memory_is_refused(backend):
    dev = DEVICE if backend != "torch" else "cpu"
    x = torch.randn(4, 10, device=dev)
    tok = torch.empty(4, dtype=torch.int64, device=dev)
    with pytest.raises(ValueError, match="share memory"):
        token_confidence(x, out=(tok, tok.view(torch.float32)[:4]), backend=backend)
    with pytest.raises(ValueError, match="share memory with logits"):
        token_confidence(x, out=(tok, x[3, 2:6]), backend=backend)
    with pytest.raises(ValueError, match="share memory with logits"):
        token_confidence(x, out=(x.view(torch.int64)[0, :4], torch.empty(4, device=dev)), backend=backend)
    t, c = token_confidence(x[:2], out=(tok[:2], x[2, :2]), backend=backend)   # beside the rows read: fine
    assert t.tolist() == x[:2].argmax(1).tolist()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck_token_confidence(backend):
    dev = DEVICE
    x = make_logits(3, 300, torch.float32, seed=2).to(dev)
    tok = torch.empty(3, dtype=torch.int64, device=dev)
    conf = torch.empty(3, device=dev)
    sup = torch.tensor([7], device=dev)
    off = torch.tensor([4], device=dev)
    rows = torch.tensor([4, 9, 2**40], device=dev)
    thr = torch.full((3,), -1.0, device=dev)
    op = torch.ops.pd_kernels.token_confidence.default
    torch.library.opcheck(op, (x, tok, conf, sup, None, off, None, 1, 0, "margin", 0.5, backend))
    torch.library.opcheck(op, (x, tok, conf, None, None, None, None, 0, 3, "prob", 0.0, backend))
    torch.library.opcheck(op, (x, tok, conf, sup, rows, rows, thr, 0, 0, "neg_entropy", 1.0, backend))


def test_public_exports():
    import pd_kernels
    from pd_kernels.ops import token_confidence as op
    from pd_kernels.reference import token_confidence_ref as ref

    assert pd_kernels.token_confidence is op is token_confidence and ref is token_confidence_ref


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gpu(backend):
    x = make_logits(64, 152064, torch.bfloat16, seed=3).cuda()
    sup = torch.tensor([151666], device="cuda")
    for kind in KINDS:
        for T in (0.0, 0.8):
            tok, conf = token_confidence(x, confidence=kind, temperature=T, seed=9, suppress_ids=sup,
                                         backend=backend)
            rt, _ = token_confidence_ref(x, kind, T, 9, 0, sup)
            assert torch.equal(tok, rt)
            _check_conf(conf, x, kind, T, sup.cpu(), 9, 0)
