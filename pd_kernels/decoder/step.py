"""One description of a decoder step, consumed by both the dynamic and the static (CUDA-graph) step.

A step forwards the packed queries of every running request as one batch-1 sequence. :class:`Piece` is one
request's part of it (built by the loop from the request's phase, and kept while the request's state does not
change); :func:`describe` concatenates the pieces into a :class:`StepDesc`:

* packed queries: ``in_idx`` (flat token-buffer index of each query), ``slots`` (its cache slot), and the
  layout entries (``rows_of[i]`` = cache row, ``seqs[i]`` = :class:`~pd_kernels.SeqQueries`), requests in
  ascending cache row;
* LM-head rows: ``rows`` (the packed query whose hidden state predicts the row's token: Dream shift),
  ``dst`` (flat token-buffer index the token goes to), **span rows first, then AR rows**; the rows of one span
  are contiguous and ``span_rows[sid] = (first row, count)`` (``count = 0`` for spans not in the step); AR rows
  have ``forced`` / ``val`` (a forced plan token);
* per-row RNG keys: ``seed[k]`` = the request's seed, ``offset[k] = (request step counter << 32) | position``
  of the predicted token: the noise of a row depends on its request, its request's own step count and the
  absolute position only, never on the batch, the packed row or the global step.

The dynamic step uploads exactly these arrays; the static step pads them into the fixed buffers of a bucket
(:meth:`Bucket.fill`): padding queries read a scratch token (``PAD``) and write no K/V, padding LM-head rows and
the unused destination of real rows (a span row has no AR destination, an AR row no commit destination) point
at distinct scratch elements. While no request changes state (a diffusion step in which no span finishes), the
description is reused as is: only the RNG offsets advance (:meth:`StepDesc.tick`), and the static step skips
repacking and the layout update.

:func:`choose_tokens` is the one call of :func:`~pd_kernels.token_confidence` (both paths).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ops import token_confidence


@dataclass
class Piece:
    """One request's part of a step. ``in_idx`` / ``slots``: its packed queries (flat token-buffer index, cache
    slot); per span row, grouped by span (``s_sids[j]`` has ``s_cnts[j]`` rows): ``s_q`` (query index relative
    to the request's first query), ``s_dst`` (flat token-buffer index of the predicted mask), ``s_pos`` (its
    position); ``ar``: ``(query index, flat destination, predicted position, forced 0/1, forced token)`` or
    None."""
    sq: object
    in_idx: np.ndarray
    slots: np.ndarray
    s_q: np.ndarray
    s_dst: np.ndarray
    s_pos: np.ndarray
    s_sids: tuple
    s_cnts: tuple
    ar: tuple | None


@dataclass(eq=False)
class StepDesc:
    """What one step runs, host numpy arrays (int64); see the module docstring."""
    reqs: list
    rows_of: list
    seqs: list
    in_idx: np.ndarray
    slots: np.ndarray
    rows: np.ndarray
    dst: np.ndarray
    seed: np.ndarray
    offset: np.ndarray
    forced: np.ndarray
    val: np.ndarray
    span_rows: np.ndarray
    span_ids: np.ndarray
    ar_reqs: list
    ns: int
    na: int
    gen: int = 0

    @property
    def nq(self) -> int:
        return len(self.in_idx)

    @property
    def nr(self) -> int:
        return self.ns + self.na

    def tick(self) -> None:
        """Reuse for the next step: every request of the step has taken one more step."""
        self.offset += 1 << 32


def describe(entries, num_spans: int, gen: int) -> StepDesc:
    """The :class:`StepDesc` of ``entries`` = ``[(request, piece)]`` in ascending cache row (``request.seq``);
    ``request.steps`` (steps taken so far) and ``request.seed`` key the RNG."""
    in_idx, slots, s_rows, s_dst, s_seed, s_off = [], [], [], [], [], []
    a_rows, a_dst, a_seed, a_off, forced, val, ar_reqs = [], [], [], [], [], [], []
    span_rows = np.zeros((num_spans, 2), dtype=np.int64)
    span_ids = []
    q0 = row = 0
    for r, p in entries:
        key = r.steps << 32
        in_idx.append(p.in_idx)
        slots.append(p.slots)
        if p.s_sids:
            s_rows.append(p.s_q + q0)
            s_dst.append(p.s_dst)
            s_seed.append(np.full(len(p.s_q), r.seed, dtype=np.int64) if r.seed else np.zeros_like(p.s_q))
            s_off.append(p.s_pos + key)
            for sid, n in zip(p.s_sids, p.s_cnts):
                span_rows[sid] = (row, n)
                row += n
            span_ids.extend(p.s_sids)
        if p.ar is not None:
            q, dst, pos, f, v = p.ar
            a_rows.append(q0 + q)
            a_dst.append(dst)
            a_seed.append(r.seed)
            a_off.append(key + pos)
            forced.append(f)
            val.append(v)
            ar_reqs.append(r)
        q0 += len(p.in_idx)

    def cat(parts, tail=()):
        return np.concatenate(parts + [np.asarray(tail, dtype=np.int64)]) if parts else np.asarray(tail, np.int64)

    return StepDesc(reqs=[r for r, _ in entries], rows_of=[r.seq for r, _ in entries],
                    seqs=[p.sq for _, p in entries], in_idx=cat(in_idx), slots=cat(slots), rows=cat(s_rows, a_rows),
                    dst=cat(s_dst, a_dst), seed=cat(s_seed, a_seed), offset=cat(s_off, a_off),
                    forced=np.asarray(forced, np.int64), val=np.asarray(val, np.int64), span_rows=span_rows,
                    span_ids=np.asarray(span_ids, np.int64), ar_reqs=ar_reqs, ns=row, na=len(ar_reqs), gen=gen)


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

    def __init__(self, Q: int, R: int, S: int, layout, device):
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


# ---- the one token_confidence call of a step ---------------------------------------------------------------
def choose_tokens(logits, cfg, seed: torch.Tensor, offset: torch.Tensor, suppress, out, backend):
    """Token and confidence of every LM-head row: :func:`~pd_kernels.token_confidence` with the config's
    confidence, temperature, top-p and top-k (applied at temperature 0 too, as the PD reference does), and the
    per-row RNG keys ``seed`` / ``offset`` (int64 device tensors, one entry per row: the noise of a row is a
    hash of its own keys and the column, never of its packed row). A row with no usable id (every id
    suppressed or filtered) gets token -1: ``commit_spans`` never commits it, the AR write replaces it
    (:func:`write_ar`)."""
    return token_confidence(logits, confidence=cfg.confidence, temperature=cfg.temperature, seed=seed,
                            offset=offset, top_k=cfg.top_k, top_p=cfg.top_p, suppress_ids=suppress, out=out,
                            backend=backend)


def write_ar(tokens_flat: torch.Tensor, dst: torch.Tensor, forced: torch.Tensor, val: torch.Tensor,
             tok: torch.Tensor, pad: int) -> torch.Tensor:
    """The AR token write: each AR row's forced token (``forced`` 1: ``val``) or chosen one (``tok``) goes to its
    destination ``dst`` in ``tokens_flat``. A chosen -1 (the row had no usable id) is never written: the
    destination gets ``pad`` instead, so the sequence and the K/V path only ever see real ids. Returns the
    row values with the -1 kept: what the host must read for those rows (it ends the request, ``"no_token"``).
    Device-side only (no sync)."""
    v = torch.where(forced.bool(), val, tok)
    tokens_flat.index_copy_(0, dst, torch.where(v >= 0, v, pad))
    return v
