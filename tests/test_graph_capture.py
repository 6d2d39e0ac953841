"""StaticSpanLayout: span_attention with fixed buffers per bucket, refilled in place, so a CUDA graph captured
once per bucket replays every step of it.

Here (CPU, Triton interpreter): the static layout plans exactly like the dynamic one (same units, same
split points) and gives bitwise the dynamic path's results for random steps refilled into the same buffers
(same data pointers every step), including split decode tiles with a fixed workspace; the kernels read only
the step's units (the count in the tables' header rows: rows past it are never read); padding rows output 0
(NaN-poisoned outputs); a step that does not fit the bucket raises. GPU-marked tests capture paged_kv_write +
span_attention + token_confidence + commit_spans in one torch.cuda.CUDAGraph and compare 3 replays (3
different steps of the bucket) with eager runs.
"""
import numpy as np
import pytest
import torch

import pd_kernels as pk
from pd_kernels.reference import span_attention_ref

from conftest import DEVICE
from test_span_attention import check_against_truth, make_cache, to_seq_queries


# ---- random steps that fit a bucket ---------------------------------------------------------------------
def random_desc(rng, max_pos):
    kind = str(rng.choice(["pd", "pd", "pd-da", "prefill", "decode", "decode", "idle"]))
    if kind in ("pd", "pd-da", "idle"):
        n = 1 if kind == "idle" else int(rng.integers(1, 4))
        lens = [int(rng.integers(1, 21)) for _ in range(n)]
        active = [False] if kind == "idle" else [bool(x) for x in rng.random(n) < 0.75]
        prefix = int(rng.integers(0, max_pos - sum(lens)))
        d = dict(kind="spans", prefix=prefix, lens=lens, active=active, mode="pd-da" if kind == "pd-da" else "pd")
        return d, prefix + sum(lens)
    length = int(rng.integers(2, 25)) if kind == "prefill" else 1
    start = int(rng.integers(0, max_pos - length))
    return dict(kind="causal", start=start, length=length), start + length


def random_step(rng, B, N, S, max_pos=150):
    """(descs, seqs, cache lengths padded to B) of a random step with <= B sequences, <= N queries and
    <= S segments (rejection sampling)."""
    while True:
        descs, lens = zip(*[random_desc(rng, max_pos) for _ in range(int(rng.integers(1, B + 1)))])
        seqs = [to_seq_queries(d) for d in descs]
        if (sum(s.num_queries for s in seqs) <= N and sum(len(s.segments()) for s in seqs) <= S
                and sum(s.num_queries for s in seqs) > 0):
            return list(descs), seqs, list(lens) + [0] * (B - len(descs))


def ptrs(layout):
    p = layout.plan_fixed
    return [t.data_ptr() for t in (layout.q_pos, layout.q_seq, layout.q_kv, p.narrow.units, p.wide.units,
                                   p.narrow.merge)]


def dynamic_twin(seqs, layout):
    """The dynamic layout of the same step and bucket: empty sequences up to max_seqs, padded rows."""
    empty = [pk.SeqQueries.causal(0, 0)] * (layout.max_seqs - len(seqs))
    return pk.SpanLayout.build(list(seqs) + empty, layout.device, pad_to=layout.max_queries)


def table_rows(t):
    """The rows a kernel reads from a unit / merge table: its header count, then that many rows."""
    return t[1:1 + int(t[0, 0])]


# ---- static == dynamic ----------------------------------------------------------------------------------
STATIC_CASES = [  # (G, Hkv, D, dtype, page_size, max_pos, max_kv)
    (4, 1, 64, torch.float32, 16, 150, None),
    (1, 2, 64, torch.float16, 64, 150, 150),
    (7, 1, 128, torch.float32, 16, 420, 420),      # decode tiles split into 256-key units
    (4, 1, 64, torch.float16, 16, 600, None),
]


@pytest.mark.parametrize("G,Hkv,D,dtype,page_size,max_pos,max_kv", STATIC_CASES,
                         ids=[f"G{c[0]}-Hkv{c[1]}-D{c[2]}-{str(c[3])[6:]}-ps{c[4]}-pos{c[5]}-kv{c[6]}"
                              for c in STATIC_CASES])
def test_static_equals_dynamic_over_refills(G, Hkv, D, dtype, page_size, max_pos, max_kv, poison):
    B, N, S = 4, 56, 10
    rng = np.random.default_rng(G * 100 + D + max_pos)
    static = pk.StaticSpanLayout(N, B, DEVICE, group=G, max_segments=S, max_kv=max_kv)
    assert static.num_queries == N and static.num_seqs == B
    first = ptrs(static)
    ws, split_seen = None, 0
    for step in range(3):
        descs, seqs, lens = random_step(rng, B, N, S, max_pos=max_pos)
        assert static.update(seqs) is static
        assert ptrs(static) == first, "update moved a device buffer"
        dyn = dynamic_twin(seqs, static)
        for name in ("q_pos", "q_seq", "q_kv"):
            assert torch.equal(getattr(static, name), getattr(dyn, name)), name
        assert static.kv_lens == dyn.kv_lens and static.num_real_queries == dyn.num_real_queries
        # the same plan as the dynamic layout, in tables of the bucket's capacity (header row = count)
        sp, dp = static.plan(G), dyn.plan(G)
        for name in ("narrow", "wide"):
            st_units, dy_units = getattr(sp, name).units, getattr(dp, name).units
            assert torch.equal(table_rows(st_units), table_rows(dy_units)), name
        assert torch.equal(table_rows(sp.narrow.merge), table_rows(dp.narrow.merge))
        assert sp.num_units == dp.num_units and sp.num_slots == dp.num_slots
        split_seen += sp.num_slots

        kc, vc, bt = make_cache(lens, Hkv, D, page_size, dtype, rng)
        q = torch.randn(N, G * Hkv, D, generator=torch.Generator().manual_seed(step)).to(DEVICE, dtype)
        o_static = pk.span_attention(q, kc, vc, bt, static, out=poison(torch.empty_like(q)), backend="triton")
        w = sp.workspace(Hkv, D)
        ws = ws or [t.data_ptr() for t in w]
        assert [t.data_ptr() for t in w] == ws, "split-K workspace reallocated"
        # bitwise the dynamic path: same tiles, same split points, same kernel variants
        o_dyn = pk.span_attention(q, kc, vc, bt, dyn, out=poison(torch.empty_like(q)), backend="triton")
        assert torch.equal(o_static, o_dyn)
        assert (o_static[static.num_real_queries:] == 0).all()
        check_against_truth(o_static, descs, static, q, kc, vc, bt)
    if max_pos > 300:
        assert split_seen > 0, "no step split a decode tile: the case does not test the workspace"


def test_torch_backend_and_copy_from(poison):
    B, N = 3, 40
    rng = np.random.default_rng(9)
    static = pk.StaticSpanLayout(N, B, DEVICE, group=2)
    descs, seqs, lens = random_step(rng, B, N, N)
    dyn = pk.SpanLayout.build(seqs, DEVICE)
    assert static.copy_from(dyn) is static and static.seqs == tuple(seqs)
    kc, vc, bt = make_cache(lens, 2, 64, 16, torch.float32, rng)
    q = torch.randn(N, 4, 64, device=DEVICE)
    o = pk.span_attention(q, kc, vc, bt, static, out=poison(torch.empty_like(q)), backend="torch")
    torch.testing.assert_close(o, span_attention_ref(q, kc, vc, bt, static), rtol=0, atol=0)
    o_tr = pk.span_attention(q, kc, vc, bt, static, backend="triton")
    torch.testing.assert_close(o_tr, o, rtol=1e-5, atol=1e-5)
    check_against_truth(o_tr, descs, static, q, kc, vc, bt)


# ---- padding rows and the header counts -----------------------------------------------------------------
def test_padding_rows_zero_and_rows_past_the_count_unread(poison):
    rng = np.random.default_rng(4)
    kc, vc, bt = make_cache([300, 12], 1, 64, 16, torch.float32, rng)
    static = pk.StaticSpanLayout(24, 2, DEVICE, group=4, max_segments=4, max_kv=300)
    q = torch.randn(24, 4, 64, device=DEVICE)
    # a step with no queries at all: every row is padding and outputs 0
    static.update([])
    o = pk.span_attention(q, kc, vc, bt, static, out=poison(torch.empty_like(q)), backend="triton")
    assert (o == 0).all()
    # a partial step: real rows correct, padding rows 0
    seqs = [pk.SeqQueries.causal(299, 1), pk.SeqQueries.causal(9, 3)]
    static.update(seqs)
    p = static.plan(4)
    assert static.num_real_queries == 4 and p.num_slots == 2 and p.num_merge == 1
    assert p.num_units[0] < p.narrow.max_units and p.num_units[1] < p.wide.max_units
    o = pk.span_attention(q, kc, vc, bt, static, out=poison(torch.empty_like(q)), backend="triton")
    assert (o[4:] == 0).all()
    ref = pk.span_attention(q[:4].contiguous(), kc, vc, bt, pk.SpanLayout.build(seqs, DEVICE), backend="torch")
    torch.testing.assert_close(o[:4], ref, rtol=1e-5, atol=1e-5)
    # rows past each header count are never read: garbage there (rows / slots far out of range) changes nothing
    for t in (p.narrow.units, p.wide.units, p.narrow.merge):
        t[1 + int(t[0, 0]):] = 2**30
    o2 = pk.span_attention(q, kc, vc, bt, static, out=poison(torch.empty_like(q)), backend="triton")
    assert torch.equal(o, o2)
    # and a count of 0 writes nothing at all
    for t in (p.narrow.units, p.wide.units, p.narrow.merge):
        t[0, 0] = 0
    o3 = pk.span_attention(q, kc, vc, bt, static, out=poison(torch.empty_like(q)), backend="triton")
    assert o3.isnan().all()


def test_workspace_is_bounded_by_units():
    """Workspace: slots (split units) x Hkv x T_n G rows x (D + 2) fp32, not splits x Q x Hq x D."""
    static = pk.StaticSpanLayout(16, 8, "cpu", group=7, max_segments=16, max_kv=4096)
    geo = static.geometry
    # 17 narrow tiles (16 segments + padding), 4096 keys: 65 blocks -> 17 units of 4 blocks
    assert static.plan_fixed.narrow.max_units == 17 * 17 and static.plan_fixed.narrow.max_slots == 17 * 17
    o_part, ml = static.plan_fixed.workspace(4, 128)
    assert o_part.shape == (17 * 17, 4, geo.narrow_tokens * 7, 128) and ml.shape == (17 * 17, 4, 14, 2)
    assert static.plan_fixed.workspace_bytes(4, 128) == 17 * 17 * 4 * 14 * 130 * 4
    # a dynamic decode step allocates exactly its split units
    dyn = pk.SpanLayout.build([pk.SeqQueries.causal(4095, 1)] * 3 + [pk.SeqQueries.causal(100, 1)], "cpu")
    p = dyn.plan(7)
    assert p.num_units == (3 * 16 + 1, 0) and p.num_slots == 48
    assert p.workspace(4, 128)[0].shape[0] == 48


# ---- bucket overflow and misuse -------------------------------------------------------------------------
def test_bucket_overflow_raises():
    static = pk.StaticSpanLayout(16, 2, "cpu", group=4, max_segments=3, max_kv=30)
    ok = [pk.SeqQueries.spans(4, [5, 6]), pk.SeqQueries.causal(0, 5)]
    static.update(ok)
    p = static.plan_fixed
    before = (static.q_pos.clone(), p.narrow.units.clone(), p.wide.units.clone(), static.kv_lens)
    with pytest.raises(ValueError, match="3 sequences do not fit the bucket \\(max_seqs=2\\)"):
        static.update(ok + [pk.SeqQueries.causal(0, 1)])
    with pytest.raises(ValueError, match="17 queries do not fit the bucket \\(max_queries=16\\)"):
        static.update([pk.SeqQueries.spans(4, [5, 6]), pk.SeqQueries.causal(0, 6)])
    with pytest.raises(ValueError, match="4 segments do not fit the bucket \\(max_segments=3\\)"):
        static.update([pk.SeqQueries.spans(4, [2, 2, 2]), pk.SeqQueries.causal(0, 5)])
    with pytest.raises(ValueError, match=r"\(sequence, keys\) \[\(1, 31\)\] exceed the bucket's max_kv=30"):
        static.update([pk.SeqQueries.spans(4, [5, 6]), pk.SeqQueries.causal(30, 1)])
    with pytest.raises(TypeError, match="SeqQueries"):
        static.update([(0, 5)])
    # a rejected step leaves the previous one in place
    assert torch.equal(static.q_pos, before[0]) and static.kv_lens == before[3]
    assert torch.equal(p.narrow.units, before[1]) and torch.equal(p.wide.units, before[2])


def test_bad_static_layouts_raise():
    with pytest.raises(ValueError, match=">= 1"):
        pk.StaticSpanLayout(0, 2, "cpu")
    with pytest.raises(ValueError, match="max_segments"):
        pk.StaticSpanLayout(8, 2, "cpu", max_segments=0)
    with pytest.raises(ValueError, match="max_kv"):
        pk.StaticSpanLayout(8, 2, "cpu", max_kv=0)
    rng = np.random.default_rng(0)
    kc, vc, bt = make_cache([20, 8], 2, 64, 16, torch.float32, rng)
    static = pk.StaticSpanLayout(16, 2, DEVICE, group=4).update([pk.SeqQueries.causal(0, 8)])
    q = torch.randn(16, 8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="group=4"):
        pk.span_attention(torch.randn(16, 4, 64, device=DEVICE), kc, vc, bt, static, backend="triton")
    with pytest.raises(ValueError, match="block_table has 1 rows but the layout has 2"):
        pk.span_attention(q, kc, vc, bt[:1], static, backend="triton")
    with pytest.raises(ValueError, match="query rows"):
        pk.span_attention(q[:8], kc, vc, bt, static, backend="triton")
    with pytest.raises(ValueError, match="group=4"):
        static.plan(2)


def test_opcheck_static():
    rng = np.random.default_rng(2)
    kc, vc, bt = make_cache([300, 9], 1, 64, 16, torch.float32, rng, spare_pages=1)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    static = pk.StaticSpanLayout(24, 2, DEVICE, group=4, max_segments=3, max_kv=300)
    static.update([pk.SeqQueries.causal(299, 1), pk.SeqQueries.causal(5, 4)])
    assert static.plan(4).num_slots == 2
    q = torch.randn(24, 4, 64, device=DEVICE)
    torch.library.opcheck(torch.ops.pd_kernels.span_attention.default,
                          (q, kc, vc, bt, static.q_pos, static.q_seq, static.q_kv, static.segs_host, static.kv_host,
                           torch.zeros_like(q), 0.125, "triton"))


# ---- GPU: one CUDA graph, replayed for three steps of the bucket ----------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("cap", [160, 896])
def test_cuda_graph_replay_matches_eager(cap):
    """cap 896: decode tiles split into several units (workspace and merge inside the graph)."""
    dev, dtype = "cuda", torch.float16
    B, N, S, G, Hkv, D, ps, V = 4, 48, 10, 4, 2, 64, 16, 96
    Hq, MASK = G * Hkv, 95
    rng = np.random.default_rng(77 + cap)
    pages_per = cap // ps
    P = B * pages_per + 1
    bt = torch.as_tensor(rng.permutation(B * pages_per).reshape(B, pages_per), dtype=torch.int32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    kc_g = torch.randn(P, ps, Hkv, D, device=dev, generator=gen).to(dtype)
    vc_g = torch.randn(P, ps, Hkv, D, device=dev, generator=gen).to(dtype)
    kc_e, vc_e = kc_g.clone(), vc_g.clone()
    logits_g = torch.zeros(N, V, dtype=torch.float32, device=dev)
    logits_e = logits_g.clone()
    sup = torch.tensor([MASK], device=dev)
    static = pk.StaticSpanLayout(N, B, dev, group=G, max_segments=S, max_kv=cap)
    # the graph's inputs and outputs: fixed buffers
    q_buf = torch.zeros(N, Hq, D, dtype=dtype, device=dev)
    k_buf = torch.zeros(N, Hkv, D, dtype=dtype, device=dev)
    v_buf = torch.zeros(N, Hkv, D, dtype=dtype, device=dev)
    slot_buf = torch.full((N,), -1, dtype=torch.int64, device=dev)
    dst_buf = torch.zeros(N, dtype=torch.int64, device=dev)
    span_buf = torch.zeros(B, 2, dtype=torch.int32, device=dev)  # span_rows: span b = the rows of sequence b
    tokens_g = torch.zeros(B * cap + N, dtype=torch.int64, device=dev)   # last N: dummies for padding rows
    tokens_e = tokens_g.clone()
    state_g, state_e = pk.SpanState.new(B, dev), pk.SpanState.new(B, dev)

    def body(kc, vc, tokens, state, layout, logits_buf):
        pk.paged_kv_write(k_buf, v_buf, kc, vc, slot_buf, backend="triton")
        o = pk.span_attention(q_buf, kc, vc, bt, layout, out=torch.empty_like(q_buf), backend="triton")
        # logits from a fixed-size buffer, elementwise (bitwise reproducible, unlike a cuBLAS GEMM whose
        # algorithm may differ between capture and eager)
        logits = logits_buf.copy_(o.reshape(N, Hq * D)[:, :V]).mul_(8.0)
        tok, conf = pk.token_confidence(logits, suppress_ids=sup, backend="triton")
        committed, done = pk.commit_spans(tok, conf, dst_buf, span_buf, tokens, state, policy="threshold",
                                          tau=0.5, mask_id=MASK, backend="triton")
        return o, logits, tok, conf, committed, done

    def load_step(seqs):
        """Host-built step data into the fixed input buffers (outside the graph)."""
        static.update(seqs)
        pos, seq = static.q_pos.cpu().numpy(), static.q_seq.cpu().numpy()
        slots, dsts, spans = [], [], []
        toks = rng.integers(0, 90, size=B * cap + N)
        toks[B * cap:] = 0
        for t in range(N):
            b, p = int(seq[t]), int(pos[t])
            if b < 0:  # padding row: writes no K/V, in no span (its dummy destination holds no MASK either)
                slots.append(-1)
                dsts.append(B * cap + t)
                spans.append(-1)
                continue
            slots.append(int(bt[b, p // ps]) * ps + p % ps)
            dsts.append(b * cap + p)
            spans.append(b)
            if rng.random() < 0.6:
                toks[b * cap + p] = MASK
        masks = [int(sum(toks[d] == MASK for d, s in zip(dsts, spans) if s == b and d < B * cap)) for b in range(B)]
        slot_buf.copy_(torch.tensor(slots))
        dst_buf.copy_(torch.tensor(dsts))
        rows_of = [[t for t, s in enumerate(spans) if s == b] for b in range(B)]
        assert all(r == list(range(r[0], r[0] + len(r))) for r in rows_of if r)  # contiguous per sequence
        span_buf.copy_(torch.tensor([[r[0], len(r)] if r else [0, 0] for r in rows_of], dtype=torch.int32))
        for buf in (q_buf, k_buf, v_buf):
            buf.copy_(torch.randn(buf.shape, device=dev, generator=gen).to(dtype))
        for tokens, state in ((tokens_g, state_g), (tokens_e, state_e)):
            tokens.copy_(torch.as_tensor(toks))
            state.reset(list(range(B)), masks, [2] * B)

    steps = [random_step(rng, B, N, S, max_pos=cap) for _ in range(4)]
    # warm-up (compiles, allocates the split-K workspace) on a side stream, then capture with step 0 loaded
    load_step(steps[0][1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body(kc_g.clone(), vc_g.clone(), tokens_g.clone(), state_g.clone(), static, logits_g.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs_g = body(kc_g, vc_g, tokens_g, state_g, static, logits_g)
    for descs, seqs, _ in steps[1:]:
        load_step(seqs)
        graph.replay()
        outs_e = body(kc_e, vc_e, tokens_e, state_e, static, logits_e)
        torch.cuda.synchronize()
        for name, a, b in zip(("out", "logits", "token", "conf", "committed", "all_done"), outs_g, outs_e):
            assert torch.equal(a, b), name
        assert torch.equal(kc_g, kc_e) and torch.equal(vc_g, vc_e) and torch.equal(tokens_g, tokens_e)
        for f in ("masks_left", "step", "deferred"):
            assert torch.equal(getattr(state_g, f), getattr(state_e, f)), f
        assert (outs_g[0][static.num_real_queries:] == 0).all()
        # the dynamic layout's eager call agrees bitwise (the same plan)
        dyn = dynamic_twin(seqs, static)
        o_dyn = pk.span_attention(q_buf, kc_e, vc_e, bt, dyn, backend="triton")
        assert torch.equal(outs_g[0], o_dyn)
        truth = span_attention_ref(q_buf.double(), kc_e.double(), vc_e.double(), bt, dyn)
        torch.testing.assert_close(outs_g[0].double(), truth, rtol=0, atol=5e-3)
