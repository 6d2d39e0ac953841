"""commit_spans against the plain-torch reference (SPEC section 5), and the schedule arithmetic of its policies.

Span mixes with awkward lengths (1, 7, 63, 97, 130, 433 rows) in random order of span ids, spans without rows,
rows already committed, tag rows, rows of no span, out-of-range destinations, NaN / -inf / tied confidences and
negative tokens, for every policy and tau; the token buffer and the row tensors are views into larger buffers
whose guard zones hold MASK positions that an unguarded kernel would commit; outputs are poisoned first.
"""
from __future__ import annotations

import pytest
import torch

import pd_kernels
from pd_kernels import SpanState, commit_spans
from pd_kernels.reference.commit_spans import (POLICIES, commit_spans_ref, pd_threshold_budget, schedule_count,
                                               span_row_range)

from _csrc import cuda_enum, enum_of
from conftest import DEVICE, HAS_GPU, INT_POISON

BACKENDS = ["triton"] + (["cuda"] if HAS_GPU else [])
TAUS = [0.0, 0.5, 0.9, 1.0]
MASK = 151666
AWKWARD = [1, 7, 63, 97, 130, 433]
G = 8  # guard elements / guard rows on each side


class Mix:
    """One step's inputs: spans of ``lens`` rows under random span ids (``S = len(lens) + extra``; the extra
    ids have no rows, one of them still has masks left), laid out in a token buffer ``tokens`` (a view with
    ``G`` MASK guard elements each side). Each span owns a contiguous run of rows (its mask positions in
    shuffled order, a tag row, sometimes a row whose destination is outside ``tokens``); runs come in random
    order with rows of no span between them, which point at MASK "bait" positions. The row tensors are views
    with ``G`` guard rows each side that also point at bait and have valid tokens and confidence 1."""

    def __init__(self, lens, seed: int, extra: int = 2, device="cpu", committed_frac: float = 0.1):
        g = torch.Generator().manual_seed(seed)
        self.g = g
        n_sp = len(lens)
        self.S = n_sp + extra
        ids = torch.randperm(self.S, generator=g).tolist()
        self.sid = ids[:n_sp]                 # span k has id sid[k]
        self.idle = ids[n_sp:]                # ids without rows
        total = sum(L + 2 for L in lens) + 2 * G + 3 * len(lens) + 8
        T = total
        store = torch.full((T + 2 * G,), 5, dtype=torch.int64)
        store[:G] = MASK
        store[-G:] = MASK
        tokens = store[G:G + T]
        p = 0
        span_pos = []
        for L in lens:
            tokens[p] = 3                      # <async>
            pos = list(range(p + 1, p + 1 + L))
            tokens[p + 1:p + 1 + L] = MASK
            done = torch.rand(L, generator=g) < committed_frac
            tokens[torch.tensor(pos, dtype=torch.int64)[done]] = 9  # already committed
            tokens[p + 1 + L] = 4              # </async>
            span_pos.append((p, pos))
            p += L + 2
        bait = list(range(p, T))
        tokens[p:] = MASK                      # positions no span owns: must never be written
        self.bait = bait
        rows_dst, span_rows = [], [[0, 0] for _ in range(self.S)]
        order = torch.randperm(n_sp, generator=g).tolist()
        bi = 0
        for k in order:
            if torch.rand(1, generator=g).item() < 0.5:  # rows of no span between the runs
                n_gap = int(torch.randint(1, 4, (1,), generator=g))
                rows_dst += bait[bi:bi + n_gap]
                bi += n_gap
            tag, pos = span_pos[k]
            run = [pos[i] for i in torch.randperm(len(pos), generator=g).tolist()] + [tag]
            if torch.rand(1, generator=g).item() < 0.4:
                run.insert(int(torch.randint(0, len(run) + 1, (1,), generator=g)),
                           -1 - int(torch.randint(0, G, (1,), generator=g)) if k % 2 else T + int(torch.randint(0, G, (1,), generator=g)))
            span_rows[self.sid[k]] = [len(rows_dst), len(run)]
            rows_dst += run
        rows_dst += bait[bi:bi + 2]
        bi += 2
        self.N = N = len(rows_dst)
        guard_dst = bait[bi:bi + 2 * G]
        assert len(guard_dst) == 2 * G
        self.guard_bait = guard_dst
        self.store = store.to(device)
        self.tokens = self.store[G:G + T]
        dst_store = torch.tensor(guard_dst[:G] + rows_dst + guard_dst[G:], dtype=torch.int64)
        self.dst_store = dst_store.to(device)
        self.row_dst = self.dst_store[G:G + N]
        self.span_rows = torch.tensor(span_rows, dtype=torch.int32).to(device)
        self.lens = lens
        self.masks = [int((tokens[torch.tensor(pos, dtype=torch.int64)] == MASK).sum()) if pos else 0
                      for _, pos in span_pos]
        self.device = device

    def state(self, steps, seed: int = 0) -> SpanState:
        st = SpanState.new(self.S, self.device)
        st.reset(self.sid, self.masks, steps)
        if len(self.idle) > 1:
            st.reset([self.idle[0]], [3], [2])  # masks left but no rows this step: untouched
        return st

    def rows(self, *, neg_frac: float = 0.05, nan_frac: float = 0.03):
        """token, conf views (``G`` guard rows each side: token 1, conf 1)."""
        g, N = self.g, self.N
        tok = torch.randint(0, 1000, (N,), generator=g)
        tok[torch.rand(N, generator=g) < neg_frac] = -1
        conf = torch.rand(N, generator=g)
        conf = torch.where(torch.rand(N, generator=g) < 0.3, (conf * 4).round() / 4, conf)  # ties, 0, 1
        conf[torch.rand(N, generator=g) < nan_frac] = float("nan")
        conf[torch.rand(N, generator=g) < 0.02] = float("-inf")
        conf[torch.rand(N, generator=g) < 0.01] = float("inf")
        tok_store = torch.ones(N + 2 * G, dtype=torch.int64)
        conf_store = torch.ones(N + 2 * G)
        tok_store[G:G + N] = tok
        conf_store[G:G + N] = conf
        tok_store, conf_store = tok_store.to(self.device), conf_store.to(self.device)
        return tok_store[G:G + N], conf_store[G:G + N]


def _same_state(a: SpanState, b: SpanState, what: str):
    for f in ("masks_left", "step", "num_steps", "deferred"):
        assert torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()), (
            f"{what}: state.{f} {getattr(a, f).tolist()} vs reference {getattr(b, f).tolist()}")


def _step(mix: Mix, st_k, st_r, store_r, policy, tau, backend, tok=None, conf=None, all_bait=True, **kw):
    """One call on the backend and on the reference; everything compared; returns (committed, all_done).
    ``all_bait``: the rows of no span must not commit either (false when a test moves the span ranges)."""
    if tok is None:
        tok, conf = mix.rows(**kw)
    tokens_r = store_r[G:G + mix.tokens.shape[0]]
    c_r, d_r = commit_spans_ref(tok.cpu(), conf.cpu(), mix.row_dst.cpu(), mix.span_rows.cpu(), tokens_r, st_r, policy,
                                tau, MASK)
    committed = torch.full((mix.S,), INT_POISON, dtype=torch.int32, device=mix.device)
    done = torch.full((1,), not bool(d_r), dtype=torch.bool, device=mix.device)  # poisoned: the wrong answer
    c_k, d_k = commit_spans(tok, conf, mix.row_dst, mix.span_rows, mix.tokens, st_k, policy=policy, tau=tau,
                            mask_id=MASK, out=(committed, done), backend=backend)
    assert torch.equal(mix.store.cpu(), store_r), "tokens differ (guard zones included)"
    assert torch.equal(c_k.cpu(), c_r), f"committed {c_k.tolist()} vs reference {c_r.tolist()}"
    assert bool(d_k.cpu()) == bool(d_r)
    _same_state(st_k, st_r, "kernel vs reference")
    assert st_k.arrivals.item() == 0, "the arrival counter must be back to 0 after a call"
    # the guard rows (and the rows of no span) point at bait positions: never committed
    bait = mix.bait if all_bait else mix.guard_bait
    assert bool((store_r[G:][torch.tensor(bait)] == MASK).all())
    return c_r, d_r


def _run(mix: Mix, steps, policy, tau, backend, max_iters: int, **kw):
    st_k, st_r = mix.state(steps), mix.state(steps)
    st_r = SpanState(*(t.cpu() for t in (st_r.masks_left, st_r.step, st_r.num_steps, st_r.deferred)))
    store_r = mix.store.cpu().clone()
    it = 0
    for it in range(max_iters):
        before = st_r.masks_left.clone()
        c, d = _step(mix, st_k, st_r, store_r, policy, tau, backend, **kw)
        rows_of = {mix.sid[k]: k for k in range(len(mix.lens))}
        for j in range(mix.S):
            if j not in rows_of:
                assert c[j] == 0 and st_r.masks_left[j] == before[j], "a span without rows changed"
        if bool(d) or all(st_r.masks_left[j] == 0 for j in mix.sid):
            break
    return it + 1, st_r


# ---------------------------------------------------------------------------------------------------
# the reference itself (hand-checked cases of SPEC section 5)
# ---------------------------------------------------------------------------------------------------
def _one_span(n):
    return torch.full((n,), MASK, dtype=torch.int64), torch.arange(n), torch.tensor([[0, n]], dtype=torch.int32)


def test_commit_spec_examples():
    seq, dst, rows = _one_span(6)
    st = SpanState.new(1)
    st.reset([0], [6], [2])
    tok = torch.arange(100, 106)
    conf = torch.tensor([0.2, 0.95, 0.95, 0.1, 0.3, 0.96])
    c, d = commit_spans(tok, conf, dst, rows, seq, st, policy="pd_threshold", tau=0.9, mask_id=MASK)
    # budget = max(1, 6 // 2) = 3: top-3 = rows 5, 1, 2 (0.95 tie -> lower position 1 first), all >= tau
    assert c.tolist() == [3] and seq.tolist() == [MASK, 101, 102, MASK, MASK, 105]
    assert st.deferred.tolist() == [0] and st.masks_left.tolist() == [3] and not bool(d)
    c, d = commit_spans(tok, conf, dst, rows, seq, st, policy="pd_threshold", tau=0.9, mask_id=MASK)
    # k = 1 = last original step: budget = 3; top-1 (row 4) commits, rows 0 and 3 are deferred
    assert c.tolist() == [1] and st.deferred.tolist() == [2] and st.masks_left.tolist() == [2]
    c, d = commit_spans(tok, conf, dst, rows, seq, st, policy="pd_threshold", tau=0.9, mask_id=MASK)
    # extra step: budget = min(2, 1 + 2); row 0 (0.2) commits as top-1, row 3 deferred again
    assert c.tolist() == [1] and st.deferred.tolist() == [1] and st.step.tolist() == [3]
    c, d = commit_spans(tok, conf, dst, rows, seq, st, policy="pd_threshold", tau=0.9, mask_id=MASK)
    assert c.tolist() == [1] and bool(d) and seq.tolist() == list(range(100, 106))
    # threshold: the top-1 always, plus all >= tau; ties toward the lower position
    seq, dst, rows = _one_span(4)
    st = SpanState.new(1)
    st.reset([0], [4], [4])
    c, _ = commit_spans(tok[:4], torch.tensor([0.5, 0.7, 0.7, 0.1]), dst, rows, seq, st,
                        policy="threshold", tau=0.9, mask_id=MASK)
    assert c.tolist() == [1] and seq.tolist() == [MASK, 101, MASK, MASK]


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_negative_tokens_are_never_committed(backend, device):
    """A row without a valid token (token -1, confidence -inf from token_confidence) stays masked, counts in
    masks_left, and does not take a place in the ranking; a span of only such rows commits nothing."""
    seq = torch.full((10,), MASK, dtype=torch.int64, device=device)
    dst = torch.arange(10, device=device)
    rows = torch.tensor([[0, 4], [4, 3], [7, 3]], dtype=torch.int32, device=device)
    tok = torch.tensor([-1, 11, 12, -1, -1, -1, -1, 17, 18, -5], device=device)
    conf = torch.tensor([9.0, 0.3, 0.2, float("-inf"), float("-inf"), float("-inf"), float("nan"), 0.1, 0.6, 1.0],
                        device=device)
    for policy, expect_seq, expect_c in [
            # span 0: row 0 has the best confidence but no token: row 1 is the top-1
            ("threshold", {1: 11}, [1, 0, 1]),
            ("schedule", {1: 11, 2: 12}, [2, 0, 2]),          # last step: every candidate
            ("pd_threshold", {1: 11, 2: 12}, [2, 0, 2])]:     # budget m = 4 / 3 (one step): tau 0 passes all
        s = seq.clone()
        st = SpanState.new(3, device)
        st.reset([0, 1, 2], [4, 3, 3], [1, 1, 1])
        c, d = commit_spans(tok, conf, dst, rows, s, st, policy=policy, tau=0.0 if policy != "threshold" else 0.5,
                            mask_id=MASK, backend=backend)
        got = {i: v for i, v in enumerate(s.tolist()) if v != MASK}
        want = dict(expect_seq)
        want.update({8: 18} if policy == "threshold" else {7: 17, 8: 18})
        assert got == want, (policy, got)
        assert c.tolist() == expect_c and not bool(d)
        # span 1 (only rows without a token): nothing committed, masks unchanged, the step still counted
        assert st.masks_left.tolist()[1] == 3 and st.step.tolist() == [1, 1, 1]
        assert bool((s[[0, 3, 4, 5, 6, 9]] == MASK).all())
        if policy == "pd_threshold":
            assert st.deferred.tolist() == [2, 3, 1]  # budget - committed: the missing rows are deferred


def test_span_row_range_clips():
    assert span_row_range(2, 3, 10) == range(2, 5)
    assert span_row_range(-4, 6, 10) == range(0, 2)
    assert span_row_range(8, 100, 10) == range(8, 10)
    assert span_row_range(3, -2, 10) == range(3, 3)
    assert span_row_range(12, 1, 10) == range(10, 10)


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
# kernels against the reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("policy", POLICIES)
def test_awkward_mix_matches_reference(backend, policy, tau):
    """Spans of 1, 7, 63, 97, 130, 433 rows: several steps of a round (every pass and every chunk loop)."""
    mix = Mix(AWKWARD, seed=POLICIES.index(policy) * 10 + TAUS.index(tau), device=DEVICE)
    steps = [2, 3, 5, 4, 3, 6]
    _run(mix, steps, policy, tau, backend, max_iters=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_random_mixes_whole_rounds(backend, seed):
    """SPEC section 8 shapes (1-16 spans of 1-200 rows), every policy, until all_done: progress every step."""
    g = torch.Generator().manual_seed(100 + seed)
    n_sp = int(torch.randint(1, 9 if not HAS_GPU else 17, (1,), generator=g))
    lens = torch.randint(1, 201, (n_sp,), generator=g).tolist()
    policy = POLICIES[seed % 3]
    tau = TAUS[(seed * 7) % 4]
    mix = Mix(lens, seed=seed, device=DEVICE, committed_frac=0.0)
    steps = torch.randint(1, 6, (n_sp,), generator=g).tolist()
    iters, st = _run(mix, steps, policy, tau, backend, max_iters=200, neg_frac=0.0)
    assert int(st.masks_left.sum()) == 3 and iters < 200  # only the idle span with masks but no rows is left
    if policy == "schedule":
        assert iters == max(steps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_round_until_done(backend, policy):
    """Small spans until all_done (negative tokens included: they commit in a later step)."""
    mix = Mix([10, 23, 4, 1], seed=7, extra=1, device=DEVICE)
    iters, st = _run(mix, [4, 7, 4, 1], policy, 0.9, backend, max_iters=300, neg_frac=0.2)
    assert int(st.masks_left.sum()) == 0 and iters < 300


@pytest.mark.parametrize("backend", BACKENDS)
def test_commit_of_a_span_ignores_other_spans(backend):
    """A span's commit depends on its own rows only: the same span alone, or next to other spans whose
    rows change, gives the same tokens and counters."""
    dev = DEVICE
    mix = Mix([40, 130, 7], seed=3, extra=0, device=dev, committed_frac=0.0)
    tok, conf = mix.rows()
    target = mix.sid[1]
    results = []
    for variant in range(3):
        tok_v, conf_v = tok.clone(), conf.clone()
        span_rows = mix.span_rows.clone()
        lo, n = mix.span_rows[target].tolist()
        other = torch.ones(mix.N, dtype=torch.bool)
        other[lo:lo + n] = False
        if variant == 1:  # the other spans' rows get other tokens and confidences
            tok_v[other.to(dev)] = 5
            conf_v[other.to(dev)] = 2.0
        if variant == 2:  # the target span alone
            keep = torch.zeros(mix.S, 1, dtype=torch.int32, device=dev)
            keep[target] = 1
            span_rows = span_rows * keep
        store = mix.store.clone()
        st = mix.state([3, 3, 3])
        commit_spans(tok_v, conf_v, mix.row_dst, span_rows, store[G:G + mix.tokens.shape[0]], st, policy="pd_threshold",
                     tau=0.5, mask_id=MASK, backend=backend)
        dst = mix.row_dst[lo:lo + n]
        inside = (dst >= 0) & (dst < mix.tokens.shape[0])
        results.append((store[G:][dst[inside]].tolist(), st.masks_left[target].item(), st.deferred[target].item()))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_bad_span_ranges_are_clipped(backend, monkeypatch):
    """Without PD_KERNELS_DEBUG, span ranges outside [0, N) are clipped (as the reference): the guard rows
    around the row tensors, which point at MASK bait with a valid token, are never read."""
    monkeypatch.setenv("PD_KERNELS_DEBUG", "0")
    dev = DEVICE
    mix = Mix([5, 9, 12, 6], seed=11, extra=1, device=dev, committed_frac=0.0)
    N = mix.N
    sr = mix.span_rows.clone()
    a, b, c_, d = mix.sid
    sr[a] = torch.tensor([-G, G + 2])          # starts before row 0
    sr[b] = torch.tensor([N - 3, 50])          # runs past row N - 1
    sr[c_] = torch.tensor([2, -7])             # negative count: no rows
    sr[d] = torch.tensor([N + 4, 3])           # starts past the end
    mix.span_rows = sr
    st_k, st_r = mix.state([2, 2, 2, 2]), mix.state([2, 2, 2, 2])
    st_r = SpanState(*(t.cpu() for t in (st_r.masks_left, st_r.step, st_r.num_steps, st_r.deferred)))
    store_r = mix.store.cpu().clone()
    for _ in range(2):
        _step(mix, st_k, st_r, store_r, "threshold", 0.3, backend, all_bait=False)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_all_done_many_spans(backend):
    """all_done from the last program of the launch: 300 span ids, few with rows, idle spans with masks."""
    dev = DEVICE
    S = 300
    seq = torch.full((40,), MASK, dtype=torch.int64, device=dev)
    dst = torch.arange(40, device=dev)
    rows = torch.zeros(S, 2, dtype=torch.int32, device=dev)
    rows[17] = torch.tensor([0, 30])
    rows[250] = torch.tensor([30, 10])
    tok = torch.arange(40, device=dev)
    conf = torch.linspace(0, 1, 40, device=dev)
    st = SpanState.new(S, dev)
    st.reset([17, 250], [30, 10], [1, 1])
    st.reset([299], [2], [1])  # masks left, no rows: not done
    c, d = commit_spans(tok, conf, dst, rows, seq, st, policy="schedule", mask_id=MASK, backend=backend)
    assert not bool(d) and c[17].item() == 30 and c[250].item() == 10 and st.arrivals.item() == 0
    st.masks_left[299] = 0
    done = torch.zeros(1, dtype=torch.bool, device=dev)
    commit_spans(tok, conf, dst, rows, seq, st, policy="schedule", mask_id=MASK, out=(c, done), backend=backend)
    assert bool(done) and c.abs().sum().item() == 0 and st.arrivals.item() == 0
    # S = 1 and S = 0
    st1 = SpanState.new(1, dev)
    st1.reset([0], [1], [1])
    c, d = commit_spans(tok[:1], conf[:1], dst[:1] + 39, torch.tensor([[0, 1]], dtype=torch.int32, device=dev),
                        seq.fill_(MASK), st1, mask_id=MASK, backend=backend)
    assert bool(d) and c.tolist() == [1] and seq[39].item() == 0
    st0 = SpanState.new(0, dev)
    c, d = commit_spans(tok, conf, dst, torch.zeros(0, 2, dtype=torch.int32, device=dev), seq, st0, mask_id=MASK,
                        backend=backend)
    assert c.numel() == 0 and bool(d)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_strided_row_tensors(backend):
    """Row tensors and span ranges given as strided views are read as their values (copied when needed)."""
    dev = DEVICE
    mix = Mix([6, 11], seed=5, extra=1, device=dev)
    tok, conf = mix.rows()
    tok2 = torch.stack([tok, tok * 0 + 77], 1)[:, 0]
    conf2 = torch.stack([conf, conf * 0], 1)[:, 0]
    dst2 = torch.stack([mix.row_dst, mix.row_dst * 0], 1)[:, 0]
    sr2 = torch.stack([mix.span_rows[:, 0], mix.span_rows[:, 1]], 0).t()
    assert not (tok2.is_contiguous() or conf2.is_contiguous() or dst2.is_contiguous() or sr2.is_contiguous())
    st_k, st_r = mix.state([2, 2]), mix.state([2, 2])
    st_r = SpanState(*(t.cpu() for t in (st_r.masks_left, st_r.step, st_r.num_steps, st_r.deferred)))
    store_r = mix.store.cpu().clone()
    mix.row_dst, mix.span_rows = dst2, sr2
    _step(mix, st_k, st_r, store_r, "pd_threshold", 0.5, backend, tok=tok2, conf=conf2)


# ---------------------------------------------------------------------------------------------------
# registration, errors, debug checks
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_opcheck_commit(backend):
    dev = DEVICE
    mix = Mix([5, 3], seed=0, extra=1, device=dev)
    tok, conf = mix.rows()
    st = mix.state([2, 2])
    committed = torch.empty(mix.S, dtype=torch.int32, device=dev)
    done = torch.empty(1, dtype=torch.bool, device=dev)
    for policy in POLICIES:
        torch.library.opcheck(torch.ops.pd_kernels.commit_spans.default,
                              (tok.contiguous(), conf.contiguous(), mix.row_dst.contiguous(), mix.span_rows,
                               mix.tokens.clone(), st.masks_left, st.step, st.num_steps, st.deferred, st.arrivals,
                               committed, done, policy, 0.5, MASK, backend))


def _args(S=2, N=6):
    tokens = torch.full((10,), MASK, dtype=torch.int64)
    st = SpanState.new(S)
    return dict(token=torch.zeros(N, dtype=torch.int64), conf=torch.zeros(N), row_dst=torch.arange(N),
                span_rows=torch.tensor([[0, 3], [3, 3]], dtype=torch.int32)[:S], tokens=tokens, state=st)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(token=torch.zeros(6, dtype=torch.int32)), TypeError, "token"),
    (dict(token=torch.zeros(6, 1, dtype=torch.int64)), ValueError, "token"),
    (dict(conf=torch.zeros(6, dtype=torch.float64)), TypeError, "conf"),
    (dict(conf=torch.zeros(5)), ValueError, "conf"),
    (dict(row_dst=torch.arange(6, dtype=torch.int32)), TypeError, "row_dst"),
    (dict(row_dst=torch.arange(7)), ValueError, "row_dst"),
    (dict(span_rows=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "span_rows"),
    (dict(span_rows=torch.zeros(2, dtype=torch.int32)), ValueError, "span_rows"),
    (dict(span_rows=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "span_rows"),
    (dict(span_rows=torch.zeros(2, 3, dtype=torch.int32)), ValueError, "span_rows"),
    (dict(tokens=torch.zeros(10, dtype=torch.int32)), TypeError, "tokens"),
    (dict(tokens=torch.zeros(10, 2, dtype=torch.int64).t()), ValueError, "tokens"),
    (dict(token=torch.zeros(6, dtype=torch.int64, device="meta")), ValueError, "token"),
    (dict(span_rows=torch.zeros(2, 2, dtype=torch.int32, device="meta")), ValueError, "span_rows"),
    (dict(state="x"), TypeError, "state"),
    (dict(policy="topk"), ValueError, "policy"),
    (dict(tau=float("nan")), ValueError, "tau"),
    (dict(mask_id=2**31), ValueError, "mask_id"),
    (dict(out=(torch.zeros(2, dtype=torch.int64), torch.zeros(1, dtype=torch.bool))), TypeError, "committed"),
    (dict(out=(torch.zeros(3, dtype=torch.int32), torch.zeros(1, dtype=torch.bool))), ValueError, "out"),
    (dict(out=(torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))), TypeError, "all_done"),
    (dict(out=torch.zeros(2)), TypeError, "out"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_commit_errors(bad, exc, match):
    a = _args()
    kw = {k: bad.pop(k) for k in ("policy", "tau", "mask_id", "out") if k in bad}
    a.update(bad)
    with pytest.raises(exc, match=match):
        commit_spans(a["token"], a["conf"], a["row_dst"], a["span_rows"], a["tokens"], a["state"], **kw)


@pytest.mark.parametrize("field,value,exc", [
    ("masks_left", torch.zeros(3, dtype=torch.int32), ValueError),
    ("step", torch.zeros(2, dtype=torch.int64), TypeError),
    ("num_steps", torch.zeros(4, dtype=torch.int32)[::2], ValueError),
    ("deferred", torch.zeros(2, 1, dtype=torch.int32), ValueError),
    ("arrivals", torch.zeros(1, dtype=torch.int32), TypeError),
    ("arrivals", torch.zeros(2, dtype=torch.int64), ValueError),
])
def test_commit_state_errors(field, value, exc):
    a = _args()
    setattr(a["state"], field, value)
    with pytest.raises(exc, match=f"state.{field}" if field != "masks_left" else "span_rows|state"):
        commit_spans(a["token"], a["conf"], a["row_dst"], a["span_rows"], a["tokens"], a["state"])


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_debug_checks(backend, device, monkeypatch):
    """PD_KERNELS_DEBUG=1 reads the ranges and destinations and raises; without it they are clipped/ignored."""
    mask = 7
    guard = torch.full((40,), mask, dtype=torch.int64, device=device)
    tokens = guard[10:30]
    tokens[::3] = 1
    token = torch.arange(100, 106, device=device)
    conf = torch.tensor([0.9, 0.2, 0.95, 0.4, 0.99, 0.3], device=device)
    row_dst = torch.tensor([1, 2, -3, 25, 4, 20], device=device)   # -3, 25 and 20 are outside [0, 20)
    span_rows = torch.tensor([[0, 3], [3, 3]], dtype=torch.int32, device=device)
    state = SpanState.new(2, device)
    state.reset([0, 1], [2, 1], [2, 2])
    monkeypatch.setenv("PD_KERNELS_DEBUG", "0")
    ref_tokens, ref_state = tokens.clone(), state.clone()
    rc, rd = commit_spans_ref(token, conf, row_dst, span_rows, ref_tokens, ref_state, "threshold", 0.5, mask)
    c, d = commit_spans(token, conf, row_dst, span_rows, tokens, state, policy="threshold", tau=0.5, mask_id=mask,
                        backend=backend)
    assert torch.equal(guard[:10], torch.full((10,), mask, device=device))
    assert torch.equal(guard[30:], torch.full((10,), mask, device=device))
    assert torch.equal(tokens, ref_tokens) and torch.equal(c, rc) and torch.equal(d, rd)
    assert tokens[1].item() == 100 and tokens[4].item() == 104
    monkeypatch.setenv("PD_KERNELS_DEBUG", "1")

    def call(sr=span_rows, dst=row_dst):
        return commit_spans(token, conf, dst, sr, tokens, state, mask_id=mask, backend=backend)

    with pytest.raises(IndexError, match="row_dst"):
        call()
    ok_dst = torch.tensor([1, 2, 5, 6, 4, 8], device=device)
    for bad in ([[0, 3], [3, 4]], [[-1, 3], [3, 3]], [[0, -1], [3, 3]], [[7, 1], [3, 3]]):
        with pytest.raises(IndexError, match="span_rows"):
            call(torch.tensor(bad, dtype=torch.int32, device=device), ok_dst)
    with pytest.raises(ValueError, match="overlap"):
        call(torch.tensor([[0, 4], [3, 3]], dtype=torch.int32, device=device), ok_dst)
    with pytest.raises(ValueError, match="distinct"):
        call(dst=torch.tensor([1, 2, 5, 6, 1, 8], device=device))
    # rows of no span are never checked (nor read): row 5's destination is out of range, span 1 stops at row 5
    call(torch.tensor([[0, 3], [3, 2]], dtype=torch.int32, device=device), torch.tensor([1, 2, 5, 6, 4, -9],
                                                                                          device=device))
    # empty spans may point anywhere
    call(torch.tensor([[0, 3], [99, 0]], dtype=torch.int32, device=device), ok_dst)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("policy", ["schedule", "pd_threshold"])
@pytest.mark.parametrize("counters", [(2**31 - 1, -2**31, 2**31 - 1), (-2**31, 2**31 - 2, 0), (1, 2**31 - 2, 5),
                                      (3, 0, 2**31 - 1), (5, 2**31 - 1, 1)],
                         ids=["steps_max", "steps_min", "k_large", "dfr_max", "k_wraps"])
def test_extreme_counters_match_reference(backend, policy, counters):
    """Any int32 counters give the reference's (Python int) budget: Triton computed ``steps - k`` and
    ``per + deferred`` in int32, which wrapped (a negative budget, a negative ``deferred``)."""
    device = DEVICE if backend != "torch" else "cpu"
    steps, k, dfr = counters
    mask = 99
    N = 7
    token = torch.arange(N, device=device) + 10
    conf = torch.tensor([0.3, 0.95, 0.2, 0.99, 0.1, 0.5, 0.92], device=device)
    row_dst = torch.arange(N, device=device)
    span_rows = torch.tensor([[0, 4], [4, 3]], dtype=torch.int32, device=device)
    tokens = torch.full((N,), mask, device=device)
    state = SpanState.new(2, device)
    state.masks_left.fill_(3)
    state.num_steps.fill_(steps)
    state.step.fill_(k)
    state.deferred.fill_(dfr)
    ref_tokens, ref_st = tokens.cpu().clone(), SpanState(*(t.cpu().clone() for t in (
        state.masks_left, state.step, state.num_steps, state.deferred)))
    rc, _ = commit_spans_ref(token.cpu(), conf.cpu(), row_dst.cpu(), span_rows.cpu(), ref_tokens, ref_st, policy,
                             0.9, mask)
    c, _ = commit_spans(token, conf, row_dst, span_rows, tokens, state, policy=policy, tau=0.9, mask_id=mask,
                        backend=backend)
    assert tokens.cpu().tolist() == ref_tokens.tolist() and c.cpu().tolist() == rc.tolist()
    for f in ("masks_left", "step", "deferred"):
        assert getattr(state, f).cpu().tolist() == getattr(ref_st, f).tolist(), f
    assert (state.deferred >= 0).all()


@pytest.mark.parametrize("steps", [[0], [2, -1], [1.5], 0])
def test_reset_refuses_steps_below_one(steps):
    state = SpanState.new(2, "cpu")
    with pytest.raises(ValueError, match="num_steps"):
        state.reset([0], [3], steps)
    state.reset([0, 1], [3, 4], [1, 2])
    assert state.num_steps.tolist() == [1, 2] and state.masks_left.tolist() == [3, 4]


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_debug_refuses_a_nonzero_arrival_counter(backend, monkeypatch):
    """A state whose ``arrivals`` is not 0 (the kernels' counter, 0 between calls) made Triton's ``all_done``
    True while spans still had masks: PD_KERNELS_DEBUG=1 says so."""
    device = DEVICE if backend != "torch" else "cpu"
    state = SpanState.new(2, device)
    state.reset([0, 1], [2, 2], [2, 2])
    state.arrivals.fill_(5)
    args = (torch.tensor([1, 2], device=device), torch.tensor([0.1, 0.2], device=device),
            torch.tensor([0, 1], device=device), torch.tensor([[0, 1], [1, 1]], dtype=torch.int32, device=device),
            torch.full((4,), 99, device=device), state)
    monkeypatch.setenv("PD_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="state.arrivals is 5"):
        commit_spans(*args, mask_id=99, backend=backend)


def test_state_arrivals_field():
    st = SpanState.new(4)
    assert st.arrivals.dtype == torch.int64 and st.arrivals.tolist() == [0]
    st2 = SpanState(st.masks_left, st.step, st.num_steps, st.deferred)  # created when not given
    assert st2.arrivals.tolist() == [0] and st.clone().arrivals.data_ptr() != st.arrivals.data_ptr()


def test_cuda_policy_ids_are_the_reference_ids():
    """csrc/commit_spans.h's CommitPolicy enumerates POLICIES in their order (the ids' one home)."""
    ids = cuda_enum("commit_spans.h", "CommitPolicy")
    assert ids.pop("kNumCommitPolicies") == len(POLICIES)
    assert ids == enum_of(POLICIES)


def test_public_exports():
    assert pd_kernels.commit_spans is commit_spans and pd_kernels.SpanState is SpanState
    from pd_kernels.ops import SpanState as a, commit_spans as b
    from pd_kernels.reference import SpanState as c, commit_spans_ref as d
    assert (a, b, c, d) == (SpanState, commit_spans, SpanState, commit_spans_ref)


@pytest.mark.parametrize("static_step", [False, True], ids=["dynamic", "static"])
def test_decoder_ends_a_span_without_valid_tokens(monkeypatch, static_step):
    """Rows with no valid token are never committed; a span whose masked rows all have none commits nothing
    in that step, and the decoder ends it (its masks stay, noted in plan_errors) instead of looping forever."""
    import pd_kernels.decoder.step as step_mod
    from pd_kernels.decoder import DecodeConfig, Decoder
    from pd_kernels.models import TINY_TAGS, tiny_model

    real = pd_kernels.token_confidence
    calls = []

    def no_token_after_two_steps(logits, **kw):
        tok, conf = real(logits, **kw)
        calls.append(tok.shape[0])
        if len(calls) > 10:
            raise RuntimeError("the decoder keeps stepping a span that cannot make progress")
        if len(calls) > 2:  # as token_confidence reports a row whose every logit is suppressed or -inf
            tok.fill_(-1)
            conf.fill_(float("-inf"))
        return tok, conf

    monkeypatch.setattr(step_mod, "token_confidence", no_token_after_two_steps)   # the decoder's one call
    cfg = DecodeConfig(mode="diffusion", policy="threshold", tau=0.99, tags=TINY_TAGS, diffusion_len=12,
                       max_new_tokens=20)
    res = Decoder(tiny_model(seed=1), cfg, static_step=static_step, backend="torch").generate([[40]])[0]
    assert len(calls) == 3, calls  # two steps commit, the third commits nothing and ends the span
    left = res.sequence.count(TINY_TAGS.mask)
    assert 0 < left <= 10 and TINY_TAGS.mask not in res.answer
    assert any("no valid token" in e and f"with {left} masks" in e for e in res.stats.plan_errors)
    assert res.finish_reason == ("eos" if TINY_TAGS.eos in res.spans[0][0] else "no_token")   # no EOS: stopped


def test_commit_refuses_2_31_rows():
    n = 2**31
    meta = dict(device="meta")
    st = SpanState.new(2, "meta")
    with pytest.raises(ValueError, match="at most 2"):
        commit_spans(torch.empty(n, dtype=torch.int64, **meta), torch.empty(n, **meta),
                     torch.empty(n, dtype=torch.int64, **meta), torch.zeros(2, 2, dtype=torch.int32, **meta),
                     torch.empty(4, dtype=torch.int64, **meta), st)
