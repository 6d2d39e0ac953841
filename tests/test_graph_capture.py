"""StaticSpanLayout: span_attention with fixed buffers per bucket, refilled in place, so a CUDA graph captured
once per bucket replays every step of it.

Here (CPU, Triton interpreter): the static layout gives exactly the dynamic path's results for random steps
refilled into the same buffers (same data pointers every step), including split-K with a fixed workspace;
unused (empty) tiles write nothing and padding rows output 0 (NaN-poisoned outputs); a step that does not fit
the bucket raises. GPU-marked tests capture paged_kv_write + span_attention + token_confidence + commit_spans
in one torch.cuda.CUDAGraph and compare 3 replays (3 different steps of the bucket) with eager runs.
"""
import numpy as np
import pytest
import torch

import pd_kernels as pk
from pd_kernels.layout import TILE_COLS, TILE_NROWS
from pd_kernels.reference import span_attention_ref

from test_span_attention import check_against_truth, make_cache, to_seq_queries


# ---- random steps that fit a bucket ---------------------------------------------------------------------
def random_desc(rng, max_pos):
    kind = str(rng.choice(["pd", "pd", "pd-da", "prefill", "decode", "idle"]))
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
    return [t.data_ptr() for t in (layout.q_pos, layout.q_seq, layout.q_kv, layout.tiles(layout.tokens_per_tile))]


def dynamic_twin(seqs, layout):
    """The dynamic layout of the same step and bucket: empty sequences up to max_seqs, padded rows."""
    empty = [pk.SeqQueries.causal(0, 0)] * (layout.max_seqs - len(seqs))
    return pk.SpanLayout.build(list(seqs) + empty, layout.device, pad_to=layout.max_queries)


# ---- static == dynamic ----------------------------------------------------------------------------------
STATIC_CASES = [  # (G, Hkv, D, dtype, page_size, block_m, num_splits)
    (4, 1, 64, torch.float32, 16, 32, 1),
    (1, 2, 64, torch.float16, 64, 16, 1),
    (7, 1, 128, torch.float32, 16, None, 1),
    (4, 1, 64, torch.float16, 16, 64, 3),
]


@pytest.mark.parametrize("G,Hkv,D,dtype,page_size,block_m,splits", STATIC_CASES,
                         ids=[f"G{c[0]}-Hkv{c[1]}-D{c[2]}-{str(c[3])[6:]}-ps{c[4]}-bm{c[5]}-sp{c[6]}"
                              for c in STATIC_CASES])
def test_static_equals_dynamic_over_refills(G, Hkv, D, dtype, page_size, block_m, splits, poison):
    B, N, S = 4, 56, 10
    rng = np.random.default_rng(G * 100 + D + splits)
    static = pk.StaticSpanLayout(N, B, "cpu", group=G, max_segments=S, block_m=block_m, num_splits=splits)
    assert static.num_queries == N and static.num_seqs == B
    T = static.tokens_per_tile
    assert static.tiles(T).shape == (static.max_tiles, TILE_COLS)
    first = ptrs(static)
    ws = None
    for step in range(3):
        descs, seqs, lens = random_step(rng, B, N, S)
        assert static.update(seqs) is static
        assert ptrs(static) == first, "update moved a device buffer"
        dyn = dynamic_twin(seqs, static)
        for name in ("q_pos", "q_seq", "q_kv"):
            assert torch.equal(getattr(static, name), getattr(dyn, name)), name
        assert static.kv_lens == dyn.kv_lens and static.num_real_queries == dyn.num_real_queries
        # the step's tiles, then empty tiles (0 rows) up to the fixed table size
        tiles = static.tiles(T)
        used = dyn.tiles_host(T)
        assert static.num_tiles == len(used) and torch.equal(tiles[:len(used)], torch.from_numpy(used))
        assert (tiles[len(used):] == 0).all()

        kc, vc, bt = make_cache(lens, Hkv, D, page_size, dtype, rng)
        q = torch.randn(N, G * Hkv, D, generator=torch.Generator().manual_seed(step)).to(dtype)
        o_static = poison(torch.empty_like(q))
        pk.span_attention(q, kc, vc, bt, static, out=o_static, backend="triton")
        if splits > 1:
            w = static.split_workspace(G * Hkv, D)
            ws = ws or [t.data_ptr() for t in w]
            assert [t.data_ptr() for t in w] == ws, "split-K workspace reallocated"
        # exactly the dynamic path's kernel on the dynamic layout with the same launch parameters
        o_dyn = poison(torch.empty_like(q))
        torch.ops.pd_kernels.span_attention(q, kc, vc, bt, dyn.q_pos, dyn.q_seq, dyn.q_kv, dyn.tiles(T), o_dyn,
                                            D ** -0.5, static.block_m, splits, "triton")
        assert torch.equal(o_static, o_dyn)
        # the public dynamic call picks its own block_m: same math, other matmul shapes (rounding only)
        o_pub = pk.span_attention(q, kc, vc, bt, dyn, num_splits=splits, backend="triton")
        fp32 = dtype == torch.float32   # tolerance: a couple of output ulps
        torch.testing.assert_close(o_static, o_pub, rtol=1e-5 if fp32 else 2.0 ** -9, atol=1e-6 if fp32 else 1e-4)
        assert (o_static[static.num_real_queries:] == 0).all()
        check_against_truth(o_static, descs, static, q, kc, vc, bt)


def test_torch_backend_and_copy_from(poison):
    B, N = 3, 40
    rng = np.random.default_rng(9)
    static = pk.StaticSpanLayout(N, B, "cpu", group=2)
    descs, seqs, lens = random_step(rng, B, N, N)
    dyn = pk.SpanLayout.build(seqs, "cpu")
    assert static.copy_from(dyn) is static and static.seqs == tuple(seqs)
    kc, vc, bt = make_cache(lens, 2, 64, 16, torch.float32, rng)
    q = torch.randn(N, 4, 64)
    o = pk.span_attention(q, kc, vc, bt, static, out=poison(torch.empty_like(q)), backend="torch")
    torch.testing.assert_close(o, span_attention_ref(q, kc, vc, bt, static), rtol=0, atol=0)
    o_tr = pk.span_attention(q, kc, vc, bt, static, backend="triton")
    torch.testing.assert_close(o_tr, o, rtol=1e-5, atol=1e-5)
    check_against_truth(o_tr, descs, static, q, kc, vc, bt)


# ---- padding rows and empty tiles -----------------------------------------------------------------------
@pytest.mark.parametrize("splits", [1, 2])
def test_padding_rows_zero_and_empty_tiles_write_nothing(splits, poison):
    rng = np.random.default_rng(4)
    kc, vc, bt = make_cache([30, 12], 1, 64, 16, torch.float32, rng)
    static = pk.StaticSpanLayout(24, 2, "cpu", group=4, max_segments=4, block_m=16, num_splits=splits)
    q = torch.randn(24, 4, 64)
    # a step with no queries at all: every row is padding and outputs 0
    static.update([])
    o = pk.span_attention(q, kc, vc, bt, static, out=poison(torch.empty_like(q)), backend="triton")
    assert (o == 0).all()
    # a partial step: real rows correct, padding rows 0, tiles past the step's count are empty
    seqs = [pk.SeqQueries.spans(10, [5, 9], [False, True]), pk.SeqQueries.causal(9, 3)]
    static.update(seqs)
    assert static.num_real_queries == 12 and static.num_tiles < static.max_tiles
    assert (static.tiles(4)[static.num_tiles:, TILE_NROWS] == 0).all()
    o = pk.span_attention(q, kc, vc, bt, static, out=poison(torch.empty_like(q)), backend="triton")
    assert (o[12:] == 0).all()
    ref = pk.span_attention(q[:12].contiguous(), kc, vc, bt, pk.SpanLayout.build(seqs, "cpu"), backend="torch")
    torch.testing.assert_close(o[:12], ref, rtol=1e-5, atol=1e-5)


def test_empty_tiles_alone_write_nothing(poison):
    """The kernel contract the static layout relies on: a tile with 0 rows (all-zero table row) loads and
    stores nothing, so a NaN-poisoned output stays NaN everywhere."""
    rng = np.random.default_rng(5)
    kc, vc, bt = make_cache([20], 2, 64, 16, torch.float32, rng)
    q = torch.randn(10, 4, 64)
    lay = pk.SpanLayout.build([pk.SeqQueries.causal(10, 10)], "cpu")
    out = poison(torch.empty_like(q))
    empty = torch.zeros((6, TILE_COLS), dtype=torch.int32)
    torch.ops.pd_kernels.span_attention(q, kc, vc, bt, lay.q_pos, lay.q_seq, lay.q_kv, empty, out, 0.125, 16, 1,
                                        "triton")
    assert out.isnan().all()


# ---- bucket overflow and misuse -------------------------------------------------------------------------
def test_bucket_overflow_raises():
    static = pk.StaticSpanLayout(16, 2, "cpu", group=4, max_segments=3)
    ok = [pk.SeqQueries.spans(4, [5, 6]), pk.SeqQueries.causal(0, 5)]
    static.update(ok)
    before = (static.q_pos.clone(), static.tiles(static.tokens_per_tile).clone(), static.kv_lens)
    with pytest.raises(ValueError, match="3 sequences do not fit the bucket \\(max_seqs=2\\)"):
        static.update(ok + [pk.SeqQueries.causal(0, 1)])
    with pytest.raises(ValueError, match="17 queries do not fit the bucket \\(max_queries=16\\)"):
        static.update([pk.SeqQueries.spans(4, [5, 6]), pk.SeqQueries.causal(0, 6)])
    with pytest.raises(ValueError, match="4 segments do not fit the bucket \\(max_segments=3\\)"):
        static.update([pk.SeqQueries.spans(4, [2, 2, 2]), pk.SeqQueries.causal(0, 5)])
    with pytest.raises(TypeError, match="SeqQueries"):
        static.update([(0, 5)])
    # a rejected step leaves the previous one in place
    assert torch.equal(static.q_pos, before[0]) and static.kv_lens == before[2]
    assert torch.equal(static.tiles(static.tokens_per_tile), before[1])


def test_bad_static_layouts_raise():
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        pk.StaticSpanLayout(16, 2, "cpu", group=4, block_m=48)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        pk.StaticSpanLayout(16, 2, "cpu", group=32, block_m=16)
    with pytest.raises(ValueError, match="num_splits"):
        pk.StaticSpanLayout(16, 2, "cpu", num_splits=17)
    with pytest.raises(ValueError, match=">= 1"):
        pk.StaticSpanLayout(0, 2, "cpu")
    with pytest.raises(ValueError, match="max_segments"):
        pk.StaticSpanLayout(8, 2, "cpu", max_segments=0)
    rng = np.random.default_rng(0)
    kc, vc, bt = make_cache([20, 8], 2, 64, 16, torch.float32, rng)
    static = pk.StaticSpanLayout(16, 2, "cpu", group=4, num_splits=2).update([pk.SeqQueries.causal(0, 8)])
    q = torch.randn(16, 8, 64)
    with pytest.raises(ValueError, match="group=4"):
        pk.span_attention(torch.randn(16, 4, 64), kc, vc, bt, static, backend="triton")
    with pytest.raises(ValueError, match="fixes num_splits=2"):
        pk.span_attention(q, kc, vc, bt, static, num_splits=1, backend="triton")
    with pytest.raises(ValueError, match="block_table has 1 rows but the layout has 2"):
        pk.span_attention(q, kc, vc, bt[:1], static, backend="triton")
    with pytest.raises(ValueError, match="query rows"):
        pk.span_attention(q[:8], kc, vc, bt, static, backend="triton")
    with pytest.raises(ValueError, match="tiles of"):
        static.tiles(static.tokens_per_tile + 1)


def test_opcheck_with_workspace():
    rng = np.random.default_rng(2)
    kc, vc, bt = make_cache([30, 9], 1, 64, 16, torch.float32, rng, spare_pages=1)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    static = pk.StaticSpanLayout(24, 2, "cpu", group=4, max_segments=3, block_m=32, num_splits=2)
    static.update([pk.SeqQueries.spans(12, [7, 11], [True, False]), pk.SeqQueries.causal(5, 4)])
    q = torch.randn(24, 4, 64)
    o_part, ml = static.split_workspace(4, 64)
    torch.library.opcheck(torch.ops.pd_kernels.span_attention.default,
                          (q, kc, vc, bt, static.q_pos, static.q_seq, static.q_kv, static.tiles(8),
                           torch.zeros_like(q), 0.125, 32, 2, "triton", o_part, ml))


# ---- GPU: one CUDA graph, replayed for three steps of the bucket ----------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_cuda_graph_replay_matches_eager(splits):
    dev, dtype = "cuda", torch.float16
    B, N, S, G, Hkv, D, ps, V = 4, 48, 10, 4, 2, 64, 16, 96
    Hq, MASK, cap = G * Hkv, 95, 160
    rng = np.random.default_rng(77 + splits)
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
    static = pk.StaticSpanLayout(N, B, dev, group=G, max_segments=S, num_splits=splits)
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
        # the dynamic layout's eager call agrees (it may pick another query block / split count)
        dyn = dynamic_twin(seqs, static)
        o_dyn = pk.span_attention(q_buf, kc_e, vc_e, bt, dyn, backend="triton")
        torch.testing.assert_close(outs_g[0], o_dyn, rtol=2e-3, atol=2e-3)
        truth = span_attention_ref(q_buf.double(), kc_e.double(), vc_e.double(), bt, dyn)
        torch.testing.assert_close(outs_g[0].double(), truth, rtol=0, atol=5e-3)
