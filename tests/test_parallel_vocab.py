"""token_confidence_vocab_parallel on gloo ranks against token_confidence on the gathered logits: the same tokens
(greedy and sampled, every confidence kind, top-k / top-p, suppressed ids, ties across slice boundaries, rows with
nothing usable, NaN and +inf rows, uneven and reordered splits, an empty slice), confidences within the op's
tolerance, the same result on every rank; and the errors.

Three ranks are spawned once (a module fixture, one intra-op thread each): the 3-rank cases run on the default group,
the 2-rank cases on the subgroup of ranks 0 and 1; the tests compare what came back with the op run here on the
full logits."""
from __future__ import annotations

import pytest
import torch

from pd_kernels import token_confidence
from pd_kernels.parallel import token_confidence_vocab_parallel, vocab_shard

from _dist import dist_skip_reason, run_ranks
from test_token_confidence import _check_conf, make_logits

KINDS = ["prob", "margin", "neg_entropy"]
N_ROWS = 14
_SKIP = dist_skip_reason()
needs_dist = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


# ---------------------------------------------------------------------------------------------------
# the cases: logits, split and arguments, built the same way in the ranks and here
# ---------------------------------------------------------------------------------------------------
def _case(V, *, kind="prob", T=0.0, split=None, dtype=torch.float32, seed=0, **kw):
    return dict(V=V, kind=kind, T=T, split=split, dtype=dtype, seed=seed, kw=kw)


def _cases2() -> dict:
    c = {}
    for kind in KINDS:
        for T in (0.0, 0.7):
            tag = f"{kind}-{'greedy' if T == 0 else 'T0.7'}"
            c[tag] = _case(257, kind=kind, T=T)
            c[f"{tag}-topk5"] = _case(257, kind=kind, T=T, top_k=5)
            c[f"{tag}-topk20-topp0.9"] = _case(257, kind=kind, T=T, top_k=20, top_p=0.9)
            c[f"{tag}-topp0.8-gathered"] = _case(257, kind=kind, T=T, top_p=0.8)
    c["prob-greedy-even-V"] = _case(256)
    c["prob-greedy-topk5-no-filter-greedy"] = _case(257, top_k=5, filter_greedy=False)
    c["neg_entropy-greedy-topk1"] = _case(257, kind="neg_entropy", top_k=1)
    c["margin-T0.7-topk-over-a-slice"] = _case(257, kind="margin", T=0.7, top_k=200, top_p=0.95)
    c["prob-T0.7-row-keys"] = _case(257, T=0.7, row_keys=True)
    c["neg_entropy-T0.7-one-element-offset"] = _case(257, kind="neg_entropy", T=0.7, row_keys="one")
    c["margin-T1.3-row-keys-topk7"] = _case(257, kind="margin", T=1.3, row_keys=True, top_k=7)
    c["prob-greedy-fp16"] = _case(257, dtype=torch.float16)
    c["neg_entropy-T0.7-bf16"] = _case(257, kind="neg_entropy", T=0.7, dtype=torch.bfloat16)
    c["prob-T0.7-bf16-topp-gathered"] = _case(257, T=0.7, dtype=torch.bfloat16, top_p=0.9)
    c["prob-greedy-int32-suppress"] = _case(257, sup_dtype=torch.int32)
    # rank 0 holds the upper slice: the lowest *global* index wins a tie, whatever the rank order
    c["prob-greedy-reversed-split"] = _case(257, split=[(100, 157), (0, 100)])
    c["margin-T0.7-reversed-split-topk9"] = _case(257, kind="margin", T=0.7, split=[(100, 157), (0, 100)], top_k=9)
    # a one-column slice (margin has no second value there)
    c["margin-greedy-one-column-slice"] = _case(257, kind="margin", split=[(0, 1), (1, 256)])
    c["neg_entropy-T0.7-one-column-slice-topk3"] = _case(257, kind="neg_entropy", T=0.7, split=[(256, 1), (0, 256)],
                                                        top_k=3)
    return c


def _cases3() -> dict:
    c = {}
    for kind in KINDS:
        for T in (0.0, 0.7):
            tag = f"{kind}-{'greedy' if T == 0 else 'T0.7'}"
            c[f"{tag}-V7"] = _case(7, kind=kind, T=T)              # slices 3, 3, 1
            c[f"{tag}-V2-empty-slice"] = _case(2, kind=kind, T=T)  # slices 1, 1, 0
            c[f"{tag}-V7-topk2-topp0.9"] = _case(7, kind=kind, T=T, top_k=2, top_p=0.9)
    c["prob-T0.7-V1000"] = _case(1000, T=0.7)
    c["prob-greedy-mesh-group"] = _case(1000, mesh=True)
    return c


CASES = {2: _cases2(), 3: _cases3()}


def _split(case, world):
    return case["split"] or [vocab_shard(case["V"], world, r) for r in range(world)]


def _case_inputs(case, world):
    """The full logits ``[N, V]``, the suppressed ids and the token_confidence keywords of a case."""
    V = case["V"]
    starts = sorted(s for s, n in _split(case, world) if n)
    b = starts[1] if len(starts) > 1 else V - 1          # the first boundary between slices (global column)
    x = make_logits(N_ROWS, V, torch.float32, seed=case["seed"], specials=V >= 8).clone()
    if V >= 3:
        top = float(x[6:].abs().max()) + 10
        x[6, [b - 1, b]] = top                                        # a tie across the boundary: b - 1 wins
        x[7, [b, V - 1]] = top
        x[7, 0] = top                                                 # the lowest index, on the first slice
        x[8] = float("-inf")                                          # nothing usable
        x[9, [b, b - 1]] = float("inf")                               # +inf on both sides: b - 1, conf NaN
        x[10, b + 1 if b + 1 < V else b - 2] = float("nan")          # NaN: never chosen, conf NaN
        x[13, b] = float("nan")                                       # a suppressed NaN counts as -inf
        x[11] = float("-inf")
        x[11, [1, b]] = 5.0                                           # only suppressed ids are finite
        x[12, b:] = x[12, :b].max() + 1 + x[12, b:] * 1e-3            # the mass sits on the later slices
    sup = torch.tensor([1, b, V + 3], dtype=case["kw"].get("sup_dtype", torch.int64))
    kw = {k: v for k, v in case["kw"].items() if k not in ("sup_dtype", "row_keys", "mesh")}
    kw.update(confidence=case["kind"], temperature=case["T"], suppress_ids=sup)
    if case["kw"].get("row_keys") == "one":   # one-element offset: counter = offset + row
        kw.update(seed=7, offset=torch.tensor([1 << 33], dtype=torch.int64))
    elif case["kw"].get("row_keys"):
        kw.update(seed=torch.arange(N_ROWS, dtype=torch.int64) * 7919 + 3,
                  offset=torch.arange(N_ROWS, dtype=torch.int64) + (1 << 40))
    else:
        kw.update(seed=11, offset=5)
    return x.to(case["dtype"]), kw


# ---------------------------------------------------------------------------------------------------
# what each rank runs: one spawn of 3 ranks; the 2-rank cases run on the subgroup of ranks 0 and 1
# ---------------------------------------------------------------------------------------------------
def _rank_cases(rank, world, group):
    out = {}
    for name, case in CASES[world].items():
        x, kw = _case_inputs(case, world)
        start, n = _split(case, world)[rank]
        g = group
        if case["kw"].get("mesh"):
            from torch.distributed.device_mesh import init_device_mesh

            g = init_device_mesh("cpu", (world,))   # the default group's ranks, as a 1-D mesh
        out[name] = token_confidence_vocab_parallel(x[:, start:start + n], vocab_start=start, vocab_size=case["V"],
                                                    group=g, **kw)
    return out


def _rank_errors(rank, group):
    """Calls both ranks of ``group`` make together that must fail on both; the messages come back."""
    x = torch.randn(3, 9)
    calls = {
        "overlap": dict(vocab_start=0, vocab_size=18),                       # [0, 9) twice, of 18
        "gap": dict(vocab_start=(0, 10)[rank], vocab_size=20),               # [0, 9) and [10, 19) of 20
        "disagree": dict(vocab_start=9 * rank, vocab_size=18, temperature=(0.7, 0.8)[rank]),
    }
    msgs = {}
    for name, kw in calls.items():
        try:
            token_confidence_vocab_parallel(x, group=group, **kw)
            msgs[name] = None
        except ValueError as e:
            msgs[name] = str(e)
    return msgs


def _rank_all(rank, world):
    import torch.distributed as dist

    pair = dist.new_group([0, 1])   # every rank takes part in creating it
    out = {3: _rank_cases(rank, 3, None)}
    if rank < 2:
        out[2] = _rank_cases(rank, 2, pair)
        out["errors"] = _rank_errors(rank, pair)
    else:
        try:
            token_confidence_vocab_parallel(torch.zeros(1, 4), vocab_start=0, vocab_size=4, group=pair)
        except ValueError as e:
            out["outsider"] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks():
    """Every rank's results: ``{3: {case: (token, conf)}, 2: {...}, "errors": {...}}`` (2 and errors on ranks 0
    and 1 only; rank 2's call on the pair's group in ``"outsider"``)."""
    return run_ranks(_rank_all, 3)


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------
def _check_case(results, name, world):
    case = CASES[world][name]
    x, kw = _case_inputs(case, world)
    tok0, conf0 = results[0][world][name]
    for r in range(1, world):   # every rank holds the same result
        tok, conf = results[r][world][name]
        assert torch.equal(tok, tok0), f"rank {r} chose other tokens than rank 0"
        assert torch.equal(torch.isnan(conf), torch.isnan(conf0)) and torch.equal(conf.nan_to_num(), conf0.nan_to_num())
    rt, rc = token_confidence(x, **kw)
    assert torch.equal(tok0, rt), f"tokens differ from the gathered path:\n{tok0}\n{rt}"
    extra = {k: kw[k] for k in ("top_k", "top_p", "filter_greedy") if k in kw}
    _check_conf(conf0, x, kw["confidence"], kw["temperature"], kw["suppress_ids"], kw["seed"], kw["offset"], **extra)
    if "top_k" not in kw and "top_p" in kw:   # the top-p fallback gathers the logits: the op's own result
        assert torch.equal(conf0.nan_to_num(), rc.nan_to_num())


@needs_dist
@pytest.mark.parametrize("name", list(CASES[2]))
def test_two_ranks_match_gathered(ranks, name):
    _check_case(ranks, name, 2)


@needs_dist
@pytest.mark.parametrize("name", list(CASES[3]))
def test_three_ranks_match_gathered(ranks, name):
    _check_case(ranks, name, 3)


@needs_dist
def test_boundary_rows(ranks):
    """The crafted rows decide as the op's rules say (not only as the gathered path does)."""
    case = CASES[2]["prob-greedy"]
    b = vocab_shard(257, 2, 1)[0]
    tok, conf = ranks[0][2]["prob-greedy"]
    assert case["split"] is None and b == 129
    assert int(tok[6]) == b - 1 and int(tok[7]) == 0, "ties go to the lowest global index"
    assert int(tok[8]) == -1 and conf[8] == float("-inf"), "a row with nothing usable"
    assert int(tok[9]) == b - 1 and torch.isnan(conf[9]), "the first +inf, confidence NaN"
    assert int(tok[10]) >= 0 and torch.isnan(conf[10]), "a NaN row"
    assert torch.isfinite(conf[13]), "a suppressed NaN is a -inf"
    assert int(tok[11]) == -1 and conf[11] == float("-inf"), "only suppressed ids are finite"
    assert int(tok[12]) >= b
    rev = ranks[0][2]["prob-greedy-reversed-split"][0]
    assert int(rev[6]) == 99 and int(rev[7]) == 0, "ties: the lowest global index, held by rank 1"


@needs_dist
def test_slices_and_arguments_checked_across_ranks(ranks):
    assert "not a member" in ranks[2]["outsider"]
    for r in range(2):
        msgs = ranks[r]["errors"]
        assert "do not tile [0, 18)" in msgs["overlap"]
        assert "do not tile [0, 20)" in msgs["gap"] and "(0, 9), (10, 19)" in msgs["gap"]
        assert "disagree" in msgs["disagree"]


def test_vocab_shard_is_dtensor_split():
    Shard = pytest.importorskip("torch.distributed.tensor").Shard
    for V, world in [(5, 4), (255, 2), (41, 2), (7, 3), (2, 3), (152064, 8), (0, 2)]:
        want = [Shard.local_shard_size_and_offset(V, world, r) for r in range(world)]
        assert [vocab_shard(V, world, r)[::-1] for r in range(world)] == [(int(n), int(s)) for n, s in want]


def test_errors_without_ranks():
    """Argument errors are raised before any collective; a missing process group is named."""
    import torch.distributed as dist

    x = torch.randn(3, 8)
    f = token_confidence_vocab_parallel
    with pytest.raises(TypeError, match="dtype in"):
        f(x.double(), vocab_start=0, vocab_size=8)
    with pytest.raises(ValueError, match="2 dims"):
        f(x[0], vocab_start=0, vocab_size=8)
    with pytest.raises(ValueError, match=r"not inside the vocabulary \[0, 10\)"):
        f(x, vocab_start=4, vocab_size=10)
    with pytest.raises(ValueError, match=r"not inside"):
        f(x, vocab_start=-1, vocab_size=10)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        f(x, vocab_start=0.0, vocab_size=8)
    with pytest.raises(ValueError, match="confidence must be one of"):
        f(x, vocab_start=0, vocab_size=8, confidence="entropy")
    with pytest.raises(ValueError, match="top_p"):
        f(x, vocab_start=0, vocab_size=8, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        f(x, vocab_start=0, vocab_size=8, temperature=-1.0)
    with pytest.raises(TypeError, match="suppress_ids must be int32 or int64"):
        f(x, vocab_start=0, vocab_size=8, suppress_ids=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="seed tensor must have shape"):
        f(x, vocab_start=0, vocab_size=8, seed=torch.zeros(2, dtype=torch.int64), temperature=1.0)
    if _SKIP is None and not dist.is_initialized():
        with pytest.raises(RuntimeError, match="initialized process group"):
            f(x, vocab_start=0, vocab_size=8)


def test_device_side_checks_name_the_problem():
    """Off the CPU (without PD_KERNELS_DEBUG) the cross-rank checks are device-side assertions (no sync): on a
    CPU tensor the same assertion raises at once, with the message."""
    from pd_kernels.parallel.vocab import _verify

    ok = torch.tensor([[0, 4, 7], [4, 5, 7]], dtype=torch.float64)
    _verify(ok, 9, host=False)
    _verify(ok, 9, host=True)
    with pytest.raises(RuntimeError, match="do not tile"):
        _verify(torch.tensor([[0, 4, 7], [5, 4, 7]], dtype=torch.float64), 9, host=False)
    with pytest.raises(RuntimeError, match="disagree"):
        _verify(torch.tensor([[0, 4, 7], [4, 5, 8]], dtype=torch.float64), 9, host=False)
