"""span_attention (SPEC section 4): Triton kernel vs the torch reference (fp64 truth) and, independently, vs
FlexAttention with a mask_mod written from the SPEC table; SpanLayout and its tiling plan; batch
invariance (bitwise); NaN in / NaN out; out-of-range page ids; errors; opcheck.

Caches start as NaN and only the sequences' tokens are written, so a kernel that reads a key it should
not see, or a slot past a sequence, turns its output into NaN; outputs are NaN-poisoned before the
kernel runs, so a row it never writes fails too.
"""
import math

import numpy as np
import pytest
import torch

import pd_kernels as pk
from pd_kernels._checks import cdiv
from pd_kernels.layout import TILE_A, TILE_B, TILE_C, TILE_CAUSAL, TILE_NROWS, TILE_ROW0, TILE_SEQ
from pd_kernels.reference import span_attention_ref

from conftest import DEVICE, triton_dtypes

# lengths around the kernel's key block (64) and the query tiles (128 // G tokens: 128, 32, 18)
EDGE_LENS = [1, 2, 17, 18, 19, 31, 32, 33, 63, 64, 65, 127, 128, 129]


# ---- building cases ------------------------------------------------------------------------------------
def random_seq(rng, *, small=False):
    """A random sequence description (kind, params) and its cache length."""
    kind = rng.choice(["spans", "spans", "spans", "prefill", "decode"])
    if kind == "spans":
        prefix = int(rng.integers(0, 90 if small else 301))
        n = int(rng.integers(0, 4 if small else 9))
        lens = [int(rng.choice(EDGE_LENS)) if rng.random() < 0.5 else int(rng.integers(1, 60 if small else 201))
                for _ in range(n)]
        active = [bool(x) for x in rng.random(n) < 0.7]
        mode = str(rng.choice(["pd", "pd-da"]))
        return dict(kind="spans", prefix=prefix, lens=lens, active=active, mode=mode), prefix + sum(lens)
    if kind == "prefill":
        start = int(rng.integers(0, 40))
        length = int(rng.integers(1, 60 if small else 150))
        return dict(kind="causal", start=start, length=length), start + length
    start = int(rng.integers(0, 120 if small else 400))
    return dict(kind="causal", start=start, length=1), start + 1


def to_seq_queries(d):
    if d["kind"] == "causal":
        return pk.SeqQueries.causal(d["start"], d["length"])
    return pk.SeqQueries.spans(d["prefix"], d["lens"], d["active"], d["mode"])


def make_cache(seq_lens, Hkv, D, page_size, dtype, rng, device=DEVICE, spare_pages=3):
    """Paged caches with the sequences' pages in shuffled order; unwritten slots are NaN."""
    pages_per = [cdiv(n, page_size) for n in seq_lens]
    P = sum(pages_per) + spare_pages
    order = rng.permutation(P)
    max_pages = max(pages_per + [1]) + 1
    bt = torch.full((len(seq_lens), max_pages), P - 1, dtype=torch.int32)   # unused entries: a valid page
    k_cache = torch.full((P, page_size, Hkv, D), float("nan"), dtype=dtype)
    v_cache = torch.full((P, page_size, Hkv, D), float("nan"), dtype=dtype)
    i = 0
    for b, n in enumerate(seq_lens):
        pages = order[i:i + pages_per[b]]
        i += pages_per[b]
        bt[b, :len(pages)] = torch.as_tensor(pages, dtype=torch.int32)
        pos = torch.arange(n)
        pg, off = torch.as_tensor(pages, dtype=torch.long)[pos // page_size], pos % page_size
        k_cache[pg, off] = torch.randn(n, Hkv, D).to(dtype)
        v_cache[pg, off] = torch.randn(n, Hkv, D).to(dtype)
    return k_cache.to(device), v_cache.to(device), bt.to(device)


def make_case(seed, *, G, D, page_size, dtype, Hkv=1, nseq=None, small=False, force_mode=None, device=DEVICE):
    rng = np.random.default_rng(seed)
    nseq = nseq or int(rng.integers(1, 7))
    descs, lens = zip(*[random_seq(rng, small=small) for _ in range(nseq)])
    descs = list(descs)
    if force_mode:
        for d in descs:
            if d["kind"] == "spans":
                d["mode"] = force_mode
    layout = pk.SpanLayout.build([to_seq_queries(d) for d in descs], device)
    k_cache, v_cache, bt = make_cache(lens, Hkv, D, page_size, dtype, rng, device)
    torch.manual_seed(seed)
    q = torch.randn(layout.num_queries, Hkv * G, D).to(dtype).to(device)
    return descs, layout, q, k_cache, v_cache, bt


# ---- independent oracles -------------------------------------------------------------------------------
def spec_visible(d, L):
    """bool [n_queries, L] straight from the SPEC section 4 table, and the query positions."""
    key = torch.arange(L)
    if d["kind"] == "causal":
        qpos = torch.arange(d["start"], d["start"] + d["length"])
        return key[None, :] <= qpos[:, None], qpos
    seg = torch.full((L,), -1)
    starts = [d["prefix"] + sum(d["lens"][:j]) for j in range(len(d["lens"]))]
    for j, (s, n) in enumerate(zip(starts, d["lens"])):
        seg[s:s + n] = j
    qpos = torch.cat([torch.arange(s, s + n) for s, n, a in zip(starts, d["lens"], d["active"]) if a]
                     + [torch.zeros(0, dtype=torch.long)])
    if d["mode"] == "pd":
        vis = (key[None, :] < d["prefix"]) | ((seg[None, :] == seg[qpos][:, None]) & (seg[None, :] >= 0))
    else:
        vis = (key[None, :] < d["prefix"] + sum(d["lens"])).expand(len(qpos), -1)
    return vis, qpos


def dense_kv(cache, bt_row, L):
    pos = torch.arange(L)
    page_size = cache.shape[1]
    return cache[bt_row.long()[pos // page_size], pos % page_size]


def torch_in_dtype(descs, layout, q, k_cache, v_cache, bt, scale):
    """The same computation done by plain torch in q's dtype (scores and P@V in that dtype, softmax fp32):
    the error yardstick for the kernel."""
    out = torch.zeros_like(q)
    G = q.shape[1] // k_cache.shape[2]
    row = 0
    for b, d in enumerate(descs):
        L = max(layout.kv_lens[b], 1)
        vis, qpos = spec_visible(d, L)
        n = len(qpos)
        if n == 0:
            continue
        k = dense_kv(k_cache, bt[b], L).repeat_interleave(G, 1)
        v = dense_kv(v_cache, bt[b], L).repeat_interleave(G, 1)
        s = torch.einsum("nhd,lhd->hnl", q[row:row + n], k).float() * scale
        p = torch.softmax(s.masked_fill(~vis[None], float("-inf")), -1).to(q.dtype)
        out[row:row + n] = torch.einsum("hnl,lhd->nhd", p, v)
        row += n
    return out


def check_against_truth(o, descs, layout, q, k_cache, v_cache, bt):
    """Kernel error vs the fp64 reference within 2x the error of torch doing it in the same dtype (both
    references computed on the CPU)."""
    o, q, k_cache, v_cache, bt = (t.cpu() for t in (o, q, k_cache, v_cache, bt))
    scale = 1.0 / math.sqrt(q.shape[-1])
    truth = span_attention_ref(q.double(), k_cache.double(), v_cache.double(), bt, layout)
    lowp = torch_in_dtype(descs, layout, q, k_cache, v_cache, bt, scale)
    assert not o.isnan().any(), f"NaN in {int(o.isnan().any(-1).any(-1).sum())} query rows"
    err = (o.double() - truth).abs().max().item()
    err_lowp = (lowp.double() - truth).abs().max().item()
    tol = 2 * err_lowp + (1e-6 if q.dtype == torch.float32 else 1e-4)
    assert err <= tol, f"max error {err:.3g} > {tol:.3g} (torch in {q.dtype}: {err_lowp:.3g})"


def run_kernel(q, k_cache, v_cache, bt, layout, poison, **kw):
    out = poison(torch.empty_like(q))
    res = pk.span_attention(q, k_cache, v_cache, bt, layout, out=out, backend="triton", **kw)
    assert res is out
    return out


# ---- kernel vs reference -------------------------------------------------------------------------------
CASES = [(seed, G, D, dtype, ps)
         for i, (G, D, dtype) in enumerate([(g, d, t) for g in (1, 4, 7) for d in (64, 128) for t in triton_dtypes()])
         for seed, ps in [(100 + i, 16 if i % 2 else 64)]]


@pytest.mark.parametrize("seed,G,D,dtype,page_size", CASES,
                         ids=[f"s{s}-G{g}-D{d}-{str(t)[6:]}-ps{p}" for s, g, d, t, p in CASES])
def test_random_layouts_vs_reference(seed, G, D, dtype, page_size, poison):
    Hkv = 2 if G == 1 else 1
    descs, layout, q, kc, vc, bt = make_case(seed, G=G, D=D, page_size=page_size, dtype=dtype, Hkv=Hkv)
    o = run_kernel(q, kc, vc, bt, layout, poison)
    check_against_truth(o, descs, layout, q, kc, vc, bt)


@pytest.mark.parametrize("mode", ["pd", "pd-da"])
def test_pd_vs_pd_da(mode, poison):
    """Same spans, both modes: each matches its own truth, and they differ (spans do / don't see each other)."""
    dtype = torch.float32
    rng = np.random.default_rng(7)
    lens = [19, 1, 64, 33]
    descs = [dict(kind="spans", prefix=45, lens=lens, active=[True, True, False, True], mode=m)
             for m in ("pd", "pd-da")]
    kc, vc, bt = make_cache([45 + sum(lens)], 1, 64, 16, dtype, rng)
    outs = {}
    for d in descs:
        layout = pk.SpanLayout.build([to_seq_queries(d)], DEVICE)
        q = torch.randn(layout.num_queries, 4, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        outs[d["mode"]] = run_kernel(q, kc, vc, bt, layout, poison)
        if d["mode"] == mode:
            check_against_truth(outs[mode], [d], layout, q, kc, vc, bt)
    assert (outs["pd"] - outs["pd-da"]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
def test_causal_prefill_and_decode(dtype, poison):
    """Causal chunks (prefill from 0 and from a cached start, lengths around the tile sizes) and one-token
    decode steps in one batch, page size 16."""
    descs = [dict(kind="causal", start=0, length=33), dict(kind="causal", start=70, length=18),
             dict(kind="causal", start=200, length=1), dict(kind="causal", start=0, length=1),
             dict(kind="causal", start=63, length=1)]
    rng = np.random.default_rng(3)
    kc, vc, bt = make_cache([d["start"] + d["length"] for d in descs], 1, 64, 16, dtype, rng)
    layout = pk.SpanLayout.build([to_seq_queries(d) for d in descs], DEVICE)
    q = torch.randn(layout.num_queries, 7, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    o = run_kernel(q, kc, vc, bt, layout, poison)
    check_against_truth(o, descs, layout, q, kc, vc, bt)


def test_decode_split_keys(poison):
    """Decode shape (one query per sequence, long keys): narrow tiles split into 256-key units whose fp32
    partials are merged by log-sum-exp; short ones are one unit. Page size 64, G = 4, two KV heads."""
    descs = [dict(kind="causal", start=s, length=1) for s in (700, 5, 129, 256)]
    descs.append(dict(kind="spans", prefix=130, lens=[20, 1], active=[False, True], mode="pd"))  # 1-token span
    rng = np.random.default_rng(11)
    kc, vc, bt = make_cache([701, 6, 130, 257, 151], 2, 64, 64, torch.float32, rng)
    layout = pk.SpanLayout.build([to_seq_queries(d) for d in descs], DEVICE)
    q = torch.randn(layout.num_queries, 8, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    o = run_kernel(q, kc, vc, bt, layout, poison)
    plan = layout.plan(4)
    # 701 keys: 11 blocks -> 3 units; 130: 3 blocks -> 1; 257: 5 blocks -> 2; the span: 3 + 1 blocks -> 1
    assert plan.num_units == (3 + 1 + 1 + 2 + 1, 0) and plan.num_merge == 2 and plan.num_slots == 5
    check_against_truth(o, descs, layout, q, kc, vc, bt)


def test_split_chunk_grows_past_max_splits(poison, monkeypatch):
    """Past MAX_SPLITS x chunk keys the chunk grows instead of the unit count (shrunk constants here so the
    interpreter stays fast): units are capped, every key is still covered once."""
    import pd_kernels.layout.plan as lay_mod

    monkeypatch.setattr(lay_mod, "SPLIT_CHUNK_BLOCKS", 1)
    monkeypatch.setattr(lay_mod, "MAX_SPLITS", 3)
    descs = [dict(kind="causal", start=s, length=1) for s in (64 * 7 + 3, 100, 64 * 2)]
    rng = np.random.default_rng(12)
    kc, vc, bt = make_cache([64 * 7 + 4, 101, 129], 1, 64, 16, torch.float32, rng)
    layout = pk.SpanLayout.build([to_seq_queries(d) for d in descs], DEVICE)
    units = lay_mod._plan_arrays(layout._segs, lay_mod.tile_geometry(7))[0]
    # 8 blocks -> chunk 3 -> 3 units (3, 3, 2 blocks); 2 blocks -> 2 units; 3 blocks -> 3 units
    assert [(int(u[lay_mod.UNIT_J0]), int(u[lay_mod.UNIT_J1])) for u in units] == \
        [(0, 3), (3, 6), (6, 8), (0, 1), (1, 2), (0, 1), (1, 2), (2, 3)]
    q = torch.randn(layout.num_queries, 7, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    o = run_kernel(q, kc, vc, bt, layout, poison)
    check_against_truth(o, descs, layout, q, kc, vc, bt)


def test_padding_rows_are_zero_and_strided_q(poison):
    """pad_to: padded rows output 0; q may be a strided view (e.g. a slice of a fused QKV projection)."""
    descs = [dict(kind="spans", prefix=10, lens=[5, 9], active=[True, True], mode="pd"),
             dict(kind="causal", start=3, length=4)]
    rng = np.random.default_rng(5)
    kc, vc, bt = make_cache([24, 7], 1, 64, 16, torch.float32, rng)
    layout = pk.SpanLayout.build([to_seq_queries(d) for d in descs], DEVICE, pad_to=40)
    assert layout.num_queries == 40 and layout.num_real_queries == 18
    qkv = torch.randn(40, 4 + 2, 64).to(DEVICE)
    q = qkv[:, :4]
    assert not q.is_contiguous()
    o = run_kernel(q, kc, vc, bt, layout, poison)
    assert (o[18:] == 0).all()
    check_against_truth(o[:18].contiguous(), descs, pk.SpanLayout.build([to_seq_queries(d) for d in descs], "cpu"),
                        q[:18].contiguous(), kc, vc, bt)


def test_torch_backend_matches_reference():
    descs, layout, q, kc, vc, bt = make_case(21, G=4, D=64, page_size=16, dtype=torch.float32, small=True)
    o = pk.span_attention(q, kc, vc, bt, layout, backend="torch")
    torch.testing.assert_close(o, span_attention_ref(q, kc, vc, bt, layout), rtol=0, atol=0)
    check_against_truth(o, descs, layout, q, kc, vc, bt)


# ---- independent oracle: FlexAttention with a SPEC mask_mod ---------------------------------------------
@pytest.mark.parametrize("seed", [31, 32, 33])
def test_vs_flex_attention(seed, poison):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    G, D, Hkv = 4, 64, 1
    descs, layout, q, kc, vc, bt = make_case(seed, G=G, D=D, page_size=16, dtype=torch.float32, Hkv=Hkv,
                                             nseq=3, small=True, force_mode=["pd", "pd-da", None][seed % 3])
    o = run_kernel(q, kc, vc, bt, layout, poison)
    o, q, kc, vc, bt = (t.cpu() for t in (o, q, kc, vc, bt))   # the oracle runs on the CPU
    row = 0
    for b, d in enumerate(descs):
        L = max(layout.kv_lens[b], 1)
        vis, qpos = spec_visible(d, L)
        n = len(qpos)
        if n == 0:
            continue
        # the mask_mod: SPEC section 4, from the sequence's own parameters
        if d["kind"] == "causal":
            def mask_mod(bb, h, qi, kv, qpos=qpos):
                return kv <= qpos[qi]
        elif d["mode"] == "pd":
            seg = torch.full((L,), -1)
            for j, n_j in enumerate(d["lens"]):
                s = d["prefix"] + sum(d["lens"][:j])
                seg[s:s + n_j] = j

            def mask_mod(bb, h, qi, kv, qpos=qpos, seg=seg, prefix=d["prefix"]):
                return (kv < prefix) | (seg[kv] == seg[qpos[qi]])
        else:
            def mask_mod(bb, h, qi, kv, end=d["prefix"] + sum(d["lens"])):
                return kv < end
        bm = create_block_mask(mask_mod, None, None, n, L, device="cpu")
        k = dense_kv(kc, bt[b], L).permute(1, 0, 2)[None]
        v = dense_kv(vc, bt[b], L).permute(1, 0, 2)[None]
        ref = flex_attention(q[row:row + n].permute(1, 0, 2)[None], k, v, block_mask=bm, enable_gqa=True)
        torch.testing.assert_close(o[row:row + n], ref[0].permute(1, 0, 2), rtol=1e-4, atol=2e-5)
        row += n


# ---- layout --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_layout_matches_spec_and_tiles_are_exact(seed):
    rng = np.random.default_rng(seed)
    descs = [random_seq(rng)[0] for _ in range(int(rng.integers(1, 7)))]
    layout = pk.SpanLayout.build([to_seq_queries(d) for d in descs], "cpu", pad_to=None)
    mask = layout.to_dense_mask()
    assert mask.shape == (layout.num_queries, layout.max_kv)
    row = 0
    for b, d in enumerate(descs):
        vis, qpos = spec_visible(d, max(layout.max_kv, 1))
        n = len(qpos)
        assert (layout.q_pos[row:row + n] == qpos).all() and (layout.q_seq[row:row + n] == b).all()
        assert layout.kv_lens[b] == (int(qpos.max()) + 1 if d["kind"] == "causal" else
                                     int(vis.nonzero()[:, 1].max()) + 1 if n else 0)
        assert torch.equal(mask[row:row + n], vis[:, :layout.max_kv])
        row += n
    assert row == layout.num_queries
    # tiles: every row in exactly one tile of its sequence; the tile's key ranges are exactly the union of
    # what its rows see (nothing invisible is loaded, nothing visible skipped)
    for T in (1, 9, 32):
        tiles = layout.tiles_host(T)
        covered = np.zeros(layout.num_queries, dtype=int)
        for t in tiles:
            r0, n = t[TILE_ROW0], t[TILE_NROWS]
            assert 1 <= n <= T
            covered[r0:r0 + n] += 1
            assert (layout.q_seq[r0:r0 + n] == t[TILE_SEQ]).all()
            key = torch.arange(layout.max_kv)
            in_ranges = (key < t[TILE_A]) | ((key >= t[TILE_B]) & (key < t[TILE_C]))
            union = mask[r0:r0 + n].any(0)
            assert torch.equal(in_ranges, union)
            if t[TILE_CAUSAL]:
                lim = layout.q_pos[r0:r0 + n, None] + 1
                assert torch.equal(mask[r0:r0 + n], in_ranges[None] & (key[None] < lim))
            else:
                assert torch.equal(mask[r0:r0 + n], in_ranges[None].expand(n, -1))
        assert (covered == 1).all()


def test_layout_padding_and_empty():
    lay = pk.SpanLayout.build([pk.SeqQueries.spans(12, []), pk.SeqQueries.spans(5, [3, 4], [False, False]),
                               pk.SeqQueries.causal(0, 2)], "cpu", pad_to=6)
    assert lay.num_queries == 6 and lay.num_seqs == 3 and lay.kv_lens == [0, 0, 2]
    assert lay.q_seq.tolist() == [2, 2, -1, -1, -1, -1] and lay.q_pos.tolist() == [0, 1, 0, 0, 0, 0]
    assert lay.q_pos.dtype == torch.int32 and lay.q_seq.dtype == torch.int32
    assert not lay.to_dense_mask()[2:].any()
    empty = pk.SpanLayout.build([], "cpu")
    assert empty.num_queries == 0 and empty.max_kv == 0


def test_layout_build_is_cheap():
    """Host cost of a typical step's layout (performance is not asserted; this only checks it runs and
    prints nothing). The benchmark reports SpanLayout.build vs create_block_mask."""
    seqs = [pk.SeqQueries.spans(512, [80] * 8, [j % 3 != 0 for j in range(8)], "pd") for _ in range(8)]
    lay = pk.SpanLayout.build(seqs, "cpu")
    assert lay.plan(7).num_units[1] > 0 and lay.plan(7) is lay.plan(7)


# ---- errors --------------------------------------------------------------------------------------------
def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="span lengths must be >= 1"):
        pk.SeqQueries.spans(10, [4, 0, 3])
    with pytest.raises(ValueError, match="span lengths must be >= 1"):
        pk.SeqQueries.spans(10, [4, -3])
    with pytest.raises(ValueError, match="active flags"):
        pk.SeqQueries.spans(10, [4, 5], [True])
    with pytest.raises(TypeError, match="active must be a sequence"):
        pk.SeqQueries.spans(10, [4], 5)
    with pytest.raises(TypeError, match="active flags must be bools"):
        pk.SeqQueries.spans(10, [4, 5], ["no", ""])      # not taken by truthiness
    assert pk.SeqQueries.spans(10, [4, 5], np.array([1, 0])).active == (True, False)
    with pytest.raises(ValueError, match="mode"):
        pk.SeqQueries.spans(10, [4], mode="dense")
    with pytest.raises(ValueError, match="prefix >= 0"):
        pk.SeqQueries.spans(-1, [4])
    with pytest.raises(ValueError, match="start >= 0"):
        pk.SeqQueries.causal(-2, 3)
    with pytest.raises(TypeError, match="int"):
        pk.SeqQueries.causal(1.5, 3)
    with pytest.raises(ValueError, match="pad_to"):
        pk.SpanLayout.build([pk.SeqQueries.causal(0, 5)], "cpu", pad_to=3)
    with pytest.raises(TypeError, match="SeqQueries"):
        pk.SpanLayout.build([(0, 5)], "cpu")


def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    kc, vc, bt = make_cache([40, 20], 2, 64, 16, torch.float32, rng, device="cpu")   # torch backend's checks
    lay = pk.SpanLayout.build([pk.SeqQueries.spans(20, [10, 10]), pk.SeqQueries.causal(0, 20)], "cpu")
    q = torch.randn(lay.num_queries, 8, 64)
    with pytest.raises(ValueError, match="block_table has 1 rows but the layout has 2"):
        pk.span_attention(q, kc, vc, bt[:1], lay, backend="torch")
    big = pk.SpanLayout.build([pk.SeqQueries.spans(20, [10, 300]), pk.SeqQueries.causal(0, 20)], "cpu")
    with pytest.raises(ValueError, match="past the cache"):
        pk.span_attention(torch.randn(big.num_queries, 8, 64), kc, vc, bt, big, backend="torch")
    with pytest.raises(ValueError, match="query rows"):
        pk.span_attention(q[:-1], kc, vc, bt, lay, backend="torch")
    with pytest.raises(ValueError, match="multiple of KV heads"):
        pk.span_attention(torch.randn(lay.num_queries, 3, 64), kc, vc, bt, lay, backend="torch")
    with pytest.raises(ValueError, match="share a dtype"):
        pk.span_attention(q.half(), kc, vc, bt, lay, backend="torch")
    with pytest.raises(ValueError, match="out shape"):
        pk.span_attention(q, kc, vc, bt, lay, out=torch.empty(3, 8, 64), backend="torch")
    with pytest.raises(pk.BackendUnavailable):
        pk.span_attention(q, kc, vc, bt, lay, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_sharing_memory_is_refused(backend, monkeypatch):
    """``out=q`` (an in-place attention) gave a wrong answer on torch, which zeroes ``out`` first; an out inside
    the cache (checked in debug mode) or an expanded out would be raced by the kernels. Refused, naming the
    tensor."""
    rng = np.random.default_rng(1)
    kc, vc, bt = make_cache([12], 2, 16, 4, torch.float32, rng)
    lay = pk.SpanLayout.build([pk.SeqQueries.causal(0, 12)], DEVICE)
    q = torch.randn(12, 4, 16, device=DEVICE)
    monkeypatch.setenv("PD_KERNELS_DEBUG", "0")
    with pytest.raises(ValueError, match="out shares memory with q"):
        pk.span_attention(q, kc, vc, bt, lay, out=q, backend=backend)
    with pytest.raises(ValueError, match="out elements overlap"):
        pk.span_attention(q, kc, vc, bt, lay, out=torch.empty(1, 4, 16, device=DEVICE).expand(12, 4, 16),
                           backend=backend)
    monkeypatch.setenv("PD_KERNELS_DEBUG", "1")       # an out inside the cache: checked in debug mode
    with pytest.raises(ValueError, match="out shares memory with k_cache"):
        pk.span_attention(q, kc, vc, bt, lay, out=kc.view(-1)[:q.numel()].view(q.shape), backend=backend)
    with pytest.raises(ValueError, match="out shares memory with v_cache"):
        pk.span_attention(q, kc, vc, bt, lay, out=vc.view(-1)[-q.numel():].view(q.shape), backend=backend)
    # a separate buffer, strided (a slice of a wider one), is fine and exact
    wide = torch.full((12, 4, 40), float("nan"), device=DEVICE)
    o = pk.span_attention(q, kc, vc, bt, lay, out=wide[:, :, 8:24], backend=backend)
    torch.testing.assert_close(o, span_attention_ref(q, kc, vc, bt, lay), atol=1e-5, rtol=1e-5)
    assert wide[:, :, :8].isnan().all() and wide[:, :, 24:].isnan().all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cache_without_pages_is_refused(backend):
    """A cache of 0 pages failed deep inside the torch reference (IndexError) and ran on Triton."""
    lay = pk.SpanLayout.build([pk.SeqQueries.causal(0, 3)], DEVICE)
    q = torch.randn(3, 2, 16, device=DEVICE)
    bt = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    for shape in [(0, 4, 2, 16), (3, 0, 2, 16)]:
        kc = torch.zeros(shape, device=DEVICE)
        with pytest.raises(ValueError, match="at least one page of at least one slot"):
            pk.span_attention(q, kc, kc.clone(), bt, lay, backend=backend)


# ---- registration --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    rng = np.random.default_rng(1)
    kc, vc, bt = make_cache([300, 9], 1, 64, 16, torch.float32, rng, spare_pages=1)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)   # opcheck compares repeated runs
    # a wide span tile, a split decode tile, a causal chunk
    lay = pk.SpanLayout.build([pk.SeqQueries.spans(12, [7, 11], mode="pd"), pk.SeqQueries.causal(5, 4)], DEVICE)
    lay2 = pk.SpanLayout.build([pk.SeqQueries.causal(299, 1), pk.SeqQueries.causal(5, 4)], DEVICE)
    for layout in (lay, lay2):
        q = torch.randn(layout.num_queries, 4, 64, device=DEVICE)
        out = torch.zeros_like(q)
        torch.library.opcheck(torch.ops.pd_kernels.span_attention.default,
                              (q, kc, vc, bt, layout.q_pos, layout.q_seq, layout.q_kv, layout.segs_host,
                               layout.kv_host, out, 0.125, backend))
    assert lay2.plan(4).num_slots == 2


@pytest.mark.gpu
@pytest.mark.parametrize("G,D", [(1, 64), (4, 128), (7, 128)])
def test_bf16_gpu(G, D, poison):
    for seed in (300, 301):
        descs, layout, q, kc, vc, bt = make_case(seed, G=G, D=D, page_size=16, dtype=torch.bfloat16, Hkv=4,
                                                 device="cuda")
        o = run_kernel(q, kc, vc, bt, layout, poison)
        check_against_truth(o.cpu(), descs, pk.SpanLayout.build([to_seq_queries(d) for d in descs], "cpu"),
                            q.cpu(), kc.cpu(), vc.cpu(), bt.cpu())


def test_debug_mode_reports_bad_page_ids(device, monkeypatch):
    """Page ids are trusted in the fast path; PD_KERNELS_DEBUG=1 checks every page a query can see."""
    P, ps, H, D = 4, 16, 1, 64
    kc = torch.zeros(P, ps, H, D, device=device)
    layout = pk.SpanLayout.build([pk.SeqQueries.spans(20, [5, 6], mode="pd")], device)
    q = torch.randn(layout.num_queries, H, D, device=device)
    table = torch.tensor([[2, 9, 0, 0]], dtype=torch.int32, device=device)  # page 9 does not exist
    monkeypatch.setenv("PD_KERNELS_DEBUG", "1")
    with pytest.raises(IndexError, match=r"page ids \[9\]"):
        pk.span_attention(q, kc, kc, table, layout, backend="torch")
    table[0, 1] = 3
    out = pk.span_attention(q, kc, kc, table, layout, backend="torch")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_debug_mode_raises_for_triton_too(backend, monkeypatch):
    P, ps, H, D = 4, 16, 1, 64
    kc = torch.zeros(P, ps, H, D, device=DEVICE)
    layout = pk.SpanLayout.build([pk.SeqQueries.causal(40, 1)], DEVICE)
    table = torch.tensor([[2, -1, 0, 0]], dtype=torch.int32, device=DEVICE)
    monkeypatch.setenv("PD_KERNELS_DEBUG", "1")
    with pytest.raises(IndexError, match=r"page ids \[-1\]"):
        pk.span_attention(torch.randn(1, H, D, device=DEVICE), kc, kc, table, layout, backend=backend)


# ---- the tiling plan -------------------------------------------------------------------------------------
def test_tile_geometry():
    from pd_kernels.layout import tile_geometry

    assert [(g.narrow_m, g.narrow_tokens, g.wide_m, g.wide_tokens) for g in map(tile_geometry, (1, 4, 7, 16, 32))] == \
        [(16, 16, 128, 128), (16, 4, 128, 32), (16, 2, 128, 18), (16, 1, 128, 8), (32, 1, 128, 4)]
    with pytest.raises(ValueError, match="group"):
        tile_geometry(0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("G", [1, 4, 7])
def test_plan_units_cover_every_row_and_key_once(seed, G):
    """Every query row is in exactly one tile; a tile's units partition its key blocks in order; narrow
    tiles come from segments of <= T_n tokens, wide from longer ones; slots and merge rows are consistent."""
    from pd_kernels.layout import plan as L

    rng = np.random.default_rng(seed)
    descs = [random_seq(rng)[0] for _ in range(int(rng.integers(1, 9)))]
    descs += [dict(kind="causal", start=int(rng.integers(0, 3000)), length=1)]  # a long decode
    layout = pk.SpanLayout.build([to_seq_queries(d) for d in descs], "cpu", pad_to=None)
    geo = L.tile_geometry(G)
    un, uw, mg, slots = L._plan_arrays(layout._segs, geo)
    seg_len = {int(r0): int(n) for r0, n in zip(layout._segs[:, 1], layout._segs[:, 2])}
    covered = np.zeros(layout.num_queries, dtype=int)
    for units, narrow in ((un, True), (uw, False)):
        tiles = {}
        for u in units:
            tiles.setdefault(tuple(u[:7]), []).append(u)
        for t, us in tiles.items():
            r0, n = t[L.TILE_ROW0], t[L.TILE_NROWS]
            covered[r0:r0 + n] += 1
            assert n <= (geo.narrow_tokens if narrow else geo.wide_tokens)
            nb = cdiv(t[L.TILE_A], 64) + cdiv(max(t[L.TILE_C] - t[L.TILE_B], 0), 64)
            if narrow:
                assert [(u[L.UNIT_J0], u[L.UNIT_J1]) for u in us][0][0] == 0
                ends = [u[L.UNIT_J1] for u in us]
                assert [u[L.UNIT_J0] for u in us[1:]] == ends[:-1] and ends[-1] == nb
                sizes = [int(u[L.UNIT_J1] - u[L.UNIT_J0]) for u in us]   # equal chunks, a shorter last one
                assert len(us) <= L.MAX_SPLITS and all(z == sizes[0] for z in sizes[:-1]) and sizes[-1] <= sizes[0]
                assert len(us) == 1 or (sizes[0] >= L.SPLIT_CHUNK_BLOCKS and sizes[-1] > 0)
                assert (len(us) == 1) == (us[0][L.UNIT_SLOT] == -1)
            else:
                assert len(us) == 1 and us[0][L.UNIT_J1] == L.J_ALL and us[0][L.UNIT_SLOT] == -1
    assert (covered == 1).all()
    # narrow tiles are exactly the segments of <= T_n rows (one tile each)
    assert sorted({int(u[L.TILE_ROW0]) for u in un}) == sorted(r for r, n in seg_len.items() if n <= geo.narrow_tokens)
    split = un[un[:, L.UNIT_SLOT] >= 0]
    assert sorted(split[:, L.UNIT_SLOT].tolist()) == list(range(slots))
    assert int(mg[:, L.MERGE_NSPLITS].sum()) == slots
    for r0, n, s0, k in mg:
        us = split[split[:, L.TILE_ROW0] == r0]
        assert len(us) == k and us[:, L.UNIT_SLOT].tolist() == list(range(s0, s0 + k))


def _alone_and_batched(descs, lens, G, Hkv, D, dtype, rng, backend, pad_to=None):
    """(outputs of each sequence alone, the batched output, layouts) on one shared cache."""
    kc, vc, bt = make_cache(lens, Hkv, D, 16, dtype, rng)
    batch = pk.SpanLayout.build([to_seq_queries(d) for d in descs], DEVICE, pad_to=pad_to)
    q = torch.randn(batch.num_queries, G * Hkv, D, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    o_batch = pk.span_attention(q, kc, vc, bt, batch, backend=backend)
    alone, row = [], 0
    for b, d in enumerate(descs):
        lay = pk.SpanLayout.build([to_seq_queries(d)], DEVICE)
        n = lay.num_queries
        alone.append((row, pk.span_attention(q[row:row + n].contiguous(), kc, vc, bt[b:b + 1], lay, backend=backend)))
        row += n
    return alone, o_batch


BATCH_DESCS = [dict(kind="causal", start=700, length=1),                       # decode, 3 split units
               dict(kind="spans", prefix=90, lens=[19, 2, 33], active=[True, True, True], mode="pd"),
               dict(kind="causal", start=0, length=37),                         # prefill
               dict(kind="spans", prefix=60, lens=[5, 9], active=[True, False], mode="pd-da"),
               dict(kind="causal", start=260, length=1)]                        # decode, 2 units
BATCH_LENS = [701, 144, 37, 74, 261]


def test_plan_skips_empty_segment_rows():
    """A StaticSpanLayout's segment table has unused all-zero rows; the plan built from it (as opcheck and
    torch.compile see it, without the cached plan) must equal the plan of the real segments alone."""
    from pd_kernels.layout import plan as L

    layout = pk.SpanLayout.build([to_seq_queries(d) for d in BATCH_DESCS], "cpu", pad_to=200)
    padded = np.concatenate([layout._segs, np.zeros((3, 8), dtype=np.int64)])
    for G in (1, 4, 7):
        a, b = L._plan_arrays(layout._segs, L.tile_geometry(G)), L._plan_arrays(padded, L.tile_geometry(G))
        assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3] and len(a[0]) > 0


def test_plan_cache_is_explicit_and_bounded():
    """Plans live in the layout's own LayoutPlans, found from ``segs_host`` (what the registered op receives)
    through a weak identity map: no attribute on the tensor, the entry goes with the layout, a copy of the
    table is planned from its content (never taken for the original), a static layout gives its fixed plan
    only, and one layout keeps at most MAX_GROUPS plans."""
    import gc

    from pd_kernels.layout import plan as L

    layout = pk.SpanLayout.build([to_seq_queries(d) for d in BATCH_DESCS], "cpu")
    assert layout.segs_host.__dict__ == {}   # nothing hangs on the tensor
    p = layout.plan(4)
    assert L.plan_for(layout.segs_host, 4, "cpu") is p and layout.plan(4) is p
    copy = layout.segs_host.clone()
    q = L.plan_for(copy, 4, "cpu")
    assert q is not p and L.plan_for(copy, 4, "cpu") is not q   # a table no layout made: not cached
    assert all(torch.equal(x, y) for x, y in ((q.narrow.units, p.narrow.units), (q.wide.units, p.wide.units)))
    for G in range(1, 9):
        layout.plan(G)
    assert len(layout._plans._by_group) == L.LayoutPlans.MAX_GROUPS
    n = len(L._BY_TABLE)
    del layout, p, q
    gc.collect()
    assert len(L._BY_TABLE) == n - 1
    static = pk.StaticSpanLayout(16, 2, "cpu", group=4).update([pk.SeqQueries.causal(0, 8)])
    assert L.plan_for(static.segs_host, 4, "cpu") is static.plan_fixed is static.plan(4)
    with pytest.raises(ValueError, match="group=4"):
        L.plan_for(static.segs_host, 2, "cpu")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("G,dtype", [(7, torch.float32), (4, torch.float16), (1, torch.float32)],
                         ids=["G7-fp32", "G4-fp16", "G1-fp32"])
def test_batch_invariance_bitwise(backend, G, dtype):
    """A sequence's output is bitwise the same alone and among others (and with padding rows): its tiles,
    split points and kernel variant depend on the sequence only."""
    rng = np.random.default_rng(21)
    Hkv = 2 if G == 1 else 1
    alone, o_batch = _alone_and_batched(BATCH_DESCS, BATCH_LENS, G, Hkv, 64, dtype, rng, backend, pad_to=140)
    for row, o in alone:
        assert torch.equal(o, o_batch[row:row + o.shape[0]]), f"rows {row}..{row + o.shape[0]} differ"
    assert (o_batch[sum(o.shape[0] for _, o in alone):] == 0).all()


# ---- NaN in, NaN out -------------------------------------------------------------------------------------
def _nan_case():
    descs = [dict(kind="spans", prefix=40, lens=[10, 12], active=[True, True], mode="pd"),
             dict(kind="causal", start=0, length=20),
             dict(kind="causal", start=300, length=1)]
    rng = np.random.default_rng(8)
    kc, vc, bt = make_cache([62, 20, 301], 1, 64, 16, torch.float32, rng)
    layout = pk.SpanLayout.build([to_seq_queries(d) for d in descs], DEVICE, pad_to=48)
    q = torch.randn(48, 4, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    return layout, q, kc, vc, bt


def _slot(bt, b, pos, ps=16):
    return int(bt[b, pos // ps]), pos % ps


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_nan_out(backend):
    """NaN / inf in a query, a visible key or value, or the scale reaches exactly the rows that see it; the
    other rows are bitwise unchanged; rows that see no key stay 0. Rows: 0-9 span 1, 10-21 span 2 (prefix 40),
    22-41 a causal prefill from 0, 42 a decode at 300 (split into 2 units), 43-47 padding."""
    layout, q, kc, vc, bt = _nan_case()
    run = lambda q=q, kc=kc, vc=vc, scale=None: pk.span_attention(q, kc, vc, bt, layout, scale=scale,  # noqa: E731
                                                                  backend=backend)
    base = run()
    assert torch.isfinite(base).all() and (base[43:] == 0).all()

    def expect(o, bad_rows, heads=slice(None)):
        bad = torch.zeros(o.shape[:2], dtype=torch.bool, device=o.device)
        bad[bad_rows, heads] = True
        nonfinite = ~torch.isfinite(o).all(-1)
        assert torch.equal(nonfinite, bad), f"non-finite rows {nonfinite.any(-1).nonzero().flatten().tolist()}"
        assert torch.equal(o[~bad], base[~bad])

    for r in (3, 30, 42):                 # a span row, a prefill row, the split decode row
        qn = q.clone()
        qn[r, 2, 5] = float("nan")
        expect(run(q=qn), [r], heads=2)
    qi = q.clone()
    qi[15, 0, :] = float("inf")
    expect(run(q=qi), [15], heads=0)
    # a prefix key: every span row sees it; a prefill key at position 10: rows at positions >= 10
    for (b, pos), rows in (((0, 5), list(range(22))), ((1, 10), list(range(32, 42))), ((2, 100), [42])):
        kn = kc.clone()
        kn[_slot(bt, b, pos)] = float("nan")
        expect(run(kc=kn), rows)
    # a value of span 1 (position 41): span 1's rows only (span 2 never loads it); the decode's second unit
    for (b, pos), rows in (((0, 41), list(range(10))), ((2, 280), [42])):
        vn = vc.clone()
        vn[_slot(bt, b, pos)] = float("nan")
        expect(run(vc=vn), rows)
    o = run(scale=float("nan"))
    assert torch.isnan(o[:43]).all() and (o[43:] == 0).all()


# ---- page ids outside the pool ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_page_ids_are_never_read(backend, poison):
    """A block-table entry outside [0, P) (-1, P, P + 7, int32 max) is never read; its keys count as not
    seen (the other keys of the row still attend), and a row whose keys are all on bad pages outputs 0.
    Checked against a float64 dense computation with those keys removed."""
    descs = [dict(kind="spans", prefix=40, lens=[10, 12], active=[True, True], mode="pd"),
             dict(kind="causal", start=0, length=20),
             dict(kind="causal", start=300, length=1),
             dict(kind="causal", start=0, length=1)]
    lens = [62, 20, 301, 1]
    rng = np.random.default_rng(10)
    kc, vc, bt = make_cache(lens, 1, 64, 16, torch.float32, rng)
    P = kc.shape[0]
    bad_pages = {(0, 1): -1, (1, 0): P, (2, 5): P + 7, (2, 17): 2**31 - 1, (3, 0): -5}
    for (b, j), v in bad_pages.items():
        bt[b, j] = v
    layout = pk.SpanLayout.build([to_seq_queries(d) for d in descs], DEVICE)
    q = torch.randn(layout.num_queries, 4, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    o = pk.span_attention(q, kc, vc, bt, layout, out=poison(torch.empty_like(q)), backend=backend)
    o, q, kc, vc, bt = (t.cpu() for t in (o, q, kc, vc, bt))   # the float64 truth runs on the CPU
    scale = 64 ** -0.5
    row = 0
    for b, d in enumerate(descs):
        vis, qpos = spec_visible(d, lens[b])
        n = len(qpos)
        pos = torch.arange(lens[b])
        ok = torch.tensor([(b, int(p) // 16) not in bad_pages for p in pos])
        vis = vis & ok[None]
        pages = bt[b].long().clamp(0, P - 1)[pos // 16]
        k = kc[pages, pos % 16].double().masked_fill(~ok[:, None, None], 0).repeat_interleave(4, 1)
        v = vc[pages, pos % 16].double().masked_fill(~ok[:, None, None], 0).repeat_interleave(4, 1)
        s = torch.einsum("nhd,lhd->hnl", q[row:row + n].double(), k) * scale
        p = torch.softmax(s.masked_fill(~vis[None], float("-inf")), -1).nan_to_num(0.0)
        truth = torch.einsum("hnl,lhd->nhd", p, v)
        torch.testing.assert_close(o[row:row + n].double(), truth, rtol=1e-5, atol=1e-5)
        row += n
    assert (o[-1] == 0).all()   # the last sequence's only key is on a bad page


@pytest.mark.cpu_only
def test_bf16_in_the_interpreter_raises():
    rng = np.random.default_rng(0)
    kc, vc, bt = make_cache([20], 1, 64, 16, torch.bfloat16, rng, device="cpu")
    lay = pk.SpanLayout.build([pk.SeqQueries.causal(0, 20)], "cpu")
    q = torch.randn(20, 4, 64).bfloat16()
    with pytest.raises(pk.BackendUnavailable, match="interpreter"):
        pk.span_attention(q, kc, vc, bt, lay, backend="triton")
    o = pk.span_attention(q, kc, vc, bt, lay, backend="torch")   # the reference takes bf16
    assert torch.isfinite(o).all()
