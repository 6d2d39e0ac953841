"""The bucketed layout of CUDA graphs (:class:`StaticSpanLayout`): fixed buffers refilled in place every step."""
from __future__ import annotations

import numpy as np
import torch

from .._checks import cdiv
from .layout import SpanLayout, _check_seqs, _pack
from .plan import (MAX_SPLITS, SPLIT_BLOCK_N, SPLIT_CHUNK_BLOCKS, AttentionPlan, LayoutPlans, _norm_device,
                   _plan_arrays, _plan_size, _write_plan, register_plans, tile_geometry)
from .queries import _as_int


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
        splits = MAX_SPLITS if max_kv is None else int(min(MAX_SPLITS, cdiv(cdiv(max_kv, SPLIT_BLOCK_N) + 1,
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
        self._plans = LayoutPlans(None, device, fixed=self.plan_fixed)   # its one plan, for its group
        register_plans(self.segs_host, self._plans)
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

    def __repr__(self) -> str:
        p = self.plan_fixed
        return (f"StaticSpanLayout(max_queries={self.max_queries}, max_seqs={self.max_seqs}, "
                f"max_segments={self.max_segments}, max_kv={self.bucket_max_kv}, group={self.group}, "
                f"unit capacity {self._caps[0]} narrow + {self._caps[1]} wide; step: {len(self.seqs)} seqs, "
                f"{self.num_real_queries} queries, {p.num_units} units, device={self.device})")
