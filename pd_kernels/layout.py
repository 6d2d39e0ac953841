"""Query layouts for :func:`pd_kernels.span_attention` (SPEC section 4: who sees whom), and the attention
*tiling plan*: how the queries of a layout are cut into the kernel's work units.

A forward pass of the decoder packs, over a batch of sequences, the queries it computes: a causal chunk
(prompt prefill, one AR planning token, the ``<sync/>`` token) or the active spans of a diffusion round.
:class:`SeqQueries` describes the queries of one sequence, :class:`SpanLayout` packs them.

Every query row ``t`` sees the keys ``[0, a_t) U [b_t, c_t)`` of its own sequence:

==========================  ==========================  =====================================
query                       ``[0, a)``                   ``[b, c)``
==========================  ==========================  =====================================
causal, position ``i``      ``[0, i + 1)``               empty
span ``j``, ``"pd"``        ``[0, prefix)``              ``[start_j, start_j + len_j)``
span, ``"pd-da"``           ``[0, prefix + sum(lens))``  empty
padding (``pad_to``)        empty                        empty (the output row is 0)
==========================  ==========================  =====================================

**Tiling plan** (this module is its one home; the Triton kernel module reads it). A *segment* is one PD
span, all active spans of a PD-DA round, or a causal chunk of one sequence: its rows share two key ranges
(a causal segment further limits each row to its own position). A *tile* is up to ``T`` consecutive
query rows of one segment; the kernel stacks the ``G = Hq / Hkv`` query heads of a KV head with the tokens
(``T * G`` rows of its query block), so a tile loads each key block once for the whole group. Two tile
classes, chosen **per segment from its own length** (:func:`tile_geometry`):

* *narrow* (decode: one AR token, ``<sync/>``, tiny segments): query block ``max(16, G)`` rows, so
  ``T_n = 16 // G`` tokens (G = 7: 2). Its keys are split into *work units* of at least
  :data:`SPLIT_CHUNK_BLOCKS` x :data:`SPLIT_BLOCK_N` = 256 keys (at most :data:`MAX_SPLITS` units per
  tile; the chunk grows past 8192 keys), so a one-token decode over 4096 keys runs as 16 units per KV head
  instead of one program. Split units write fp32 partials (unnormalised output, running max, sum) into a
  workspace slot; a merge kernel folds a tile's slots in split order (log-sum-exp).
* *wide* (spans, prefill): query block ``max(128, G)`` rows, ``T_w = 128 // G`` tokens (G = 7: 18), one
  unit per tile (no split: these grids are large).

**Batch invariance**: a segment's class, tiles, split points and the kernel variant that runs them
depend only on that segment (its length and key ranges) and the model's ``G`` and head dim, never on the
other sequences of the step, the grid, the GPU or the bucket: a request's output is bitwise the same alone
or in any batch, in a :class:`SpanLayout` or a :class:`StaticSpanLayout`. (Grid sizes and the order in
which programs pick up units do vary; they do not change any unit's arithmetic.)

Plans are computed on the host (plain Python over the segments) once per layout and ``G``
(:meth:`SpanLayout.plan`), reach the device with one non-blocking copy, and are shared by the 28 layers of
a step. Everything a layout builds on the host happens in :meth:`SpanLayout.build` /
:meth:`SpanLayout.plan` / :meth:`StaticSpanLayout.update`, never inside a model forward's attention call
(``torch.compile`` traces those calls; see :data:`SpanLayout.segs_host`).

CUDA graphs: a :class:`SpanLayout` has fresh device tensors every step and a unit count (the kernel's grid)
that depends on the step. :class:`StaticSpanLayout` is the bucketed form: fixed-size device buffers for a
bucket (query rows, sequences, segments, keys per sequence) that :meth:`StaticSpanLayout.update` refills
in place (one non-blocking copy from a pinned staging buffer); unit and merge tables have a capacity fixed
per bucket and carry the step's count in a header row that the kernels read, so one captured
``span_attention`` replays correctly for every step of the bucket.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

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


def _cdiv(a, b):
    return -(-a // b)


def split_units(num_blocks: int) -> tuple[int, int]:
    """``(chunk, units)`` for a narrow tile with ``num_blocks`` key blocks of :data:`SPLIT_BLOCK_N` keys:
    units of ``chunk = max(SPLIT_CHUNK_BLOCKS, ceil(blocks / MAX_SPLITS))`` blocks, ``units = max(1,
    ceil(blocks / chunk))``. A function of the tile's own key count only."""
    chunk = max(SPLIT_CHUNK_BLOCKS, -(-num_blocks // MAX_SPLITS))
    return chunk, max(1, -(-num_blocks // chunk))


@dataclass(frozen=True)
class SeqQueries:
    """The queries of one sequence in one forward pass. Build with :meth:`causal` or :meth:`spans`."""

    kind: str
    start: int = 0
    length: int = 0
    prefix: int = 0
    span_lens: tuple[int, ...] = ()
    active: tuple[bool, ...] = ()
    mode: str = "pd"

    @staticmethod
    def causal(start: int, length: int) -> "SeqQueries":
        """Queries at positions ``[start, start + length)``; position ``i`` sees keys ``[0, i]``.

        Prefill: ``start`` = tokens already cached (often 0). AR decode and ``<sync/>``: ``length = 1``.
        """
        start, length = _as_int(start, "start"), _as_int(length, "length")
        if start < 0 or length < 0:
            raise ValueError(f"SeqQueries.causal needs start >= 0 and length >= 0, got ({start}, {length})")
        return SeqQueries("causal", start=start, length=length)

    @staticmethod
    def spans(prefix: int, span_lens, active=None, mode: str = "pd") -> "SeqQueries":
        """The spans of a diffusion round, right after a prefix of ``prefix`` tokens.

        Span ``j`` covers ``[prefix + sum(span_lens[:j]), + span_lens[j])`` (tags included). The queries
        are every token of every active span (``active`` defaults to all), in position order.
        ``mode="pd"``: a span token sees ``[0, prefix)`` and its own span; ``"pd-da"``: it sees
        ``[0, prefix + sum(span_lens))`` (all spans of the round, active or finished).
        """
        prefix = _as_int(prefix, "prefix")
        if prefix < 0:
            raise ValueError(f"SeqQueries.spans needs prefix >= 0, got {prefix}")
        lens = tuple(_as_int(n, "span length") for n in span_lens)
        bad = [(j, n) for j, n in enumerate(lens) if n < 1]
        if bad:
            raise ValueError(f"SeqQueries.spans: span lengths must be >= 1 (spans are laid out one after "
                             f"another and may not overlap or be empty), got (index, length) {bad}")
        if active is None:
            act = (True,) * len(lens)
        else:
            try:
                act = tuple(active)
            except TypeError:
                raise TypeError(f"SeqQueries.spans: active must be a sequence of bools, one per span, got "
                                f"{type(active).__name__}") from None
            bad = [x for x in act if not isinstance(x, (bool, np.bool_)) and not (isinstance(x, (int, np.integer))
                                                                                  and x in (0, 1))]
            if bad:
                raise TypeError(f"SeqQueries.spans: active flags must be bools (or 0 / 1), got {bad[:4]}")
            act = tuple(bool(x) for x in act)
            if len(act) != len(lens):
                raise ValueError(f"SeqQueries.spans: {len(act)} active flags for {len(lens)} spans")
        if mode not in ("pd", "pd-da"):
            raise ValueError(f"SeqQueries.spans: mode must be 'pd' or 'pd-da', got {mode!r}")
        return SeqQueries("spans", prefix=prefix, span_lens=lens, active=act, mode=mode)

    @functools.cached_property
    def _parts(self) -> tuple[tuple, tuple, int]:
        """``(runs, segments, max_key)`` of this sequence, rows counted from its first query (computed once per
        object: the decoder keeps a request's :class:`SeqQueries` while the request does not change).

        A *run* ``(row, n, pos0, a, b, c, causal)`` is ``n`` query rows at consecutive positions from ``pos0``
        with the same key ranges (a causal run: row ``i`` sees ``[0, pos0 + i + 1)``, its ``a, b, c`` are 0);
        a *segment* has the same columns (see the module docstring; a PD-DA round is one segment made of one
        run per active span, its ``pos0`` the first run's). ``max_key``: the largest visible key + 1."""
        if self.kind == "causal":
            if not self.length:
                return (), (), 0
            run = (0, self.length, self.start, 0, 0, 0, 1)
            return (run,), (run,), self.start + self.length
        p = pos = self.prefix
        runs, row = [], 0
        if self.mode == "pd":
            for n, act in zip(self.span_lens, self.active):
                if act:
                    runs.append((row, n, pos, p, pos, pos + n, 0))
                    row += n
                pos += n
            return tuple(runs), tuple(runs), max((max(p, r[5]) for r in runs), default=0)
        end = p + sum(self.span_lens)   # pd-da: every active query sees the same keys
        for n, act in zip(self.span_lens, self.active):
            if act:
                runs.append((row, n, pos, end, end, end, 0))
                row += n
            pos += n
        if not runs:
            return (), (), 0
        return tuple(runs), ((0, row, runs[0][2], end, end, end, 0),), end

    def segments(self) -> list[tuple[int, int, int, int, int, int]]:
        """``(pos0, n, a, b, c, causal)`` of each segment (a causal segment's ``a, b, c`` are per tile)."""
        return [sg[1:] for sg in self._parts[1]]

    def positions(self) -> np.ndarray:
        if self.kind == "causal":
            return np.arange(self.start, self.start + self.length, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(self.span_lens, dtype=np.int64)]) + self.prefix
        parts = [np.arange(starts[j], starts[j] + n, dtype=np.int64)
                 for j, n in enumerate(self.span_lens) if self.active[j]]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def num_queries(self) -> int:
        if self.kind == "causal":
            return self.length
        return sum(n for n, a in zip(self.span_lens, self.active) if a)


def _as_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return int(x)


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


def _check_seqs(seqs, who: str) -> tuple[SeqQueries, ...]:
    seqs = tuple(seqs)
    for i, s in enumerate(seqs):
        if not isinstance(s, SeqQueries):
            raise TypeError(f"{who}: entry {i} is a {type(s).__name__}, expected SeqQueries")
    return seqs


def _pack(seqs: tuple[SeqQueries, ...], pad_to: int | None, who: str):
    """Host arrays of a layout: ``(host int32 [5, rows], segs int64 [S, 8], kv_lens, real_rows)``.

    ``host`` rows: q_pos, q_seq, q_kv a, b, c. ``segs`` rows: (seq, row0, n, pos0, a, b, c, causal); a padding
    segment (empty key ranges: its rows output 0) is appended when ``pad_to`` adds rows. A Python pass over
    the sequences' cached runs and segments, then a fixed number of numpy calls whatever the batch.
    """
    runs, segs, kv_lens = [], [], []
    row = 0
    for b, s in enumerate(seqs):
        rs, sg, mk = s._parts
        runs.extend((b, row + r[0]) + r[1:] for r in rs)
        segs.extend((b, row + g[0]) + g[1:] for g in sg)
        kv_lens.append(mk)
        if rs:
            row += rs[-1][0] + rs[-1][1]
    real = row
    if pad_to is not None and pad_to != real:
        if pad_to < real:
            raise ValueError(f"{who}: pad_to={pad_to} is smaller than the {real} queries")
        segs.append((0, real, pad_to - real, 0, 0, 0, 0, 0))  # empty key ranges: rows output 0
        row = pad_to
    if max(kv_lens, default=0) >= 2**31 - 1 or row >= 2**31 - 1:
        raise ValueError("SpanLayout: positions must fit in int32")
    # one buffer, one copy; fields are rows so q_pos / q_seq are contiguous views (the kernel reads q_pos).
    # Padding rows: position 0, sequence -1, no keys.
    host = np.zeros((5, row), dtype=np.int32)
    host[1, real:] = -1
    if real:
        per_row = np.repeat(np.array(runs, dtype=np.int64), [r[2] for r in runs], axis=0)  # [real, 8]
        pos = per_row[:, 3] + (np.arange(real) - per_row[:, 1])
        host[0, :real] = pos
        host[1, :real] = per_row[:, 0]
        host[2, :real] = np.where(per_row[:, 7] == 1, pos + 1, per_row[:, 4])   # causal: [0, pos + 1)
        host[3:5, :real] = per_row[:, 5:7].T
    return host, np.array(segs, dtype=np.int64).reshape(-1, 8), kv_lens, real


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
        nb = -(-a // SPLIT_BLOCK_N) + (-(-(c - b) // SPLIT_BLOCK_N) if c > b else 0)
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


def plan_for(segs_host: torch.Tensor, group: int, device) -> AttentionPlan:
    """The plan of the layout whose segment table is ``segs_host`` (:attr:`SpanLayout.segs_host`) for
    ``G = group``: built on first use (on the host, plus one non-blocking host-to-device copy) and cached on
    that tensor, so every layer of a step, and the registered op under ``torch.compile`` (which receives the
    same tensor), reuse it. A :class:`StaticSpanLayout` puts its fixed plan there for its ``group``."""
    cache = getattr(segs_host, "_pd_plans", None)
    if cache is None:
        cache = segs_host._pd_plans = {}
    p = cache.get(group)
    if p is None:
        if getattr(segs_host, "_pd_fixed", False):   # a StaticSpanLayout's buffer: its plan only
            raise ValueError(f"this StaticSpanLayout was built for group={next(iter(cache))} query heads per KV "
                             f"head, not {group}")
        p = cache[group] = _dynamic_plan(segs_host.numpy(), group, _norm_device(device))
    return p


@dataclass(eq=False)
class SpanLayout:
    """Packed queries of a batch of sequences and what each one sees. Build with :meth:`build`.

    Device tensors (int32, on ``device``):
        q_pos ``[Tq]``: position of each query in its sequence (padding: 0); RoPE and slot mappings use it.
        q_seq ``[Tq]``: sequence index ``b`` (row of the block table) of each query (padding: -1).
        q_kv ``[Tq, 3]``: ``(a, b, c)``: the query sees keys ``[0, a) U [b, c)`` of its sequence (a view with
        strides ``(1, Tq)``).
    Host values: ``num_queries`` (padding included), ``num_seqs``, ``kv_lens`` (keys sequence ``b`` must hold
    in the cache: its largest visible key + 1, 0 without queries), ``max_kv``, ``seqs`` (the
    :class:`SeqQueries`).
    Host tensors (CPU, int64; what the registered op receives under ``torch.compile``, where the layout
    object itself cannot travel): ``segs_host`` ``[S, 8]`` segments (seq, row0, n, pos0, a, b, c, causal),
    ``kv_host`` ``[B]`` the ``kv_lens`` (a :class:`StaticSpanLayout`: fixed buffers ``[max_segments + 1, 8]``
    and ``[max_seqs]`` refilled in place, unused rows empty segments).
    """

    seqs: tuple[SeqQueries, ...]
    device: torch.device
    num_queries: int
    num_real_queries: int
    kv_lens: list[int]
    q_pos: torch.Tensor
    q_seq: torch.Tensor
    q_kv: torch.Tensor
    _segs: np.ndarray            # [S, 8] int64: seq, row0, n, pos0, a, b, c, causal (see _pack)
    segs_host: torch.Tensor = None
    kv_host: torch.Tensor = None
    max_kv: int = 0

    def __post_init__(self):
        self._set_host(self._segs, self.kv_lens)

    def _set_host(self, segs: np.ndarray, kv_lens: list[int]) -> None:
        self._segs = segs
        self.segs_host = torch.from_numpy(segs)
        self.kv_lens = kv_lens
        self.kv_host = torch.from_numpy(np.asarray(kv_lens, dtype=np.int64).reshape(-1))
        self.max_kv = max(kv_lens, default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.kv_lens)

    @property
    def max_segment(self) -> int:
        """Most query rows in one segment."""
        return int(self._segs[:, 2].max()) if len(self._segs) else 0

    @staticmethod
    def build(seqs, device, pad_to: int | None = None) -> "SpanLayout":
        """Pack the queries of ``seqs`` (entry ``b`` = row ``b`` of the block table) in sequence order.

        ``pad_to``: pad the query count to this fixed size; padded rows output 0.
        One host-to-device copy (the tiling plan adds one more on the first attention call per ``G``, or call
        :meth:`plan` ahead). For a captured CUDA graph use :class:`StaticSpanLayout`.
        """
        seqs = _check_seqs(seqs, "SpanLayout.build")
        device = _norm_device(device)
        if pad_to is not None:
            pad_to = _as_int(pad_to, "pad_to")
        host, seg_arr, kv_lens, real = _pack(seqs, pad_to, "SpanLayout.build")
        row = host.shape[1]
        dev = _to_device(torch.from_numpy(host), device)
        return SpanLayout(seqs=seqs, device=device, num_queries=row, num_real_queries=real, kv_lens=kv_lens,
                          q_pos=dev[0], q_seq=dev[1], q_kv=dev[2:5].t(), _segs=seg_arr)

    # ---- tiling plan -----------------------------------------------------------------------------
    def plan(self, group: int) -> AttentionPlan:
        """The tiling plan for ``G = group`` query heads per KV head (built on first use, then cached)."""
        return plan_for(self.segs_host, group, self.device)

    def tiles_host(self, tokens_per_tile: int) -> np.ndarray:
        """Tile rows int64 ``[num_tiles, TILE_COLS]`` (columns ``TILE_*``) cutting every segment into tiles of at
        most ``tokens_per_tile`` query rows (host numpy, for inspection; the plan cuts each segment with
        its own class's height)."""
        T = int(tokens_per_tile)
        if T < 1:
            raise ValueError(f"tokens_per_tile must be >= 1, got {T}")
        tiles = [t + (0,) for seg in self._segs.tolist() for t in _segment_tiles(seg, T)]
        return np.array(tiles, dtype=np.int64).reshape(-1, TILE_COLS)

    # ---- inspection ------------------------------------------------------------------------------
    def to_dense_mask(self) -> torch.Tensor:
        """bool ``[Tq, max(kv_lens)]`` on the layout's device: ``mask[t, k]`` is True when query ``t`` sees key
        position ``k`` of its sequence ``q_seq[t]``. Padding rows are all False."""
        L = self.max_kv
        k = torch.arange(L, device=self.device, dtype=torch.int32)[None, :]
        a, b, c = (self.q_kv[:, i:i + 1] for i in range(3))
        return (k < a) | ((k >= b) & (k < c))

    def __repr__(self) -> str:
        return (f"SpanLayout(num_seqs={self.num_seqs}, num_queries={self.num_queries} "
                f"({self.num_real_queries} real), kv_lens={self.kv_lens}, device={self.device})")


class StaticSpanLayout(SpanLayout):
    """A :class:`SpanLayout` with fixed device buffers for one *bucket*, refilled in place every step, so that
    :func:`pd_kernels.span_attention` (and the model forward around it) can be captured in a CUDA graph once
    per bucket and replayed for every step that fits it.

    A bucket is (``max_queries`` packed query rows, ``max_seqs`` sequences, ``max_segments`` segments,
    ``max_kv`` keys per sequence). Every shape and launch parameter depends on the bucket only:

    * ``num_queries == max_queries`` (rows past the step's queries are padding: ``q_seq = -1``, ``q_pos = 0``,
      no keys, output 0), ``num_seqs == max_seqs`` (sequences past the step's are empty: no queries,
      ``kv_lens`` 0; the block table keeps ``max_seqs`` rows, their content is never read);
    * the tiling plan (:attr:`plan`) is the module's rule for ``group``, exactly as for a dynamic layout (so
      a request's output is bitwise the same in either); its unit and merge tables have capacities fixed
      here, and the kernels read the step's counts from their header rows:

      - narrow tiles <= ``min(max_segments, max_queries) + 1`` (the ``+ 1``: the padding segment), each with
        at most ``min(MAX_SPLITS, ceil((ceil(max_kv / 64) + 1) / 4))`` units (``MAX_SPLITS`` without
        ``max_kv``);
      - wide tiles <= ``max_queries // T_w + min(max_segments, max_queries // (T_n + 1)) + 1``.

    Device memory: one int32 buffer holding the unit / merge tables and ``q_pos``, ``q_seq``, ``q_kv`` (views
    that never move: their ``data_ptr`` is the same after every :meth:`update`), plus the split-K workspace
    (:meth:`AttentionPlan.workspace`: ``slots x Hkv x T_n G x (D + 2)`` fp32, slots = the narrow unit
    capacity), allocated on the first :func:`span_attention` call per ``(Hkv, D)`` (do that eager warm-up
    call before capturing) and reused after.

    :meth:`update` (and :meth:`copy_from`) compute the step's arrays on the host and write them into a pinned
    staging buffer, then issue **one** non-blocking host-to-device copy on the current stream: no host sync,
    no device allocation. Two staging buffers alternate; before one is overwritten the host waits for the copy
    that read it (issued two updates earlier, normally long finished). Replay the graph on the stream that ran
    :meth:`update` (stream order makes the copy land after the previous replay and before the next).

    Args:
        max_queries: packed query rows of the bucket (``N``, >= 1).
        max_seqs: sequences of the bucket (``B``, >= 1): rows of the block table passed with this layout.
        device: where the buffers live.
        group: ``Hq // Hkv`` of the model (GQA group size); :func:`span_attention` checks it.
        max_segments: most segments of a step (a causal chunk or a PD-DA round is one segment per
            sequence, each active PD span is one); default ``max_queries`` (always enough; a tighter value
            gives smaller tables and workspace).
        max_kv: most keys a sequence of a step may see (e.g. the cache's capacity per sequence); bounds the
            split units, hence the workspace. Default: no bound (``MAX_SPLITS`` units per narrow tile). Kept as
            ``bucket_max_kv`` (``max_kv`` is the step's largest key count, as for any layout).

    Raises ``ValueError`` from :meth:`update` when a step does not fit the bucket.
    """

    def __init__(self, max_queries: int, max_seqs: int, device, *, group: int = 1, max_segments: int | None = None,
                 max_kv: int | None = None):
        N, B, G = (_as_int(max_queries, "max_queries"), _as_int(max_seqs, "max_seqs"), _as_int(group, "group"))
        if N < 1 or B < 1 or G < 1:
            raise ValueError(f"StaticSpanLayout needs max_queries, max_seqs, group >= 1, got ({N}, {B}, {G})")
        S = N if max_segments is None else _as_int(max_segments, "max_segments")
        if S < 1:
            raise ValueError(f"StaticSpanLayout: max_segments must be >= 1, got {S}")
        S = min(S, N)  # a segment has at least one query row
        if max_kv is not None:
            max_kv = _as_int(max_kv, "max_kv")
            if max_kv < 1:
                raise ValueError(f"StaticSpanLayout: max_kv must be >= 1, got {max_kv}")
        geo = tile_geometry(G)
        Tn, Tw = geo.narrow_tokens, geo.wide_tokens
        splits = MAX_SPLITS if max_kv is None else int(min(MAX_SPLITS, _cdiv(_cdiv(max_kv, SPLIT_BLOCK_N) + 1,
                                                                                SPLIT_CHUNK_BLOCKS)))
        narrow_tiles = S + 1
        cap_n = narrow_tiles * splits
        cap_w = N // Tw + min(S, N // (Tn + 1)) + 1
        cap_m = narrow_tiles if splits > 1 else 0
        device = _norm_device(device)
        self.max_queries, self.max_seqs, self.max_segments, self.group, self.bucket_max_kv = N, B, S, G, max_kv
        self.geometry = geo
        self.device = device
        self._caps = (cap_n, cap_w, cap_m)
        psize = _plan_size(*self._caps)
        size = psize + 5 * N
        # plan tables first (unit rows 16-byte aligned), then q_pos, q_seq, q_kv: views that never move
        self._buf = torch.zeros(size, dtype=torch.int32, device=device)
        self._plan_size = psize
        qv = self._buf[psize:].view(5, N)
        self.q_pos, self.q_seq, self.q_kv = qv[0], qv[1], qv[2:5].t()
        self.plan_fixed = AttentionPlan._make(geo, self._buf[:psize], self._caps, device,
                                              (cap_n, cap_w, cap_m, cap_n if splits > 1 else 0))
        # host description in fixed CPU buffers too (the registered op's inputs stay the same tensors)
        self.segs_host = torch.zeros((S + 1, 8), dtype=torch.int64)
        self.segs_host._pd_plans = {G: self.plan_fixed}
        self.segs_host._pd_fixed = True
        self.kv_host = torch.zeros(B, dtype=torch.int64)
        if device.type == "cuda":
            self._staging = [torch.zeros(size, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event(), torch.cuda.Event()]
        else:
            self._staging = [torch.zeros(size, dtype=torch.int32)]
            self._events = [None]
        self._recorded = [False] * len(self._staging)
        self._slot = 0
        self.num_queries = N
        self.update(())

    # ---- refill ----------------------------------------------------------------------------------
    def update(self, seqs) -> "StaticSpanLayout":
        """Refill the buffers in place with the layout of ``seqs`` (entry ``b`` = row ``b`` of the block
        table; at most ``max_seqs`` entries, ``max_queries`` queries, ``max_segments`` segments and
        ``max_kv`` keys per sequence). One non-blocking host-to-device copy; must not run while a CUDA graph
        is being captured. Returns self."""
        who = "StaticSpanLayout.update"
        seqs = _check_seqs(seqs, who)
        N, B, S = self.max_queries, self.max_seqs, self.max_segments
        if len(seqs) > B:
            raise ValueError(f"{who}: {len(seqs)} sequences do not fit the bucket (max_seqs={B})")
        nq = sum(s.num_queries for s in seqs)
        if nq > N:
            raise ValueError(f"{who}: {nq} queries do not fit the bucket (max_queries={N})")
        host, segs, kv_lens, real = _pack(seqs, N, who)
        nseg = len(segs) - (real < N)
        if nseg > S:
            raise ValueError(f"{who}: {nseg} segments do not fit the bucket (max_segments={S}); each active PD "
                             f"span is one segment, a causal chunk or a PD-DA round one per sequence")
        mk = self.bucket_max_kv
        if mk is not None and max(kv_lens, default=0) > mk:
            bad = [(b, n) for b, n in enumerate(kv_lens) if n > mk]
            raise ValueError(f"{who}: (sequence, keys) {bad[:4]} exceed the bucket's max_kv={mk}")
        un, uw, mg, slots = _plan_arrays(segs, self.geometry)
        # guaranteed by the capacities computed in __init__
        assert len(un) <= self._caps[0] and len(uw) <= self._caps[1] and len(mg) <= self._caps[2], \
            (len(un), len(uw), len(mg), self._caps)
        slot = self._slot
        st, ev = self._staging[slot], self._events[slot]
        if ev is not None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{who} must run outside CUDA graph capture (update, then replay)")
            if self._recorded[slot]:
                ev.synchronize()   # the copy that last read this staging buffer (two updates ago)
        a = st.numpy()
        _write_plan(a[:self._plan_size], self._caps, un, uw, mg)
        a[self._plan_size:] = host.reshape(-1)
        self._buf.copy_(st, non_blocking=ev is not None)
        if ev is not None:
            ev.record()
            self._recorded[slot] = True
            self._slot = (slot + 1) % len(self._staging)
        self.seqs = seqs
        self.num_real_queries = real
        self._set_host(segs, kv_lens + [0] * (B - len(seqs)))
        p = self.plan_fixed
        p.num_units, p.num_merge, p.num_slots = (len(un), len(uw)), len(mg), slots
        return self

    def _set_host(self, segs: np.ndarray, kv_lens: list[int]) -> None:
        # refill the fixed host buffers in place (rows past the step's segments: empty segments)
        self._segs = segs
        self.kv_lens = kv_lens
        self.max_kv = max(kv_lens, default=0)
        sh = self.segs_host.numpy()
        sh[:len(segs)] = segs
        sh[len(segs):] = 0
        self.kv_host.numpy()[:] = kv_lens

    def copy_from(self, layout: SpanLayout) -> "StaticSpanLayout":
        """:meth:`update` with the sequences of a dynamic layout (its padding is ignored). Returns self."""
        if not isinstance(layout, SpanLayout):
            raise TypeError(f"copy_from needs a SpanLayout, got {type(layout).__name__}")
        return self.update(layout.seqs)

    def plan(self, group: int) -> AttentionPlan:
        """The fixed plan of the bucket (only for this layout's ``group``)."""
        if group != self.group:
            raise ValueError(f"StaticSpanLayout was built for group={self.group} query heads per KV head, not {group}")
        return self.plan_fixed

    def __repr__(self) -> str:
        p = self.plan_fixed
        return (f"StaticSpanLayout(max_queries={self.max_queries}, max_seqs={self.max_seqs}, "
                f"max_segments={self.max_segments}, max_kv={self.bucket_max_kv}, group={self.group}, "
                f"unit capacity {self._caps[0]} narrow + {self._caps[1]} wide; step: {len(self.seqs)} seqs, "
                f"{self.num_real_queries} queries, {p.num_units} units, device={self.device})")
