"""Query layouts for :func:`pd_kernels.span_attention` (SPEC section 4: who sees whom).

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

The kernel works on *tiles*: a few consecutive query rows of one *segment* (one PD span, all active
spans of a PD-DA round, or a causal chunk) of one sequence, which all share the same two key ranges (a
causal tile additionally masks each row at its own position). A tile never loads a key that none of its
rows can see. Tiles depend on how many tokens fit in the kernel's query block (``Hq / Hkv`` query heads
are stacked per token), so they are built on the first call per tile size and cached on the layout: the
28 layers of a step share one table.

Everything is computed on the host with numpy (microseconds to a millisecond) and reaches the device with
one non-blocking copy from pinned memory (no host sync on CUDA).

CUDA graphs: a :class:`SpanLayout` has fresh device tensors every step and a tile count (the kernel's grid)
that depends on the step. :class:`StaticSpanLayout` is the bucketed form: fixed-size device buffers for a
bucket (query rows, sequences, segments) that :meth:`StaticSpanLayout.update` refills in place (one
non-blocking copy from a pinned staging buffer), a tile table whose size depends on the bucket only (unused
rows are empty tiles that write nothing) and a query block / split count fixed per layout, so one captured
``span_attention`` launch replays correctly for every step of the bucket.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# columns of the per-tile table read by the Triton kernel
TILE_SEQ, TILE_ROW0, TILE_NROWS, TILE_A, TILE_B, TILE_C, TILE_CAUSAL = range(7)
TILE_COLS = 8  # one spare column keeps rows 32-byte aligned


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
            act = tuple(bool(x) for x in active)
            if len(act) != len(lens):
                raise ValueError(f"SeqQueries.spans: {len(act)} active flags for {len(lens)} spans")
        if mode not in ("pd", "pd-da"):
            raise ValueError(f"SeqQueries.spans: mode must be 'pd' or 'pd-da', got {mode!r}")
        return SeqQueries("spans", prefix=prefix, span_lens=lens, active=act, mode=mode)

    # (pos0, n, a, b, c, causal) for each segment; a causal segment's a/b/c are per tile
    def segments(self) -> list[tuple[int, int, int, int, int, int]]:
        if self.kind == "causal":
            return [(self.start, self.length, 0, 0, 0, 1)] if self.length else []
        starts = np.concatenate([[0], np.cumsum(self.span_lens, dtype=np.int64)]) + self.prefix
        segs = []
        if self.mode == "pd":
            for j, n in enumerate(self.span_lens):
                if self.active[j]:
                    s = int(starts[j])
                    segs.append((s, n, self.prefix, s, s + n, 0))
        else:  # pd-da: every active query sees the same keys; one segment (positions may have gaps)
            end = int(starts[-1])
            for j, n in enumerate(self.span_lens):
                if self.active[j]:
                    segs.append((int(starts[j]), n, end, end, end, 0))
            if segs:
                segs = [(segs[0][0], sum(s[1] for s in segs), end, end, end, 0)]
        return segs

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
    segment (empty key ranges: its rows output 0) is appended when ``pad_to`` adds rows.
    """
    pos_parts, seq_parts, kv_parts, segs, kv_lens = [], [], [], [], []
    row = 0
    for b, s in enumerate(seqs):
        pos = s.positions()
        n = len(pos)
        kv = np.zeros((n, 3), dtype=np.int64)
        max_key = 0
        r = 0
        for pos0, m, a, bb, c, causal in s.segments():
            if causal:
                kv[r:r + m, 0] = pos[r:r + m] + 1
                max_key = max(max_key, pos0 + m)
                segs.append((b, row + r, m, pos0, 0, 0, 0, 1))
            else:
                kv[r:r + m] = (a, bb, c)
                max_key = max(max_key, a, c)
                segs.append((b, row + r, m, pos0, a, bb, c, 0))
            r += m
        assert r == n
        pos_parts.append(pos)
        seq_parts.append(np.full(n, b, dtype=np.int64))
        kv_parts.append(kv)
        kv_lens.append(max_key)
        row += n
    real = row
    if pad_to is not None:
        if pad_to < real:
            raise ValueError(f"{who}: pad_to={pad_to} is smaller than the {real} queries")
        if pad_to > real:
            npad = pad_to - real
            pos_parts.append(np.zeros(npad, dtype=np.int64))
            seq_parts.append(np.full(npad, -1, dtype=np.int64))
            kv_parts.append(np.zeros((npad, 3), dtype=np.int64))
            segs.append((0, real, npad, 0, 0, 0, 0, 0))  # empty key ranges: rows output 0
            row = pad_to
    if max(kv_lens, default=0) >= 2**31 - 1 or row >= 2**31 - 1:
        raise ValueError("SpanLayout: positions must fit in int32")
    # one buffer, one copy; fields are rows so q_pos / q_seq are contiguous views (the kernel reads q_pos)
    host = np.zeros((5, row), dtype=np.int32)
    if row:
        host[0] = np.concatenate(pos_parts)
        host[1] = np.concatenate(seq_parts)
        host[2:5] = np.concatenate(kv_parts).T
    return host, np.asarray(segs, dtype=np.int64).reshape(-1, 8), kv_lens, real


def _tiles_of(sg: np.ndarray, T: int) -> np.ndarray:
    """Tile table int32 ``[num_tiles, TILE_COLS]`` of segments ``sg`` for tiles of at most ``T`` rows."""
    if len(sg) == 0:
        return np.zeros((0, TILE_COLS), dtype=np.int32)
    n = sg[:, 2]
    per = -(-n // T)
    idx = np.repeat(np.arange(len(sg)), per)
    first = np.repeat(np.cumsum(per) - per, per)
    k = np.arange(len(idx)) - first                  # tile index inside its segment
    s = sg[idx]
    out = np.zeros((len(idx), TILE_COLS), dtype=np.int64)
    out[:, TILE_SEQ] = s[:, 0]
    out[:, TILE_ROW0] = s[:, 1] + k * T
    out[:, TILE_NROWS] = np.minimum(T, s[:, 2] - k * T)
    causal = s[:, 7] == 1
    # a causal tile of positions p0..p1: every row sees [0, p0); row at p sees [p0, p] of [p0, p1 + 1)
    p0 = s[:, 3] + k * T
    p1 = p0 + out[:, TILE_NROWS] - 1
    out[:, TILE_A] = np.where(causal, p0, s[:, 4])
    out[:, TILE_B] = np.where(causal, p0, s[:, 5])
    out[:, TILE_C] = np.where(causal, p1 + 1, s[:, 6])
    out[:, TILE_CAUSAL] = causal
    return out.astype(np.int32)


@dataclass(eq=False)
class SpanLayout:
    """Packed queries of a batch of sequences and what each one sees. Build with :meth:`build`.

    Device tensors (int32, on ``device``):
        q_pos ``[Tq]``: position of each query in its sequence (padding: 0); RoPE and slot mappings use it.
        q_seq ``[Tq]``: sequence index ``b`` (row of the block table) of each query (padding: -1).
        q_kv ``[Tq, 3]``: ``(a, b, c)``: the query sees keys ``[0, a) U [b, c)`` of its sequence (a view with
        strides ``(1, Tq)``).
    Host values: ``num_queries`` (padding included), ``num_seqs``, ``kv_lens`` (keys sequence ``b`` must hold
    in the cache: its largest visible key + 1, 0 without queries), ``seqs`` (the :class:`SeqQueries`).
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
    _tiles: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def max_kv(self) -> int:
        return max(self.kv_lens, default=0)

    @property
    def max_segment(self) -> int:
        """Most query rows in one segment (the kernel picks its query block from it)."""
        return int(self._segs[:, 2].max()) if len(self._segs) else 0

    @staticmethod
    def build(seqs, device, pad_to: int | None = None) -> "SpanLayout":
        """Pack the queries of ``seqs`` (entry ``b`` = row ``b`` of the block table) in sequence order.

        ``pad_to``: pad the query count to this fixed size (CUDA graphs); padded rows output 0.
        One host-to-device copy. For a captured CUDA graph use :class:`StaticSpanLayout` (fixed buffers,
        fixed tile count, refilled in place).
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

    # ---- kernel tiles ----------------------------------------------------------------------------
    def tiles_host(self, tokens_per_tile: int) -> np.ndarray:
        """Tile table ``[num_tiles, 8]`` int32 (columns ``TILE_*``) for tiles of at most
        ``tokens_per_tile`` query rows (host numpy; see :meth:`tiles`)."""
        T = int(tokens_per_tile)
        if T < 1:
            raise ValueError(f"tokens_per_tile must be >= 1, got {T}")
        return _tiles_of(self._segs, T)

    def tiles(self, tokens_per_tile: int) -> torch.Tensor:
        """Device tile table for tiles of at most ``tokens_per_tile`` query rows: built on first use for
        that size (host numpy + one non-blocking host-to-device copy) and cached on the layout."""
        t = self._tiles.get(tokens_per_tile)
        if t is None:
            t = _to_device(torch.from_numpy(self.tiles_host(tokens_per_tile)), self.device)
            self._tiles[tokens_per_tile] = t
        return t

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

    A bucket is (``max_queries`` packed query rows, ``max_seqs`` sequences, ``max_segments`` segments). Every
    shape and launch parameter depends on the bucket only:

    * ``num_queries == max_queries`` (rows past the step's queries are padding: ``q_seq = -1``, ``q_pos = 0``,
      no keys, output 0), ``num_seqs == max_seqs`` (sequences past the step's are empty: no queries,
      ``kv_lens`` 0; the block table keeps ``max_seqs`` rows, their content is never read);
    * the kernel's query block ``block_m`` (so ``tokens_per_tile = block_m // group``) and ``num_splits`` are
      fixed here, not chosen from the step's data;
    * the tile table has ``max_tiles = min(max_queries, max_queries // tokens_per_tile + max_segments + 1)``
      rows (enough for any step of the bucket: tiles <= floor(rows / T) + segments, the ``+ 1`` is the
      padding segment); rows past the step's tiles are *empty tiles* (0 query rows, empty key ranges): their
      programs load nothing and write nothing.

    Device memory: one int32 buffer ``[max_tiles * 8 + 5 * max_queries]`` holding the tile table and
    ``q_pos``, ``q_seq``, ``q_kv`` (views that never move: their ``data_ptr`` is the same after every
    :meth:`update`), plus, with ``num_splits > 1``, the split-K workspace (fp32 ``[splits, Tq, Hq, D]`` and
    ``[splits, Tq, Hq, 2]``), allocated on the first :func:`span_attention` call per head count / head dim
    (do that eager warm-up call before capturing) and reused after.

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
            gives a smaller grid).
        block_m: the kernel's query block (power of two, >= 16, >= ``group``); default: the dynamic rule
            (``choose_block_m``) for ``ceil(max_queries / max_seqs)`` rows per segment.
        num_splits: split-K factor of every call (1..16); pick > 1 for decode-like buckets (few tiles, long
            key ranges) on a GPU.

    Raises ``ValueError`` from :meth:`update` when a step does not fit the bucket.
    """

    def __init__(self, max_queries: int, max_seqs: int, device, *, group: int = 1, max_segments: int | None = None,
                 block_m: int | None = None, num_splits: int = 1):
        from .ops.triton.span_attention import MAX_SPLITS, choose_block_m

        N, B, G = (_as_int(max_queries, "max_queries"), _as_int(max_seqs, "max_seqs"), _as_int(group, "group"))
        if N < 1 or B < 1 or G < 1:
            raise ValueError(f"StaticSpanLayout needs max_queries, max_seqs, group >= 1, got ({N}, {B}, {G})")
        S = N if max_segments is None else _as_int(max_segments, "max_segments")
        if S < 1:
            raise ValueError(f"StaticSpanLayout: max_segments must be >= 1, got {S}")
        S = min(S, N)  # a segment has at least one query row
        bm = choose_block_m(-(-N // B), G) if block_m is None else _as_int(block_m, "block_m")
        if bm < 16 or bm & (bm - 1) or bm < G:
            raise ValueError(f"StaticSpanLayout: block_m must be a power of two >= 16 and >= group ({G}), got {bm}")
        splits = _as_int(num_splits, "num_splits")
        if not 1 <= splits <= MAX_SPLITS:
            raise ValueError(f"StaticSpanLayout: num_splits must be in [1, {MAX_SPLITS}], got {splits}")
        T = bm // G
        device = _norm_device(device)
        self.max_queries, self.max_seqs, self.max_segments, self.group = N, B, S, G
        self.block_m, self.num_splits, self.tokens_per_tile = bm, splits, T
        self.max_tiles = min(N, N // T + S + 1)
        self.device = device
        size = self.max_tiles * TILE_COLS + 5 * N
        # tile table first (32-byte aligned rows), then q_pos, q_seq, q_kv: views that never move
        self._buf = torch.zeros(size, dtype=torch.int32, device=device)
        self._tile_buf = self._buf[:self.max_tiles * TILE_COLS].view(self.max_tiles, TILE_COLS)
        qv = self._buf[self.max_tiles * TILE_COLS:].view(5, N)
        self.q_pos, self.q_seq, self.q_kv = qv[0], qv[1], qv[2:5].t()
        if device.type == "cuda":
            self._staging = [torch.zeros(size, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event(), torch.cuda.Event()]
        else:
            self._staging = [torch.zeros(size, dtype=torch.int32)]
            self._events = [None]
        self._recorded = [False] * len(self._staging)
        self._slot = 0
        self._workspace: dict = {}
        self._tiles = {}
        self.num_queries = N
        self.update(())

    # ---- refill ----------------------------------------------------------------------------------
    def update(self, seqs) -> "StaticSpanLayout":
        """Refill the buffers in place with the layout of ``seqs`` (entry ``b`` = row ``b`` of the block
        table; at most ``max_seqs`` entries, at most ``max_queries`` queries and ``max_segments`` segments).
        One non-blocking host-to-device copy; must not run while a CUDA graph is being captured. Returns self."""
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
        tiles = _tiles_of(segs, self.tokens_per_tile)
        assert len(tiles) <= self.max_tiles, (len(tiles), self.max_tiles)   # guaranteed by the bound above
        slot = self._slot
        st, ev = self._staging[slot], self._events[slot]
        if ev is not None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{who} must run outside CUDA graph capture (update, then replay)")
            if self._recorded[slot]:
                ev.synchronize()   # the copy that last read this staging buffer (two updates ago)
        a = st.numpy()
        nt = tiles.size
        a[:nt] = tiles.reshape(-1)
        a[nt:self.max_tiles * TILE_COLS] = 0          # empty tiles: 0 rows, empty key ranges
        a[self.max_tiles * TILE_COLS:] = host.reshape(-1)
        self._buf.copy_(st, non_blocking=ev is not None)
        if ev is not None:
            ev.record()
            self._recorded[slot] = True
            self._slot = (slot + 1) % len(self._staging)
        self.seqs = seqs
        self.kv_lens = kv_lens + [0] * (B - len(seqs))
        self.num_real_queries = real
        self._segs = segs
        self.num_tiles = len(tiles)
        return self

    def copy_from(self, layout: SpanLayout) -> "StaticSpanLayout":
        """:meth:`update` with the sequences of a dynamic layout (its padding is ignored). Returns self."""
        if not isinstance(layout, SpanLayout):
            raise TypeError(f"copy_from needs a SpanLayout, got {type(layout).__name__}")
        return self.update(layout.seqs)

    # ---- what span_attention reads ---------------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return self.max_seqs

    def tiles(self, tokens_per_tile: int) -> torch.Tensor:
        """The fixed tile table ``[max_tiles, 8]`` (only for this layout's ``tokens_per_tile``)."""
        if tokens_per_tile != self.tokens_per_tile:
            raise ValueError(f"StaticSpanLayout has tiles of {self.tokens_per_tile} tokens (block_m={self.block_m}, "
                             f"group={self.group}), not {tokens_per_tile}")
        return self._tile_buf

    def split_workspace(self, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``([num_splits, Tq, Hq, D], [num_splits, Tq, Hq, 2])`` split-K partials, allocated once per
        ``(Hq, D)`` and reused by every call (layers run one after another on one stream)."""
        key = (int(num_heads), int(head_dim))
        ws = self._workspace.get(key)
        if ws is None:
            shape = (self.num_splits, self.max_queries, key[0])
            ws = (torch.empty(shape + (key[1],), dtype=torch.float32, device=self.device),
                  torch.empty(shape + (2,), dtype=torch.float32, device=self.device))
            self._workspace[key] = ws
        return ws

    def __repr__(self) -> str:
        return (f"StaticSpanLayout(max_queries={self.max_queries}, max_seqs={self.max_seqs}, "
                f"max_segments={self.max_segments}, block_m={self.block_m}, group={self.group}, "
                f"num_splits={self.num_splits}, max_tiles={self.max_tiles}; step: {len(self.seqs)} seqs, "
                f"{self.num_real_queries} queries, {self.num_tiles} tiles, device={self.device})")
