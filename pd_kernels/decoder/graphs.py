"""The static step's buckets and their CUDA graphs.

A :class:`Bucket` is the fixed form of a step of up to ``Q`` packed queries and ``R`` LM-head rows: index
buffers refilled by one host-to-device copy, a :class:`~pd_kernels.StaticSpanLayout`, output and read
buffers, and (``cuda_graphs=True``) the CUDA graph of the device step over those buffers. The
:class:`GraphManager` picks a step's bucket, runs the first step of a bucket eagerly (warm-up: Triton
compilation, cuBLAS handles, the attention's split-K workspace), captures the second (every graph in one
memory pool) and replays it from then on.
"""
from __future__ import annotations

import numpy as np
import torch

from .step import StepDesc, StepIO

DEFAULT_BUCKETS = tuple(16 << i for i in range(8))  # 16 .. 2048 packed queries (and LM-head rows)


class Bucket:
    """Fixed buffers of one static-step bucket: ``Q`` packed query rows, ``R`` LM-head rows, ``S`` spans; the
    :class:`~pd_kernels.StaticSpanLayout` of its attention (``layout``) and its CUDA graph once captured.

    ``idx`` (int64, device) holds every index of a step, refilled by one host-to-device copy from ``staging``
    (pinned on CUDA): ``in_idx [Q]``, ``slots [Q]``, then per LM-head row ``rows``, ``dst`` (the row's real
    destination, read back after the step), ``s_dst`` (commit destination), ``ar_dst`` (AR write destination),
    ``forced``, ``val``, ``seed``, ``offset`` (each ``[R]``), then ``span_rows [S, 2]`` (rows past the step's
    are in no span's range: :func:`~pd_kernels.commit_spans` never looks at them).
    Outputs: ``tok``, ``conf`` ``[R]``, ``read [R + S]`` (every row's token after the step, then every span's
    ``masks_left``: what the host reads)."""

    FIELDS = ("rows", "dst", "s_dst", "ar_dst", "forced", "val", "seed", "offset")

    def __init__(self, Q: int, R: int, S: int, layout, block_table: torch.Tensor, device: torch.device):
        self.Q, self.R, self.S = Q, R, S
        n = 2 * Q + len(self.FIELDS) * R + 2 * S
        self.idx = torch.zeros(n, dtype=torch.int64, device=device)
        self.staging = torch.zeros(n, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.host = self.staging.numpy()

        def views(buf):
            v = {"in_idx": buf[:Q], "slots": buf[Q:2 * Q]}
            for i, f in enumerate(self.FIELDS):
                v[f] = buf[2 * Q + i * R:2 * Q + (i + 1) * R]
            v["span_rows"] = buf[2 * Q + len(self.FIELDS) * R:].reshape(S, 2)
            return v

        self.h = views(self.host)
        for name, t in views(self.idx).items():
            setattr(self, name, t)
        self.span_rows32 = torch.zeros(S, 2, dtype=torch.int32, device=device)
        self.tok = torch.zeros(R, dtype=torch.int64, device=device)
        self.conf = torch.zeros(R, dtype=torch.float32, device=device)
        self.committed = torch.zeros(S, dtype=torch.int32, device=device)
        self.all_done = torch.zeros(1, dtype=torch.bool, device=device)
        self.read = torch.zeros(R + S, dtype=torch.int64, device=device)
        self.read_host = torch.zeros(R + S, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.layout = layout
        self.filled = None      # (id, gen) of the description last packed here
        self.calls = 0
        self.graph = None
        # the device step's view of these buffers: every row has a commit and an AR destination (see fill)
        self.io = StepIO(layout, block_table, self.in_idx, self.slots, self.rows, self.dst, self.seed, self.offset,
                         slice(0, R), self.s_dst, slice(0, R), self.ar_dst, self.forced, self.val, self.span_rows,
                         self.span_rows32, self.read, (self.tok, self.conf), (self.committed, self.all_done))

    def fill(self, desc: StepDesc, scratch: int, pad: int) -> bool:
        """Pad ``desc`` into the staging buffer. Returns True when the layout must be updated too (a new
        description; a reused one only rewrites the RNG offsets)."""
        h, Q, R = self.h, self.Q, self.R
        nq, nr, ns = desc.nq, desc.nr, desc.ns
        if self.filled == (id(desc), desc.gen):
            h["offset"][:nr] = desc.offset
            return False
        spare = np.arange(scratch, scratch + R, dtype=np.int64)  # row k's unused destination: scratch element k
        h["in_idx"][:nq], h["in_idx"][nq:] = desc.in_idx, scratch   # padding queries read PAD ...
        h["slots"][:nq], h["slots"][nq:] = desc.slots, -1            # ... and write no K/V
        h["rows"][:nr], h["rows"][nr:] = desc.rows, 0
        h["dst"][:] = spare
        h["dst"][:nr] = desc.dst
        h["s_dst"][:] = spare
        h["s_dst"][:ns] = desc.dst[:ns]
        h["ar_dst"][:] = spare
        h["ar_dst"][ns:nr] = desc.dst[ns:]
        h["forced"][:], h["val"][:] = 1, pad                         # non-AR rows write PAD into their spare
        h["forced"][ns:nr], h["val"][ns:nr] = desc.forced, desc.val
        h["seed"][:nr], h["seed"][nr:] = desc.seed, 0
        h["offset"][:nr], h["offset"][nr:] = desc.offset, 0
        h["span_rows"][:] = desc.span_rows
        self.filled = (id(desc), desc.gen)
        return True


class GraphManager:
    """The buckets of a Decoder (``sizes``: ascending, for both the packed query count and the LM-head row
    count), their CUDA graphs (``cuda_graphs``) and the counts of what ran (``counts``: ``captured`` graphs,
    ``replayed`` steps, ``static_eager`` steps; the runner adds ``dynamic`` steps)."""

    def __init__(self, sizes: tuple, cuda_graphs: bool, counts: dict):
        self.sizes, self.cuda_graphs, self.counts = sizes, cuda_graphs, counts
        self.buckets: dict = {}       # (Q, R) -> Bucket
        self._of: dict = {}           # (nq, nr) -> Bucket
        self._pool = None

    def fits(self, desc: StepDesc) -> bool:
        return desc.nq <= self.sizes[-1]

    def reset(self) -> None:
        """Drop every bucket (new buffers: their graphs point at the old ones)."""
        self.buckets, self._of = {}, {}

    def bucket(self, nq: int, nr: int, make) -> Bucket:
        """The bucket of a step of ``nq`` queries and ``nr`` LM-head rows: ``(Q, R)`` = the smallest sizes that
        hold ``nq`` and ``max(nr, 1)``, made by ``make(Q, R)`` on first use."""
        bk = self._of.get((nq, nr))
        if bk is None:
            Q = next(b for b in self.sizes if b >= nq)
            R = next(b for b in self.sizes if b >= max(nr, 1))  # nr <= nq: always found
            bk = self.buckets.get((Q, R))
            if bk is None:
                bk = self.buckets[(Q, R)] = make(Q, R)
            self._of[(nq, nr)] = bk
        return bk

    def run(self, bk: Bucket, body) -> None:
        """The device step ``body(bk)`` of a filled bucket: replayed from its graph, or run eagerly (a
        bucket's first step, every step without ``cuda_graphs``); the second step of a bucket captures it."""
        if self.cuda_graphs and bk.graph is None and bk.calls > 0:
            self._capture(bk, body)
        if bk.graph is not None:
            bk.graph.replay()
            self.counts["replayed"] += 1
        else:
            body(bk)
            self.counts["static_eager"] += 1
        bk.calls += 1

    def _capture(self, bk: Bucket, body) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            body(bk)
        bk.graph = graph
        self.counts["captured"] += 1
