"""paged_kv_write (torch / Triton / CUDA) and PagedKVCache against an independent per-token oracle."""
import pytest
import torch

import pd_kernels as pk
from pd_kernels._checks import cdiv
from pd_kernels.reference import gather_pages, slots_for_positions

from conftest import HAS_GPU, poison_, triton_dtypes

KERNEL_BACKENDS = ["triton"] + (["cuda"] if HAS_GPU else [])


def _random_table(num_pages, n_pages_needed, gen):
    """A block table of distinct pages in shuffled order (pages are not handed out in sequence)."""
    return torch.randperm(num_pages, generator=gen)[:n_pages_needed].to(torch.int32)


def _oracle(k, v, kc, vc, slots):
    """Per-token Python loop: the plainest statement of the write."""
    kc, vc = kc.clone(), vc.clone()
    layered = k.dim() == 4
    ps = kc.shape[-3]
    for t, s in enumerate(slots.tolist()):
        if s < 0 or s >= kc.shape[-4] * ps:
            continue
        if layered:
            kc[:, s // ps, s % ps] = k[:, t].to(kc.dtype)
            vc[:, s // ps, s % ps] = v[:, t].to(vc.dtype)
        else:
            kc[s // ps, s % ps] = k[t].to(kc.dtype)
            vc[s // ps, s % ps] = v[t].to(vc.dtype)
    return kc, vc


def _case(ps, T, H, D, dtype, device, seed, layers=None, pad_every=0, cache_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    n_pages = cdiv(T, ps)
    num_pages = n_pages + 3
    table = _random_table(num_pages, n_pages, gen)
    slots = slots_for_positions(table, torch.arange(T), ps)
    if pad_every:
        slots[::pad_every] = -1
    lead = (layers,) if layers else ()
    k = torch.randn(*lead, T, H, D, generator=gen).to(dtype)
    v = torch.randn(*lead, T, H, D, generator=gen).to(dtype)
    cdt = cache_dtype or dtype
    kc = poison_(torch.empty(*lead, num_pages, ps, H, D, dtype=cdt))
    vc = poison_(torch.empty(*lead, num_pages, ps, H, D, dtype=cdt))
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return (*to(k, v, kc, vc, slots), table)


def _assert_same(actual, expected):
    # a copy must be exact; NaN marks slots nobody may write
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True)


def _write_matches_oracle(k, v, kc, vc, slots, backend):
    """One write on ``backend``; both caches as the oracle writes them."""
    ek, ev = _oracle(k.cpu(), v.cpu(), kc.cpu(), vc.cpu(), slots.cpu())
    pk.paged_kv_write(k, v, kc, vc, slots, backend=backend)
    _assert_same(kc, ek)
    _assert_same(vc, ev)


# (page_size, T, Hkv, D): every page size meets every T; heads and head dims rotate through the cases
CASES = [(ps, T, H, D)
         for i, (ps, T) in enumerate([(ps, T) for ps in (1, 16, 64) for T in (1, 7, 97, 513)])
         for H, D in [[(1, 64), (4, 128), (8, 64), (4, 64), (8, 128), (1, 128)][i % 6]]]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
@pytest.mark.parametrize("ps,T,H,D", CASES, ids=[f"ps{c[0]}-T{c[1]}-H{c[2]}-D{c[3]}" for c in CASES])
def test_write_one_layer(ps, T, H, D, dtype, backend, device):
    k, v, kc, vc, slots, _ = _case(ps, T, H, D, dtype, device, seed=T * 31 + ps, pad_every=5)
    _write_matches_oracle(k, v, kc, vc, slots, backend)


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("T", [1, 7, 97])
def test_write_all_layers_one_call(T, backend, device):
    k, v, kc, vc, slots, _ = _case(16, T, 4, 64, torch.float16, device, seed=T, layers=3, pad_every=4)
    _write_matches_oracle(k, v, kc, vc, slots, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_write_casts_to_cache_dtype(backend, device):
    k, v, kc, vc, slots, _ = _case(16, 37, 2, 64, torch.float32, device, seed=3, cache_dtype=torch.float16)
    _write_matches_oracle(k, v, kc, vc, slots, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_write_strided_inputs(backend, device):
    """k/v sliced out of a fused QKV projection: token and head strides are not the dense ones."""
    T, H, D = 45, 4, 64
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(T, 3 * H + 5, D, generator=gen).to(device)   # padded head dim count: odd strides
    k, v = qkv[:, H:2 * H], qkv[:, 2 * H:3 * H]
    assert not k.is_contiguous()
    table = _random_table(8, 3, gen)
    slots = slots_for_positions(table, torch.arange(T), 16).to(device)
    kc = poison_(torch.empty(8, 16, H, D, device=device))
    vc = poison_(torch.empty(8, 16, H, D, device=device))
    _write_matches_oracle(k, v, kc, vc, slots, backend)


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_out_of_range_slots_never_written(backend, device, monkeypatch):
    k, v, kc, vc, slots, _ = _case(4, 9, 2, 64, torch.float32, device, seed=5)
    num_slots = kc.shape[0] * kc.shape[1]
    slots[2], slots[5], slots[7] = num_slots, num_slots + 1000, -7
    ek, ev = _oracle(k.cpu(), v.cpu(), kc.cpu(), vc.cpu(), slots.cpu())
    monkeypatch.setenv("PD_KERNELS_DEBUG", "0")
    pk.paged_kv_write(k, v, kc, vc, slots, backend=backend)
    _assert_same(kc, ek)
    _assert_same(vc, ev)
    monkeypatch.setenv("PD_KERNELS_DEBUG", "1")
    with pytest.raises(IndexError, match="outside"):
        pk.paged_kv_write(k, v, kc, vc, slots, backend=backend)


def test_bad_inputs_raise_clearly(device):
    k = torch.randn(5, 2, 64, device=device)
    kc = torch.zeros(4, 16, 2, 64, device=device)
    slots = torch.arange(5, device=device)
    with pytest.raises(TypeError, match="k must have dtype"):
        pk.paged_kv_write(k.to(torch.int32), k.to(torch.int32), kc, kc.clone(), slots)
    with pytest.raises(ValueError, match="v shape"):
        pk.paged_kv_write(k, k[:4], kc, kc.clone(), slots)
    with pytest.raises(ValueError, match="does not fit"):
        pk.paged_kv_write(k, k, torch.zeros(4, 16, 2, 32, device=device), torch.zeros(4, 16, 2, 32, device=device), slots)
    with pytest.raises(TypeError, match="slot_mapping must have dtype"):
        pk.paged_kv_write(k, k, kc, kc.clone(), slots.to(torch.int32))
    with pytest.raises(ValueError, match="entries for"):
        pk.paged_kv_write(k, k, kc, kc.clone(), slots[:3])
    with pytest.raises(ValueError, match="unit stride"):
        kt = torch.randn(5, 2, 64, 2, device=device)[..., 0]
        pk.paged_kv_write(kt, kt, kc, kc.clone(), slots)
    with pytest.raises(ValueError, match="differ"):
        pk.paged_kv_write(k, k, kc, kc.half(), slots)
    with pytest.raises(ValueError, match="pages must be stored whole"):
        big = torch.zeros(4, 32, 2, 64, device=device)[:, :16]
        pk.paged_kv_write(k, k, big, torch.zeros(4, 32, 2, 64, device=device)[:, :16], slots)
    with pytest.raises(ValueError, match="unknown pd_kernels backend"):
        pk.paged_kv_write(k, k, kc, kc.clone(), slots, backend="cudnn")


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_opcheck(backend, device):
    k, v, kc, vc, slots, _ = _case(16, 19, 2, 64, torch.float32, device, seed=1, pad_every=3)
    kc.zero_(), vc.zero_()
    torch.library.opcheck(torch.ops.pd_kernels.paged_kv_write.default, (k, v, kc, vc, slots, backend))


# ---- the cache object ------------------------------------------------------------------------------

def _cache(device, **kw):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=64, num_pages=6, page_size=4,
                max_seqs=3, dtype=torch.float32, device=device)
    args.update(kw)
    return pk.PagedKVCache(**args)


def test_cache_reserve_truncate_free_reuse(device):
    c = _cache(device)
    a, b = c.add_sequence(), c.add_sequence()
    sa = c.reserve(a, 5)                     # 2 pages
    sb = c.reserve(b, 3)                     # 1 page
    assert sa.dtype == torch.int64 and sa.shape == (5,)
    assert c.num_free_pages == 3 and c.seq_len(a) == 5
    # the slots of a sequence go through its block-table row
    expect = slots_for_positions(c.block_table[a].cpu(), torch.arange(5), 4)
    assert torch.equal(sa.cpu(), expect)
    assert not set(sa.tolist()) & set(sb.tolist())
    # one more token for a fits in its second page; the block table row is unchanged
    row = c.block_table[a].clone()
    s6 = c.reserve(a, 1)
    assert torch.equal(c.block_table[a], row) and s6.item() == expect[4].item() + 1
    c.truncate(a, 4)                          # drop back to exactly one page: the second is freed
    assert c.seq_len(a) == 4 and len(c.pages(a)) == 1 and c.num_free_pages == 4
    c.free(b)
    assert c.num_free_pages == 5 and b not in c.sequences
    d = c.add_sequence()
    sd = c.reserve(d, 20)                     # 5 pages: exactly what is free, reusing b's page
    assert c.num_free_pages == 0 and len(set((sd // 4).tolist())) == 5


def test_cache_out_of_pages_leaves_state(device):
    c = _cache(device)
    a = c.add_sequence()
    c.reserve(a, 10)
    before = (c.num_free_pages, c.seq_len(a), c.pages(a), c.block_table.clone())
    with pytest.raises(pk.OutOfPages, match="needs 4 more pages"):
        c.reserve(a, 15)
    assert (c.num_free_pages, c.seq_len(a), c.pages(a)) == before[:3]
    assert torch.equal(c.block_table, before[3])
    c2 = _cache(device, max_pages_per_seq=2)
    s = c2.add_sequence()
    with pytest.raises(pk.OutOfPages, match="max_pages_per_seq"):
        c2.reserve(s, 9)
    assert c2.seq_len(s) == 0
    for _ in range(2):
        c2.add_sequence()
    with pytest.raises(pk.OutOfPages, match="sequence rows"):
        c2.add_sequence()
    with pytest.raises(KeyError):
        c.seq_len(2)
    with pytest.raises(ValueError):
        c.truncate(a, 11)


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_cache_roundtrip_all_layers(backend, device):
    """Prompt, then AR tokens, then a truncate and a round of spans, through the cache's own slots."""
    c = _cache(device, num_pages=12)
    gen = torch.Generator().manual_seed(7)
    a, b = c.add_sequence(), c.add_sequence()
    ref = {a: [], b: []}
    for seq, n in [(a, 6), (b, 3), (a, 1), (b, 9), (a, 2)]:
        slots = c.reserve(seq, n)
        k = torch.randn(2, n, 2, 64, generator=gen).to(device)
        v = torch.randn(2, n, 2, 64, generator=gen).to(device)
        pk.paged_kv_write(k, v, c.k_cache, c.v_cache, slots, backend=backend)
        ref[seq].append((k, v))
    c.truncate(a, 8)
    for seq in (a, b):
        K = torch.cat([k for k, _ in ref[seq]], 1)[:, :c.seq_len(seq)]
        V = torch.cat([v for _, v in ref[seq]], 1)[:, :c.seq_len(seq)]
        for layer in range(2):
            gk, gv = c.gather(seq, layer)
            _assert_same(gk, K[layer])
            _assert_same(gv, V[layer])
    # gather_pages is what gather uses; check it against a direct read too
    direct = torch.stack([c.k_cache[0, c.pages(b)[p // 4], p % 4] for p in range(c.seq_len(b))])
    _assert_same(gather_pages(c.k_cache[0], c.block_table[b], c.seq_len(b)), direct)
    assert c.block_tables([a, b]).shape == (2, c.max_pages_per_seq)
    assert torch.equal(c.block_tables([b, a])[0], c.block_table[b])


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 97, 4096])
def test_cuda_matches_triton_bf16(T):
    k, v, kc, vc, slots, _ = _case(16, T, 4, 128, torch.bfloat16, "cuda", seed=T, layers=4, pad_every=7)
    kc2, vc2 = kc.clone(), vc.clone()
    pk.paged_kv_write(k, v, kc, vc, slots, backend="cuda")
    pk.paged_kv_write(k, v, kc2, vc2, slots, backend="triton")
    ek, ev = _oracle(k.cpu(), v.cpu(), kc2.cpu().fill_(float("nan")), vc2.cpu().fill_(float("nan")), slots.cpu())
    _assert_same(kc, kc2)
    _assert_same(vc, vc2)
    _assert_same(kc, ek)
    _assert_same(vc, ev)


@pytest.mark.parametrize("bad", [-1, 3, 1.0, True, None])
def test_cache_layer_index_is_checked(bad):
    """``layer(-1)`` is an error, not the last layer (issue: never silently wrong)."""
    cache = pk.PagedKVCache(3, 2, 8, num_pages=4, page_size=4, dtype=torch.float32, device="cpu")
    with pytest.raises(IndexError, match="layer must be an int"):
        cache.layer(bad)
    k, v = cache.layer(2)
    assert k.shape == (4, 4, 2, 8) and k.data_ptr() == cache.k_cache[2].data_ptr()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(4, 2, 0), (4, 0, 8)])
def test_empty_head_geometry_is_an_error(shape, backend, device):
    """A head dim or head count of 0 is refused with a clear error (Triton used to divide by zero)."""
    k = torch.zeros(shape, device=device)
    kc = torch.zeros(2, 4, shape[1], shape[2], device=device)
    with pytest.raises(ValueError, match="head dim >= 1"):
        pk.paged_kv_write(k, k.clone(), kc, kc.clone(), torch.arange(4, device=device), backend=backend)


# ---- adversarial inputs (review of the op boundary) --------------------------------------------------

def test_cuda_path_casts_k_and_v_each(monkeypatch):
    """The CUDA kernel is a byte copy of one dtype: a v in another dtype than the cache must be cast even when
    k already matches (it reached the C++ check, which refused what torch / Triton accept)."""
    from pd_kernels import _backend
    seen = []

    def fake_cuda(k, v, kc, vc, slots):   # the C++ binding's dtype rule, then a record of what it got
        if not (k.dtype == v.dtype == kc.dtype == vc.dtype):
            raise RuntimeError("paged_kv_write_cuda: k, v and caches must share one dtype")
        seen.append((k.dtype, v.dtype))

    monkeypatch.setattr(torch.ops.pd_kernels, "paged_kv_write_cuda", fake_cuda, raising=False)
    monkeypatch.setattr(_backend, "_cuda_problem", lambda device: None)
    kc, vc = torch.zeros(2, 4, 2, 8, dtype=torch.float16), torch.zeros(2, 4, 2, 8, dtype=torch.float16)
    k = torch.randn(3, 2, 8)
    for kd, vd in [(torch.float16, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.float32)]:
        pk.paged_kv_write(k.to(kd), k.to(vd), kc, vc, torch.arange(3), backend="cuda")
    assert seen == [(torch.float16, torch.float16)] * 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_k_and_v_of_different_dtypes(backend, device):
    """k fp32, v fp16 into an fp32 cache: each is cast on its own, the same on every backend."""
    k, v = torch.randn(5, 2, 8, device=device), torch.randn(5, 2, 8, device=device).half()
    kc, vc = poison_(torch.empty(2, 4, 2, 8, device=device)), poison_(torch.empty(2, 4, 2, 8, device=device))
    slots = torch.tensor([0, 3, -1, 6, 7], device=device)
    ek, ev = _oracle(k.cpu(), v.cpu(), kc.cpu(), vc.cpu(), slots.cpu())
    pk.paged_kv_write(k, v, kc, vc, slots, backend=backend)
    _assert_same(kc, ek)
    _assert_same(vc, ev)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cache_memory_is_checked(backend, device):
    """One tensor as both caches (V would overwrite K), or a cache whose elements share memory (an expanded
    view: Triton wrote it racily, torch failed inside index_put): a clear error, nothing written."""
    k = torch.randn(3, 2, 8, device=device)
    kc = torch.zeros(2, 4, 2, 8, device=device)
    slots = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="share memory"):
        pk.paged_kv_write(k, k, kc, kc, slots, backend=backend)
    pool = torch.zeros(3, 4, 2, 8, device=device)
    with pytest.raises(ValueError, match="share memory"):      # shifted by one page: half of each overlaps
        pk.paged_kv_write(k, k, pool[:2], pool[1:], slots, backend=backend)
    exp_k = torch.zeros(2, 4, 1, 8, device=device).expand(2, 4, 2, 8)
    exp_v = torch.zeros(2, 4, 1, 8, device=device).expand(2, 4, 2, 8)
    with pytest.raises(ValueError, match="overlap in memory"):
        pk.paged_kv_write(k, k, exp_k, exp_v, slots, backend=backend)
    assert not exp_k.any() and not exp_v.any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_repeated_slots_raise_in_debug(backend, device, monkeypatch):
    k = torch.randn(4, 2, 8, device=device)
    kc, vc = torch.zeros(2, 4, 2, 8, device=device), torch.zeros(2, 4, 2, 8, device=device)
    slots = torch.tensor([1, 5, -1, 5], device=device)
    monkeypatch.setenv("PD_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match=r"slots \[5\] appear more than once"):
        pk.paged_kv_write(k, k, kc, vc, slots, backend=backend)
    pk.paged_kv_write(k, k, kc, vc, torch.tensor([1, 5, -1, -1], device=device), backend=backend)  # -1 may repeat
    monkeypatch.setenv("PD_KERNELS_DEBUG", "0")
    pk.paged_kv_write(k, k, kc, vc, slots, backend=backend)   # unspecified winner, but no error, in bounds
    assert torch.equal(kc.view(-1, 2, 8)[5], k[1]) or torch.equal(kc.view(-1, 2, 8)[5], k[3])


@pytest.mark.parametrize("kw,err,match", [
    (dict(max_pages_per_seq=0), ValueError, "max_pages_per_seq must be >= 1"),
    (dict(max_pages_per_seq=-2), ValueError, "max_pages_per_seq must be >= 1"),
    (dict(num_pages=4.0), TypeError, "num_pages must be an int"),
    (dict(page_size=True), TypeError, "page_size must be an int"),
    (dict(head_dim=0), ValueError, "head_dim must be >= 1"),
    (dict(dtype=torch.float64), TypeError, "dtype must be one of"),
    (dict(dtype=torch.int32), TypeError, "dtype must be one of"),
    (dict(num_pages=2**27, page_size=16), ValueError, "at most 2\\^31 - 1"),
], ids=["pages_per_seq0", "pages_per_seq_neg", "float_pages", "bool_page_size", "head_dim0", "float64", "int32",
        "too_many_slots"])
def test_cache_constructor_rejects(kw, err, match):
    """``max_pages_per_seq=0`` used to mean "all pages" silently; float64 caches were built and then refused by
    every op; a non-int size failed inside torch.zeros."""
    args = dict(num_layers=1, num_kv_heads=1, head_dim=8, num_pages=4, page_size=4, dtype=torch.float32,
                device="cpu")
    args.update(kw)
    with pytest.raises(err, match=match):
        pk.PagedKVCache(**args)


def test_cache_methods_check_their_ints():
    c = _cache("cpu")
    c.add_sequence()
    s = c.add_sequence()       # sequence 1 exists: True must not be taken for it
    assert s == 1
    c.reserve(s, 5)
    with pytest.raises(TypeError, match="reserve: n must be an int"):
        c.reserve(s, 2.0)
    with pytest.raises(ValueError, match="slot_mapping: n must be >= 0"):
        c.slot_mapping(s, 2, -1)
    with pytest.raises(ValueError, match="slot_mapping: start must be >= 0"):
        c.slot_mapping(s, -1, 2)
    with pytest.raises(IndexError, match="layer must be an int"):
        c.gather(s, -1)          # was the last layer, silently
    with pytest.raises(KeyError, match="not in the cache"):
        c.seq_len(True)          # True == 1 as a dict key
    assert c.seq_len(s) == 5 and c.slot_mapping(s, 1, 3).tolist() == c.slot_mapping(s, 0, 5)[1:4].tolist()


@pytest.mark.cpu_only
def test_cast_into_bf16_in_the_interpreter_raises():
    """The interpreter truncates fp32 -> bf16 (39 of 80 values differed from torch by one bf16 ulp): a clear
    error instead of a silently different cache; a bf16 -> bf16 copy stays allowed (exact)."""
    kc, vc = torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16), torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16)
    k = torch.randn(5, 2, 8) * 100
    for kk, vv in [(k, k), (k.half(), k.half()), (k.bfloat16(), k)]:
        with pytest.raises(pk.BackendUnavailable, match="truncates"):
            pk.paged_kv_write(kk, vv, kc, vc, torch.arange(5), backend="triton")
    pk.paged_kv_write(k.bfloat16(), k.bfloat16(), kc, vc, torch.arange(5), backend="triton")
    assert torch.equal(kc.view(-1, 2, 8)[:5], k.bfloat16())

