"""One description of a decoder step, consumed by both the dynamic and the static (CUDA-graph) step.

A step forwards the packed queries of every running request as one batch-1 sequence. :class:`StepPart` is one
request's part of it (built by the scheduler from the request's phase, and kept while the request's state does
not change); :func:`describe` concatenates the parts into a :class:`StepDesc`:

* packed queries: ``in_idx`` (flat token-buffer index of each query), ``slots`` (its cache slot), and the
  layout entries (``cache_rows[i]`` = cache row, ``seqs[i]`` = :class:`~pd_kernels.SeqQueries`), requests in
  ascending cache row;
* LM-head rows: ``rows`` (the packed query whose hidden state predicts the row's token: Dream shift),
  ``dst`` (flat token-buffer index the token goes to), **span rows first, then AR rows**; the rows of one span
  are contiguous and ``span_rows[sid] = (first row, count)`` (``count = 0`` for spans not in the step); AR rows
  have ``forced`` / ``val`` (a forced plan token);
* per-row RNG keys: ``seed[k]`` = the request's seed, ``offset[k] = (request step counter << 32) | position``
  of the predicted token: the noise of a row depends on its request, its request's own step count and the
  absolute position only, never on the batch, the packed row or the global step.

Both forms reach the device as a :class:`StepIO` (index tensors, and the buffers the step writes), which the one
device step reads (:meth:`~pd_kernels.decoder.runner.ModelRunner.device_step`). The dynamic step uploads exactly
these arrays; the static step pads them into the fixed buffers of a bucket
(:meth:`~pd_kernels.decoder.graphs.Bucket.fill`): padding queries read a scratch token (``PAD``) and write no
K/V, padding LM-head rows and the unused destination of real rows (a span row has no AR destination, an AR row
no commit destination) point at distinct scratch elements. While no request changes state (a diffusion step in
which no span finishes), the description is reused as is: only the RNG offsets advance (:meth:`StepDesc.tick`),
and the static step skips repacking and the layout update.

:func:`choose_tokens` is the one call of :func:`~pd_kernels.token_confidence` and :func:`write_ar` the AR token
write, both inside the one device step (:meth:`~pd_kernels.decoder.runner.ModelRunner.device_step`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ops import token_confidence


@dataclass
class StepPart:
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
    cache_rows: list
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
    """The :class:`StepDesc` of ``entries`` = ``[(request, part)]`` in ascending cache row (``request.seq``);
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

    return StepDesc(reqs=[r for r, _ in entries], cache_rows=[r.seq for r, _ in entries],
                    seqs=[p.sq for _, p in entries], in_idx=cat(in_idx), slots=cat(slots), rows=cat(s_rows, a_rows),
                    dst=cat(s_dst, a_dst), seed=cat(s_seed, a_seed), offset=cat(s_off, a_off),
                    forced=np.asarray(forced, np.int64), val=np.asarray(val, np.int64), span_rows=span_rows,
                    span_ids=np.asarray(span_ids, np.int64), ar_reqs=ar_reqs, ns=row, na=len(ar_reqs), gen=gen)


@dataclass(eq=False)
class StepIO:
    """The device form of a step: what the device step reads and where it writes (shapes: ``Q`` packed queries,
    ``R`` LM-head rows, ``S`` span ids). The dynamic step makes one per step of exactly the description's size;
    a bucket holds one over its fixed, padded buffers.

    ``in_idx`` / ``slots`` ``[Q]``: flat token-buffer index and cache slot (-1: no K/V) of each query;
    ``rows`` ``[R]``: the packed query each LM-head row reads; ``dst`` ``[R]``: where each row's token is read
    back from after the step; ``seed`` / ``offset`` ``[R]``: RNG keys. ``span`` and ``ar`` select the LM-head
    rows that :func:`~pd_kernels.commit_spans` and the AR write see (dynamic: the span rows and the AR rows;
    a bucket: all ``R``, every row carrying a commit and an AR destination, the unused one a scratch element):
    ``s_dst`` (commit destinations), ``ar_dst`` / ``forced`` / ``val`` (AR write). ``span_rows`` int64
    ``[S, 2]`` (first row, count) per span id, refilled on the device into ``span_rows32`` (what
    ``commit_spans`` takes). ``read`` ``[R + S]``: every row's token after the step (an AR row without a
    token: -1), then every span's ``masks_left``. ``tok_conf`` / ``commit_out``: ``out=`` buffers (None:
    allocated)."""
    layout: object
    block_table: torch.Tensor
    in_idx: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor
    dst: torch.Tensor
    seed: torch.Tensor
    offset: torch.Tensor
    span: slice
    s_dst: torch.Tensor
    ar: slice
    ar_dst: torch.Tensor
    forced: torch.Tensor
    val: torch.Tensor
    span_rows: torch.Tensor
    span_rows32: torch.Tensor
    read: torch.Tensor
    tok_conf: tuple | None = None
    commit_out: tuple | None = None


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


def choose_tokens_vocab_parallel(local_logits, cfg, seed: torch.Tensor, offset: torch.Tensor, suppress, out, tp):
    """:func:`choose_tokens` on this rank's vocabulary slice of the logits (a tensor-parallel model's
    vocabulary-sharded LM head, ``tp``: :class:`~pd_kernels.parallel.tp.TensorParallel`):
    :func:`~pd_kernels.parallel.token_confidence_vocab_parallel`, every rank getting the tokens
    :func:`choose_tokens` gives on the gathered logits. ``out``: written when given (the static step's buffers)."""
    from ..parallel import token_confidence_vocab_parallel

    tok, conf = token_confidence_vocab_parallel(local_logits, vocab_start=tp.vocab_start, vocab_size=tp.vocab_size,
                                                group=tp.group, confidence=cfg.confidence,
                                                temperature=cfg.temperature, seed=seed, offset=offset,
                                                suppress_ids=suppress, top_k=cfg.top_k, top_p=cfg.top_p)
    if out is None:
        return tok, conf
    out[0].copy_(tok)
    out[1].copy_(conf)
    return out


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
