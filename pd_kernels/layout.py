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


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host-to-device copy that does not block the host (pinned staging buffer) on CUDA."""
    if device.type != "cuda":
        return host.to(device)
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


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
    _segs: np.ndarray            # [S, 7] int64: seq, row0, n, pos0, a, b, c ... see build
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
        One host-to-device copy.
        """
        seqs = tuple(seqs)
        for i, s in enumerate(seqs):
            if not isinstance(s, SeqQueries):
                raise TypeError(f"SpanLayout.build: entry {i} is a {type(s).__name__}, expected SeqQueries")
        device = torch.device(device)
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
            pad_to = _as_int(pad_to, "pad_to")
            if pad_to < real:
                raise ValueError(f"SpanLayout.build: pad_to={pad_to} is smaller than the {real} queries")
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
        dev = _to_device(torch.from_numpy(host), device)
        seg_arr = np.asarray(segs, dtype=np.int64).reshape(-1, 8)
        return SpanLayout(seqs=seqs, device=device, num_queries=row, num_real_queries=real, kv_lens=kv_lens,
                          q_pos=dev[0], q_seq=dev[1], q_kv=dev[2:5].t(), _segs=seg_arr)

    # ---- kernel tiles ----------------------------------------------------------------------------
    def tiles_host(self, tokens_per_tile: int) -> np.ndarray:
        """Tile table ``[num_tiles, 8]`` int32 (columns ``TILE_*``) for tiles of at most
        ``tokens_per_tile`` query rows (host numpy; see :meth:`tiles`)."""
        T = int(tokens_per_tile)
        if T < 1:
            raise ValueError(f"tokens_per_tile must be >= 1, got {T}")
        sg = self._segs
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
