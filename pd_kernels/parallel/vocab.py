"""Token choice on logits sharded by vocabulary (tensor parallelism), without gathering them.

Under tensor parallelism the LM head is column-parallel: rank r computes the logits of its own slice
``[vocab_start, vocab_start + V_r)`` of the vocabulary. transformers' plans then all-gather them
(``lm_head: colwise_gather_output``): ``[N, V]`` on every rank, 78 MB per rank and step at N = 256,
V = 152064 in bf16. :func:`token_confidence_vocab_parallel` takes the local slice instead and returns, on every
rank, the token and confidence :func:`pd_kernels.token_confidence` returns on the gathered ``[N, V]`` logits:

1. each rank reduces its slice to six numbers per row (fp32 arithmetic, as the op);
2. one ``all_gather`` of them, packed as float64 ``[world, N + 1, 6]`` (48 (N + 1) bytes per rank);
3. every rank combines them in the same order, so every rank holds the same result (no broadcast needed).

The partials of shard s, row r (``z`` = fp32 logits after suppression and filters, ``y = z * fp32(1 / T)``
(``y = z`` at T = 0), NaN counted then treated as ``-inf``):

* the best key (``y``, plus at T > 0 the Gumbel noise of the *global* column, the op's counter-based hash, so a
  sampled token is exactly the gathered path's) and its lowest global column: the token is the best key over the
  shards, ties to the lowest global column (the op's rule);
* ``m_s = max y``, ``s_s = sum exp(y - m_s)``: the softmax denominator is ``s = sum_s s_s exp(m_s - m)``;
* one number for the confidence kind: ``prob`` ``y`` at the shard's token (``p = exp(y_tok - m) / s``);
  ``margin`` the shard's second-largest ``y`` (the global top-2 are among the shards' top-2); ``neg_entropy``
  ``w_s = sum exp(y - m_s) (y - m_s)`` (``sum p log p = sum_s exp(m_s - m) (w_s + (m_s - m) s_s) / s - log s``);
* a NaN flag (a NaN logit makes the row's confidence NaN, as in the op).

Why one ``all_gather`` and not ``all_reduce``: the token is an argmax with a lowest-index tie rule (a max, then a
min among the maxima), and the softmax terms are rescaled by each shard's max; one gather of a packed tensor gives
every rank all of it in one collective. float64 carries fp32 values and column ids (< 2^31) exactly.

Filters (top-k / top-p, as :func:`pd_kernels.token_confidence`, at T > 0 or with ``filter_greedy``):

* ``top_k`` (with or without ``top_p``): one more small ``all_gather`` before the partials: each rank's top-k
  logits (float64 ``[world, N + 1, top_k (+ 3)]``). The k-th largest of their union is exactly the op's top-k
  floor. With ``top_p`` too, the ranks also send ``m_s`` and ``s_s`` of the unfiltered row, and the nucleus is
  walked over the merged top-k: the op takes the larger of the two floors, so only the top k tokens can decide it.
  The nucleus cut compares an fp32 cumulative sum with ``top_p``; here the sum's denominator comes from the shard
  partials, so a row whose cumulative mass lies within float rounding (about 1e-7) of ``top_p`` can be cut one
  token differently than on the gathered logits (the op's own CPU and GPU paths already differ there).
* ``top_p`` alone: falls back to gathering the logits (a small ``all_gather`` of the shard sizes, one host read
  of them, an ``all_gather`` of the ``[N, V_r]`` slices padded to the largest) and
  :func:`pd_kernels.token_confidence` on the gathered ``[N, V]``: exact, but as costly as the gathered path. The
  nucleus can hold most of the vocabulary; no fixed candidate count bounds it.

Checks: every call checks its own arguments on the host (metadata only). The gathered rows carry each rank's
``(vocab_start, V_r)`` and a fingerprint of its call's host arguments; every rank checks that the slices tile
``[0, vocab_size)`` and that the fingerprints agree: on the host for CPU tensors (free) or with
``PD_KERNELS_DEBUG=1``; otherwise with ``torch._assert_async`` (no host sync; a device-side assertion). Ranks must
pass the same N: the collective cannot compare sizes, and a mismatch fails or hangs in the backend.
"""
from __future__ import annotations

import zlib

import torch

from .._checks import FLOAT_DTYPES, cdiv, debug_enabled
# Not exported at package level yet: the one place this module reaches into the op's modules (the seed / offset,
# temperature and suppressed-id checks, the kinds, and the counter-based hash, computed here for the shard's global
# columns only).
from ..ops.token_confidence import _check_suppress, _key, check_temperature
from ..reference.token_confidence import CONFIDENCE_KINDS, _fmix32, _mix32, gumbel_from_bits, row_state
from ..ops import token_confidence

__all__ = ["token_confidence_vocab_parallel", "vocab_shard"]

_F64 = torch.float64
_NINF = float("-inf")
# columns of the partials row: best key, its global column, max y, sum exp(y - max), the kind's number, NaN flag
_KEY, _IDX, _MAX, _SUM, _AUX, _NAN = range(6)


def vocab_shard(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(vocab_start, size)`` of ``rank``'s slice when a ``[V, ...]`` weight is split on dim 0 the way DTensor's
    ``Shard(0)`` (and ``torch.chunk``) splits it, as transformers' ``colwise`` LM head is: ``ceil(V / world)`` rows
    per rank, the last non-empty rank holds the remainder, ranks past the end hold an empty slice at ``V``
    (V = 255 on 2 ranks: (0, 128), (128, 127); V = 5 on 4 ranks: (0, 2), (2, 2), (4, 1), (5, 0))."""
    if not (isinstance(vocab_size, int) and isinstance(world_size, int) and isinstance(rank, int)):
        raise TypeError("vocab_shard takes ints")
    if vocab_size < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"vocab_shard: need vocab_size >= 0 and 0 <= rank < world_size, got {vocab_size}, "
                         f"{world_size}, {rank}")
    chunk = cdiv(vocab_size, world_size)
    start = min(vocab_size, chunk * rank)
    return start, min(vocab_size, start + chunk) - start


# ---------------------------------------------------------------------------------------------------
# argument checks (host, metadata only)
# ---------------------------------------------------------------------------------------------------
def _process_group(group):
    """The process group to use (``None``: the default one; a 1-D ``DeviceMesh``: its group), its size and this
    process's rank in it. Raises when torch.distributed is unusable or this process is not in the group."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("token_confidence_vocab_parallel needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError("token_confidence_vocab_parallel needs an initialized process group: call "
                           "torch.distributed.init_process_group (torchrun sets up its environment) first")
    if hasattr(group, "get_group") and hasattr(group, "mesh"):  # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"group: pass a 1-D DeviceMesh (e.g. mesh['tp']), got {group.ndim}-D {group}")
        group = group.get_group()
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("token_confidence_vocab_parallel: this process is not a member of the given group")
    return group, dist.get_world_size(group), rank


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"local_logits must be a torch.Tensor, got {type(logits).__name__}")
    if type(logits).__name__ == "DTensor":
        raise TypeError("local_logits is a DTensor: pass this rank's shard (dtensor.to_local()) and its vocab_start")
    if logits.dim() != 2:
        raise ValueError(f"local_logits must have 2 dims [N, V_local], got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"local_logits must have dtype in {[str(d) for d in FLOAT_DTYPES]} (those of "
                        f"token_confidence), got {logits.dtype}")


def _check_bounds(vocab_start, vocab_size, local: int) -> None:
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if not 1 <= vocab_size < 2**31 - 1:
        raise ValueError(f"vocab_size must be in [1, 2^31 - 2], got {vocab_size}")
    if not (0 <= vocab_start and vocab_start + local <= vocab_size):
        raise ValueError(f"the local slice [vocab_start, vocab_start + V_local) = [{vocab_start}, "
                         f"{vocab_start + local}) is not inside the vocabulary [0, {vocab_size})")


def _check_args(confidence, temperature, top_k, top_p, suppress_ids, dev) -> None:
    if not isinstance(confidence, str) or confidence not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
    check_temperature(temperature)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if type(top_k) is not int or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if suppress_ids is not None:
        _check_suppress(suppress_ids, dev)


def _fingerprint(*args) -> float:
    """A 32-bit hash of a call's host arguments (the same on every rank for the same call), as a float64."""
    return float(zlib.crc32(repr(args).encode()))


# ---------------------------------------------------------------------------------------------------
# the one collective of each phase, and the checks its extra row carries
# ---------------------------------------------------------------------------------------------------
def _exchange(rows: torch.Tensor, meta: tuple, group, world: int, vocab_size: int):
    """All-gather ``rows`` (float64 ``[R, C]``) plus one row ``meta = (vocab_start, V_local, fingerprint)``;
    check the meta rows of every rank (:func:`_verify`). Returns the ranks' rows ``[world, R, C]`` and their
    meta rows ``[world, 3]``."""
    R, C = rows.shape
    buf = torch.zeros(R + 1, max(C, 3), dtype=_F64, device=rows.device)
    buf[:R, :C] = rows
    buf[R, :3] = torch.tensor(meta, dtype=_F64)
    out = torch.empty((world,) + tuple(buf.shape), dtype=_F64, device=rows.device)
    _all_gather(out, buf, group)
    metas = out[:, R, :3]
    _verify(metas, vocab_size, host=rows.device.type == "cpu" or debug_enabled())
    return out[:, :R, :C], metas


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``out[w] = inp`` of rank w (``out``: contiguous ``[world, *inp.shape]``), one collective. The output is
    passed in its concatenated form ``[world * R, ...]`` (gloo refuses the stacked one)."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out.view(-1, *inp.shape[1:]), inp, group=group)


def _verify(meta: torch.Tensor, vocab_size: int, *, host: bool) -> None:
    """``meta`` float64 ``[world, 3]``: every rank's (vocab_start, V_local, fingerprint). The slices must tile
    ``[0, vocab_size)`` (sorted by start, each begins where the previous ends) and the fingerprints agree.
    ``host``: read them (a ValueError naming the problem); else device-side assertions (no sync)."""
    m = meta.to(torch.int64)
    agree = (m[:, 2] == m[0, 2]).all()
    order = torch.argsort(m[:, 0] * 2**31 + m[:, 1])   # by start, empty slices first at equal starts
    start, size = m[order, 0], m[order, 1]
    end = start + size
    tiles = (start[0] == 0) & (end[-1] == vocab_size) & (start[1:] == end[:-1]).all()
    disagree_msg = ("token_confidence_vocab_parallel: the ranks disagree on the call (N, vocab_size, dtype, "
                    "confidence, temperature, top_k, top_p, filter_greedy, int seed / offset, number of suppressed "
                    "ids): every rank must make the same call")
    if host:
        if not bool(agree):
            raise ValueError(disagree_msg)
        if not bool(tiles):
            bounds = [(int(a), int(a) + int(b)) for a, b in m[:, :2].tolist()]
            raise ValueError(f"token_confidence_vocab_parallel: the ranks' vocabulary slices [start, end) {bounds} "
                             f"(in rank order) do not tile [0, {vocab_size})")
    else:
        torch._assert_async(agree, disagree_msg)
        torch._assert_async(tiles, "token_confidence_vocab_parallel: the ranks' vocabulary slices do not tile "
                                   f"[0, {vocab_size}) (PD_KERNELS_DEBUG=1 names them)")


# ---------------------------------------------------------------------------------------------------
# per-shard pieces
# ---------------------------------------------------------------------------------------------------
def _suppressed(suppress_ids: torch.Tensor | None, start: int, local: int, dev) -> torch.Tensor | None:
    """bool ``[V_local]``: which local columns are suppressed (global ids outside the slice ignored; no sync)."""
    if suppress_ids is None or suppress_ids.numel() == 0 or local == 0:
        return None
    idx = suppress_ids.to(torch.int64) - start
    inside = (idx >= 0) & (idx < local)
    hits = torch.zeros(local, dtype=torch.int32, device=dev)
    hits.index_add_(0, idx.clamp(0, local - 1), inside.to(torch.int32))
    return hits > 0


def _softmax_partials(y: torch.Tensor):
    """``m = max y`` and ``s = sum exp(y - m)`` per row of fp32 ``y`` ``[N, V_local]`` without NaN (``s = 0``
    for a row that is all ``-inf``), and ``e = exp(y - m)``, ``d = y - m``."""
    m = y.amax(dim=-1) if y.shape[1] else y.new_full((y.shape[0],), _NINF)
    d = y - torch.where(m == _NINF, 0.0, m)[:, None]
    e = torch.exp(d)
    return m, e.sum(dim=-1), e, d


def _combine_softmax(m_s: torch.Tensor, s_s: torch.Tensor):
    """Global ``m`` ``[N]``, per-shard scales ``exp(m_s - m)`` ``[W, N]`` (0 for an empty shard) and
    ``s = sum_s s_s exp(m_s - m)`` from the shards' ``[W, N]`` partials."""
    m = m_s.amax(dim=0)
    scale = torch.where(m_s == _NINF, 0.0, torch.exp(m_s - m))
    return m, scale, (s_s * scale).sum(dim=0)


def _local_gumbel(seed, offset, N: int, start: int, local: int, dev) -> torch.Tensor:
    """The op's Gumbel noise of the global columns ``[start, start + local)``: fp32 ``[N, local]``, the same
    numbers the gathered ``[N, V]`` noise holds there (``reference.token_confidence.random_bits`` with a column offset)."""
    h = row_state(seed, offset, N, dev)
    cols = torch.arange(start, start + local, dtype=torch.int64, device=dev)
    return gumbel_from_bits(_fmix32(_mix32(h[:, None], cols[None, :])))


# ---------------------------------------------------------------------------------------------------
# the public function
# ---------------------------------------------------------------------------------------------------
def token_confidence_vocab_parallel(local_logits: torch.Tensor, *, vocab_start: int, vocab_size: int, group=None,
                                    confidence: str = "prob", temperature: float = 0.0,
                                    seed: int | torch.Tensor = 0, offset: int | torch.Tensor = 0,
                                    suppress_ids: torch.Tensor | None = None, top_k: int = 0, top_p: float = 1.0,
                                    filter_greedy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pd_kernels.token_confidence` of the gathered logits, computed from this rank's vocabulary slice.

    Every rank of ``group`` calls it with the same arguments except ``local_logits`` / ``vocab_start``, and gets
    the same result: the token and confidence :func:`pd_kernels.token_confidence` gives on ``[N, vocab_size]``,
    the ranks' slices placed at their ``vocab_start``. Tokens are identical (greedy and sampled: the Gumbel noise
    is keyed by the global column); confidences agree within the op's fp32 rounding.

    Args:
        local_logits: ``[N, V_local]`` fp16 / bf16 / fp32 (any strides): this rank's columns
            ``[vocab_start, vocab_start + V_local)`` of the logits. ``V_local`` may be 0 and may differ between
            ranks (:func:`vocab_shard` gives the split transformers' ``colwise`` LM head makes).
        vocab_start, vocab_size: the slice's first global column and the full vocabulary size V. The ranks'
            slices must tile ``[0, V)`` in any order (checked, see the module notes).
        group: the process group (default: the default group) or a 1-D ``DeviceMesh``.
        confidence, temperature, seed, offset, top_k, top_p, filter_greedy: as :func:`pd_kernels.token_confidence`.
        suppress_ids: int32 / int64 ``[S]`` *global* ids never chosen (ids outside ``[0, V)`` are ignored).

    Returns: ``token`` int64 ``[N]`` (global ids; ``-1`` for a row with nothing usable) and ``conf`` fp32 ``[N]``
    (``-inf`` there, NaN for a row holding a NaN), on the logits' device.

    Collectives: one ``all_gather`` of float64 ``[world, N + 1, 6]``; with ``top_k`` one more before it, of
    ``[world, N + 1, top_k (+ 3 with top_p)]``; ``top_p`` without ``top_k`` gathers the logits (module notes).
    """
    _check_logits(local_logits)
    N, local = local_logits.shape
    _check_bounds(vocab_start, vocab_size, local)
    dev = local_logits.device
    _check_args(confidence, temperature, top_k, top_p, suppress_ids, dev)
    if not (type(seed) is int and 0 <= seed < 2**63):
        seed = _key(seed, "seed", N, dev, False)[0]
    if not (type(offset) is int and 0 <= offset < 2**63):
        offset = _key(offset, "offset", N, dev, True)[0]
    group, world, _ = _process_group(group)
    sample = temperature > 0
    filtered = sample or filter_greedy
    use_k = filtered and 0 < top_k < vocab_size
    use_p = filtered and top_p < 1.0
    fp = _fingerprint(N, vocab_size, str(local_logits.dtype), confidence, float(temperature), top_k, float(top_p),
                      bool(filter_greedy), seed if type(seed) is int else "t", offset if type(offset) is int else "t",
                      0 if suppress_ids is None else suppress_ids.numel())
    meta = (vocab_start, local, fp)
    if N == 0:
        return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.float32, device=dev)
    if use_p and not use_k:
        full = _gather_logits(local_logits, vocab_start, vocab_size, meta, group, world)
        return token_confidence(full, confidence=confidence, temperature=temperature, seed=seed, offset=offset,
                                suppress_ids=suppress_ids, top_p=top_p, filter_greedy=filter_greedy)

    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32) if sample else None
    z = local_logits.to(torch.float32, copy=True)
    sup = _suppressed(suppress_ids, vocab_start, local, dev)
    if sup is not None:
        z.masked_fill_(sup, _NINF)
    if use_k:
        floor = _filter_floor(z, inv_t, top_k, top_p if use_p else 1.0, meta, group, world, vocab_size)
        z = torch.where(z < floor[:, None], _NINF, z)   # NaN stays NaN, as in the op
    nan = torch.isnan(z).any(dim=-1)
    z.masked_fill_(torch.isnan(z), _NINF)
    y = z * inv_t if sample else z

    # this shard's partials
    key = y + _local_gumbel(seed, offset, N, vocab_start, local, dev) if sample else y
    if local:
        best, arg = key.max(dim=-1)   # first index among equal maxima
    else:
        best, arg = key.new_full((N,), _NINF), torch.zeros(N, dtype=torch.int64, device=dev)
    m_s, s_s, e, d = _softmax_partials(y)
    if confidence == "prob":
        aux = y.gather(1, arg[:, None]).squeeze(1) if local else best
    elif confidence == "margin":
        aux = torch.topk(y, 2, dim=-1).values[:, 1] if local >= 2 else y.new_full((N,), _NINF)
    else:
        aux = torch.where(e > 0, e * d, 0.0).sum(dim=-1)
    rows = torch.stack([best.double(), (arg + vocab_start).double(), m_s.double(), s_s.double(), aux.double(),
                        nan.double()], dim=-1)
    P, _ = _exchange(rows, meta, group, world, vocab_size)   # [W, N, 6]

    # combine: the same arithmetic on every rank
    keys = P[..., _KEY]
    top = keys.amax(dim=0)
    token = torch.where(keys == top, P[..., _IDX], float("inf")).amin(dim=0)
    none = top == _NINF
    m, scale, s = _combine_softmax(P[..., _MAX], P[..., _SUM])
    if confidence == "prob":
        owner = (keys == top) & (P[..., _IDX] == token)
        y_tok = torch.where(owner, P[..., _AUX], _NINF).amax(dim=0)
        conf = torch.exp(y_tok - m) / s
    elif confidence == "margin":
        second = torch.topk(torch.cat([P[..., _MAX], P[..., _AUX]]), 2, dim=0).values[1]
        conf = (1.0 - torch.exp(second - m)) / s
    else:
        terms = torch.where(scale > 0, scale * (P[..., _AUX] + (P[..., _MAX] - m) * P[..., _SUM]), 0.0)
        conf = terms.sum(dim=0) / s - torch.log(s)
    nan_row = P[..., _NAN].amax(dim=0) > 0
    conf = torch.where(torch.isfinite(m) & ~nan_row, conf, float("nan"))
    conf = torch.where(none & ~nan_row, _NINF, conf)
    token = torch.where(none, -1.0, token)
    return token.to(torch.int64), conf.to(torch.float32)


def _filter_floor(z: torch.Tensor, inv_t, top_k: int, top_p: float, meta, group, world: int,
                  vocab_size: int) -> torch.Tensor:
    """The op's top-k (and top-p) floor per row (:func:`pd_kernels.reference.token_confidence.filter_threshold`), fp32
    ``[N]``, from one all-gather of each shard's top-k logits (and its unfiltered softmax partials for top-p).

    ``z``: this shard's fp32 logits after suppression (``-inf``), NaN kept (it ranks above every number, as in
    ``torch.topk``). top-p is walked over the merged top-k only: the op keeps the larger floor, so a nucleus
    reaching past the k-th token leaves the top-k floor in place."""
    N, local = z.shape
    use_p = top_p < 1.0
    kk = min(top_k, local)
    cols = [torch.full((N, top_k), _NINF, dtype=_F64, device=z.device)]
    if kk:
        cols[0][:, :kk] = torch.topk(z, kk, dim=-1).values
    if use_p:
        nan = torch.isnan(z).any(dim=-1)
        y = z.masked_fill(torch.isnan(z), _NINF)
        y = y * inv_t if inv_t is not None else y
        m_s, s_s, _, _ = _softmax_partials(y)
        cols.append(torch.stack([m_s.double(), s_s.double(), nan.double()], dim=-1))
    P, _ = _exchange(torch.cat(cols, dim=-1), meta, group, world, vocab_size)   # [W, N, top_k (+ 3)]
    vals = torch.topk(P[..., :top_k].permute(1, 0, 2).reshape(N, world * top_k), top_k, dim=-1).values
    floor = vals[:, -1].float()
    floor = torch.where(torch.isnan(floor), _NINF, floor)
    if not use_p:
        return floor
    # the op's nucleus over the merged top-k: fp32 softmax terms, fp32 cumulative sum, "mass before <= top_p"
    m, _, s = _combine_softmax(P[..., top_k], P[..., top_k + 1])
    nan_row = P[..., top_k + 2].amax(dim=0) > 0
    v32 = vals.float()
    yv = v32 * inv_t if inv_t is not None else v32
    p = torch.exp(yv - m.float()[:, None]) / s.float()[:, None]
    p = torch.where((torch.isfinite(m) & ~nan_row)[:, None], p, float("nan"))  # the op's softmax is NaN there
    kept = torch.ones_like(p, dtype=torch.bool)
    kept[:, 1:] = p.cumsum(dim=-1)[:, :-1] <= top_p
    thr_p = torch.where(kept, v32, float("inf")).amin(dim=-1)
    return torch.maximum(floor, torch.where(torch.isnan(thr_p), _NINF, thr_p))


def _gather_logits(local_logits: torch.Tensor, vocab_start: int, vocab_size: int, meta, group,
                   world: int) -> torch.Tensor:
    """The full ``[N, V]`` logits on every rank (the top-p fallback): the slices' bounds first (one small
    all-gather, read on the host), then the slices padded to the largest (one all-gather)."""
    _, metas = _exchange(torch.zeros(0, 3, dtype=_F64, device=local_logits.device), meta, group, world,
                         vocab_size)
    spans = metas[:, :2].to(torch.int64).tolist()   # a host read (a sync on a GPU): the fallback's only one
    N, local = local_logits.shape
    width = max(n for _, n in spans)
    buf = local_logits.new_zeros(N, width)
    buf[:, :local] = local_logits
    out = local_logits.new_empty(world, N, width)
    _all_gather(out, buf, group)
    full = local_logits.new_empty(N, vocab_size)
    for w, (start, n) in enumerate(spans):
        full[:, start:start + n] = out[w, :, :n]
    return full
