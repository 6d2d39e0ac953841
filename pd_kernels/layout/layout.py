"""The packed layout of one step (:class:`SpanLayout`): the queries of every sequence in one batch-1 sequence,
what each sees, the host description the registered op receives, and the layout's tiling plans."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .plan import (TILE_COLS, AttentionPlan, LayoutPlans, _norm_device, _segment_tiles, _to_device,
                   register_plans)
from .queries import SeqQueries, _as_int


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
    _plans: LayoutPlans = field(default=None, repr=False)   # its tiling plans by G (found from segs_host too)

    def __post_init__(self):
        self._set_host(self._segs, self.kv_lens)
        self._plans = LayoutPlans(self._segs, self.device)
        register_plans(self.segs_host, self._plans)

    def _set_host(self, segs: np.ndarray, kv_lens: list[int]) -> None:
        self._segs = segs
        self.segs_host = torch.from_numpy(segs)
        self.kv_lens = kv_lens
        self.kv_host = torch.from_numpy(np.asarray(kv_lens, dtype=np.int64).reshape(-1))
        self.max_kv = max(kv_lens, default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.kv_lens)

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
        return self._plans.get(group)

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

