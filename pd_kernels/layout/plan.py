"""The attention *tiling plan* (its one home; :mod:`pd_kernels.ops.triton.span_attention` reads it): how the
segments of a layout are cut into the kernel's work units, and the tables that carry the cut to the device.

A *segment* is one PD span, all active spans of a PD-DA round, or a causal chunk of one sequence; a *tile* is up
to ``T`` consecutive query rows of one segment. Two tile classes, chosen per segment from its own length
(:func:`tile_geometry`): *narrow* (decode-shaped, keys split into units of >= 256 keys, fp32 partials merged in
split order) and *wide* (spans, prefill: one unit per tile). See :mod:`pd_kernels.layout` for the rules and
why they keep a request's output bitwise the same in any batch.

Tables (int32 on the device; row 0 of each is a header ``(count, 0, ...)``):

* unit rows (``UNIT_COLS`` columns): the tile columns ``TILE_*``, then ``UNIT_J0`` / ``UNIT_J1`` (key blocks of
  the tile's block list) and ``UNIT_SLOT`` (workspace slot of a split unit, -1 for a whole tile);
* merge rows (``MERGE_COLS``): ``MERGE_ROW0``, ``MERGE_NROWS``, ``MERGE_SLOT0``, ``MERGE_NSPLITS``.

Plans are cached per layout in a :class:`LayoutPlans` (one per segment table, plans by ``G``), found from the
layout's ``segs_host`` tensor through a weak identity map (:func:`plan_for`): the registered op receives only
the layout's tensors.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._checks import cdiv

# ---- the tiling plan's constants (read by pd_kernels.ops.triton.span_attention) ---------------------------
# columns of a tile row (:meth:`SpanLayout.tiles_host`); a work-unit row starts with the same 7 columns
TILE_SEQ, TILE_ROW0, TILE_NROWS, TILE_A, TILE_B, TILE_C, TILE_CAUSAL = range(7)
TILE_COLS = 8
# work-unit row: tile columns, then key blocks [J0, J1) of the tile's block list, and the workspace slot of a
# split unit (-1: the unit covers all of its tile's keys and writes the output itself). Row 0 of a unit table
# is a header: (count, 0, ...).
UNIT_J0, UNIT_J1, UNIT_SLOT = 7, 8, 9
UNIT_COLS = 12              # 48-byte rows
# merge row (one per split tile): first query row, rows, first slot, number of slots; row 0: (count, 0, 0, 0)
MERGE_ROW0, MERGE_NROWS, MERGE_SLOT0, MERGE_NSPLITS = range(4)
MERGE_COLS = 4
J_ALL = 2**31 - 1           # UNIT_J1 of an unsplit unit: every block of the tile

NARROW_ROWS = 16            # query block of the narrow class (the smallest tl.dot M)
WIDE_ROWS = 128             # query block of the wide class
SPLIT_BLOCK_N = 64          # key block of the narrow class: the unit of split points (the kernel uses it)
SPLIT_CHUNK_BLOCKS = 4      # a split unit covers at least 4 key blocks (256 keys)
MAX_SPLITS = 32             # at most 32 units per narrow tile (the chunk grows beyond 8192 keys)


@dataclass(frozen=True)
class TileGeometry:
    """Query blocks and tile heights (tokens) of the two classes for a GQA group size ``group``."""

    group: int
    narrow_m: int
    narrow_tokens: int
    wide_m: int
    wide_tokens: int


@functools.lru_cache(maxsize=64)
def tile_geometry(group: int) -> TileGeometry:
    """Tile classes for ``group = Hq / Hkv``: narrow ``max(16, next_pow2(G))`` rows (``T_n`` tokens), wide
    ``max(128, next_pow2(G))`` rows (``T_w`` tokens). A segment of ``n <= T_n`` tokens is one narrow tile,
    a longer one ``ceil(n / T_w)`` wide tiles."""
    G = int(group)
    if G < 1:
        raise ValueError(f"group must be >= 1, got {G}")
    p2 = 1 << (G - 1).bit_length()
    nm, wm = max(NARROW_ROWS, p2), max(WIDE_ROWS, p2)
    return TileGeometry(G, nm, nm // G, wm, wm // G)


def split_units(num_blocks: int) -> tuple[int, int]:
    """``(chunk, units)`` for a narrow tile with ``num_blocks`` key blocks of :data:`SPLIT_BLOCK_N` keys:
    units of ``chunk = max(SPLIT_CHUNK_BLOCKS, ceil(blocks / MAX_SPLITS))`` blocks, ``units = max(1,
    ceil(blocks / chunk))``. A function of the tile's own key count only."""
    chunk = max(SPLIT_CHUNK_BLOCKS, cdiv(num_blocks, MAX_SPLITS))
    return chunk, max(1, cdiv(num_blocks, chunk))


def _norm_device(device) -> torch.device:
    """``"cuda"`` -> ``cuda:<current>``, so that ``layout.device == q.device`` holds for tensors made with
    ``device="cuda"`` (torch.device("cuda") != torch.device("cuda:0"))."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host-to-device copy that does not block the host (pinned staging buffer) on CUDA."""
    if device.type != "cuda":
        return host.to(device)
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


def _segment_tiles(seg, T: int) -> list[tuple]:
    """The tiles ``(seq, row0, n, a, b, c, causal)`` (columns ``TILE_*``) of one segment ``seg`` = ``(seq, row0, n,
    pos0, a, b, c, causal)`` for tiles of at most ``T`` query rows. A causal tile of positions ``p0..p1``: every
    row sees ``[0, p0)`` and the row at ``p`` sees ``[p0, p]`` of ``[p0, p1 + 1)``; a one-row causal tile is
    written as a plain range ``[0, p0 + 1)`` (one key range, no per-row limit)."""
    b, row0, n, pos0, a, bb, c, causal = seg
    if not causal:
        return [(b, row0 + r, min(T, n - r), a, bb, c, 0) for r in range(0, n, T)]
    tiles = []
    for r in range(0, n, T):
        m = min(T, n - r)
        p0 = pos0 + r + (m == 1)
        tiles.append((b, row0 + r, m, p0, p0, pos0 + r + m, int(m > 1)))
    return tiles


_WHOLE = (0, J_ALL, -1, 0, 0)   # unit columns J0, J1, SLOT (+ 2 unused) of a unit covering all its tile's keys


def _plan_arrays(segs: np.ndarray, geo: TileGeometry):
    """``(narrow units int64 [Un, UNIT_COLS], wide units [Uw, UNIT_COLS], merge rows [M, MERGE_COLS], slots)`` of
    segments ``segs`` (``[S, 8]``, see :func:`_pack`).

    A segment of ``n <= T_n`` rows is one narrow tile, a longer one is cut into wide tiles of ``T_w`` rows. A
    wide tile is one unit over all its keys. A narrow tile's ``n0 + n1`` key blocks (``ceil(a / 64) +
    ceil((c - b) / 64)``, range ``[0, a)`` first) are cut by :func:`split_units`; a narrow tile with more than
    one unit gets consecutive workspace slots (in tile order) and a merge row.

    Plain Python over the segments: a decode step has a few dozen tiles, for which this costs about a fifth of
    the equivalent numpy (whose per-call overhead dominates at these sizes); a large prefill (thousands of
    tiles) costs about 1 us per tile, small beside its device work."""
    Tn, Tw = geo.narrow_tokens, geo.wide_tokens
    un, uw, mg = [], [], []
    slots = 0
    for seg in segs.tolist():
        if seg[2] > Tn:
            uw.extend(t + _WHOLE for t in _segment_tiles(seg, Tw))
            continue
        if seg[2] == 0:      # an empty segment (an unused row of a StaticSpanLayout's table): no tile
            continue
        t = _segment_tiles(seg, Tn)[0]
        a, b, c = t[TILE_A], t[TILE_B], t[TILE_C]
        nb = cdiv(a, SPLIT_BLOCK_N) + (cdiv(c - b, SPLIT_BLOCK_N) if c > b else 0)
        chunk, k = split_units(nb)
        if k == 1:
            un.append(t + (0, nb, -1, 0, 0))
        else:
            un.extend(t + (j, min(j + chunk, nb), slots + i, 0, 0) for i, j in enumerate(range(0, nb, chunk)))
            mg.append((t[TILE_ROW0], t[TILE_NROWS], slots, k))
            slots += k
    return (np.array(un, dtype=np.int64).reshape(-1, UNIT_COLS), np.array(uw, dtype=np.int64).reshape(-1, UNIT_COLS),
            np.array(mg, dtype=np.int64).reshape(-1, MERGE_COLS), slots)


def _plan_size(cap_n: int, cap_w: int, cap_m: int) -> int:
    return (2 + cap_n + cap_w) * UNIT_COLS + (1 + cap_m) * MERGE_COLS


def _write_plan(flat: np.ndarray, caps, un, uw, mg) -> None:
    """Write unit / merge tables (header row with the count, then the rows) into ``flat`` (int32) laid out
    for capacities ``caps = (narrow units, wide units, merge rows)``; rows past a count are left as they are
    (the kernels never read them)."""
    off = 0
    for rows, cap, cols in ((un, caps[0], UNIT_COLS), (uw, caps[1], UNIT_COLS), (mg, caps[2], MERGE_COLS)):
        assert len(rows) <= cap, (len(rows), cap)
        flat[off:off + cols] = 0
        flat[off] = len(rows)
        flat[off + cols:off + cols * (1 + len(rows))] = rows.reshape(-1)
        off += cols * (1 + cap)


@dataclass(eq=False)
class ClassPlan:
    """One tile class of a plan: what one launch of the attention kernel reads.

    ``units``: int32 ``[1 + capacity, UNIT_COLS]`` device table, row 0 = ``(count, 0, ...)``;
    ``max_units``: the launch bound (a dynamic plan: the count; a static one: the capacity);
    ``merge`` / ``max_merge``: the merge table of split tiles (narrow class; empty for wide);
    ``max_slots``: workspace slots the class may write."""

    block_m: int
    tokens_per_tile: int
    split: bool
    units: torch.Tensor
    max_units: int
    merge: torch.Tensor
    max_merge: int
    max_slots: int


@dataclass(eq=False)
class AttentionPlan:
    """The tiling plan of one layout for one ``G``: a narrow and a wide :class:`ClassPlan`, their device
    tables (one buffer), and the split-K workspace, allocated once per ``(Hkv, D)`` on first use and shared by
    every layer (layers run one after another on one stream).

    Host-side figures of the step: ``num_units`` (narrow, wide), ``num_merge``, ``num_slots``."""

    geometry: TileGeometry
    narrow: ClassPlan
    wide: ClassPlan
    device: torch.device
    num_units: tuple = (0, 0)
    num_merge: int = 0
    num_slots: int = 0
    _ws: dict = field(default_factory=dict)
    launch_cache: dict = field(default_factory=dict)   # the Triton launcher's per-geometry arguments

    @staticmethod
    def _make(geo: TileGeometry, buf: torch.Tensor, caps, device, bounds) -> "AttentionPlan":
        cn, cw, cm = caps
        ow = (1 + cn) * UNIT_COLS
        om = ow + (1 + cw) * UNIT_COLS
        un = buf[:ow].view(1 + cn, UNIT_COLS)
        uw = buf[ow:om].view(1 + cw, UNIT_COLS)
        mg = buf[om:om + (1 + cm) * MERGE_COLS].view(1 + cm, MERGE_COLS)
        bn, bw, bm, bs = bounds
        return AttentionPlan(geo, ClassPlan(geo.narrow_m, geo.narrow_tokens, True, un, bn, mg, bm, bs),
                             ClassPlan(geo.wide_m, geo.wide_tokens, False, uw, bw, mg[:1], 0, 0), device)

    def workspace(self, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(o_part [slots, Hkv, T_n * G, D], ml [slots, Hkv, T_n * G, 2])`` (at least one slot, so the
        narrow kernel always gets fp32 pointers), allocated once per ``(Hkv, D)`` and reused."""
        key = (num_kv_heads, head_dim)
        ws = self._ws.get(key)
        if ws is None:
            rows = self.geometry.narrow_tokens * self.geometry.group
            shape = (max(1, self.narrow.max_slots), num_kv_heads, rows)
            ws = self._ws[key] = (torch.empty(shape + (head_dim,), dtype=torch.float32, device=self.device),
                                  torch.empty(shape + (2,), dtype=torch.float32, device=self.device))
        return ws

    def workspace_bytes(self, num_kv_heads: int, head_dim: int) -> int:
        """Bytes :meth:`workspace` allocates (0 when no unit can be split)."""
        if self.narrow.max_slots == 0:
            return 0
        rows = self.geometry.narrow_tokens * self.geometry.group
        return self.narrow.max_slots * num_kv_heads * rows * (head_dim + 2) * 4


def _dynamic_plan(segs: np.ndarray, group: int, device: torch.device) -> AttentionPlan:
    geo = tile_geometry(group)
    un, uw, mg, slots = _plan_arrays(segs, geo)
    caps = (len(un), len(uw), len(mg))
    flat = np.empty(_plan_size(*caps), dtype=np.int32)
    _write_plan(flat, caps, un, uw, mg)
    buf = _to_device(torch.from_numpy(flat), device)
    p = AttentionPlan._make(geo, buf, caps, device, (len(un), len(uw), len(mg), slots))
    p.num_units, p.num_merge, p.num_slots = (len(un), len(uw)), len(mg), slots
    return p


class LayoutPlans:
    """The tiling plans of one segment table (one layout), one per group ``G``, built on first use.

    A :class:`~pd_kernels.SpanLayout` owns one for its (never modified) table; a
    :class:`~pd_kernels.StaticSpanLayout` owns one holding only its fixed plan (``fixed``: the tables its
    ``update`` refills in place), and a plan for another ``G`` is refused. At most :attr:`MAX_GROUPS` plans are
    kept (the oldest goes first); a model has one ``G``."""

    MAX_GROUPS = 4

    def __init__(self, segs: np.ndarray | None, device: torch.device, fixed: AttentionPlan | None = None):
        self._segs, self.device, self.fixed = segs, device, fixed
        self._by_group = {} if fixed is None else {fixed.geometry.group: fixed}

    def get(self, group: int) -> AttentionPlan:
        p = self._by_group.get(group)
        if p is None:
            if self.fixed is not None:
                raise ValueError(f"this StaticSpanLayout was built for group={self.fixed.geometry.group} query heads "
                                 f"per KV head, not {group}")
            if len(self._by_group) >= self.MAX_GROUPS:
                del self._by_group[next(iter(self._by_group))]
            p = self._by_group[group] = _dynamic_plan(self._segs, group, self.device)
        return p


# segs_host tensor -> its layout's LayoutPlans. Weak and by identity: an entry goes with its tensor, and a new
# tensor at a recycled address is never taken for an old one.
_BY_TABLE = WeakIdKeyDictionary()


def register_plans(segs_host: torch.Tensor, plans: LayoutPlans) -> None:
    """Make :func:`plan_for` find ``plans`` from the layout's ``segs_host`` tensor."""
    _BY_TABLE[segs_host] = plans


def plan_for(segs_host: torch.Tensor, group: int, device) -> AttentionPlan:
    """The plan for ``G = group`` of the layout whose segment table is ``segs_host``
    (:attr:`SpanLayout.segs_host`): the layout's own cached plan (every layer of a step, and the registered op
    under ``torch.compile``, which receives the same tensor, share it). A table no layout registered (a copy,
    as ``opcheck`` makes) gets a plan of its content, not cached."""
    plans = _BY_TABLE.get(segs_host)
    if plans is None:
        return _dynamic_plan(segs_host.numpy(), group, _norm_device(device))
    return plans.get(group)
