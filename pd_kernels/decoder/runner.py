"""The device side of the decoder: the buffers of a call and the one device step.

:class:`ModelRunner` owns the device buffers of a ``generate`` / ``stream`` call (:class:`Buffers`: the paged KV
cache, the token buffer with its scratch area, the span state), kept across calls while their geometry is
unchanged (so captured CUDA graphs replay in the next call), and runs a step description
(:class:`~pd_kernels.decoder.step.StepDesc`) in one of two forms that differ only in padding and launch:

* dynamic (default): a :class:`~pd_kernels.SpanLayout` and index tensors of exactly the step's size (one
  host-to-device copy of every index; the layout is reused while the description is), then the device step;
* static: the description padded into a bucket's fixed buffers (:mod:`pd_kernels.decoder.graphs`), then the
  device step eagerly or as the bucket's CUDA graph.

Both run :meth:`ModelRunner.device_step` on a :class:`~pd_kernels.decoder.step.StepIO` and end with the step's
one device-to-host read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..integrations.transformers import StepContext, forward_hidden, logits_for_rows
from ..layout import SeqQueries, SpanLayout, StaticSpanLayout
from .._checks import cdiv
from ..ops import SpanState, commit_spans
from ..paged_cache import PagedKVCache
from .config import DecodeConfig
from .graphs import Bucket, GraphManager
from .inputs import check_cache_fits
from .step import StepDesc, StepIO, choose_tokens, choose_tokens_vocab_parallel, write_ar


@dataclass(frozen=True)
class CallGeometry:
    """Sizes of a call's buffers: ``batch`` token-buffer rows (= cache rows) of ``cap`` positions each,
    ``num_pages`` cache pages of ``page_size`` tokens, at most ``pages_per_seq`` per sequence; ``answer[i]``:
    the new tokens request ``i`` may hold (its budget; a diffusion canvas never exceeds it)."""
    batch: int
    cap: int
    page_size: int
    pages_per_seq: int
    num_pages: int
    answer: tuple

    @staticmethod
    def of(cfg: DecodeConfig, prompts: list, budgets: list, max_batch: int) -> "CallGeometry":
        ans = [min(cfg.diffusion_len or b, b) for b in budgets] if cfg.mode == "diffusion" else budgets
        cap = max(len(p) + a for p, a in zip(prompts, ans)) + 4
        ps = cfg.page_size
        nb = min(max_batch, len(prompts))
        pages_per_seq = cdiv(cap, ps) + 1
        num_pages = cfg.num_pages or nb * pages_per_seq
        if num_pages < cdiv(cap - 4, ps):
            raise ValueError(f"DecodeConfig.num_pages={num_pages} cannot hold one request of {cap - 4} "
                             f"positions (pages of {ps} tokens)")
        return CallGeometry(nb, cap, ps, pages_per_seq, num_pages, tuple(ans))


@dataclass(eq=False)
class Buffers:
    """The device state of a call. ``tokens_flat`` int64 ``[batch * cap + n_scratch]``: the token buffer's rows
    (``tokens``, ``[batch, cap]``, row ``b`` = the request in buffer row ``b``), then a scratch area from
    ``scratch`` on (always ``PAD``, never ``MASK``) that a bucket's padding rows read and write; ``state``: the
    :class:`~pd_kernels.SpanState` of ``batch * max_spans`` span ids; ``suppress``: the id span rows never choose
    (MASK), or None."""
    key: tuple
    cache: PagedKVCache
    tokens_flat: torch.Tensor
    tokens: torch.Tensor
    cap: int
    scratch: int
    state: SpanState
    suppress: torch.Tensor | None
    span_rows32: torch.Tensor


class ModelRunner:
    """The device side of a :class:`~pd_kernels.Decoder` (see the module docstring). ``counts``: steps run
    ``dynamic``, ``static_eager``, ``replayed``, and graphs ``captured``."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, geo: dict, *, static_step: bool,
                 cuda_graphs: bool, buckets: tuple, tp=None, vocab_parallel: bool = False):
        self.model, self.device, self.dtype, self.geo = model, device, dtype, geo
        # tensor parallelism (pd_kernels.parallel.tp): None in one process; geo holds this rank's heads
        self.tp, self.vocab_parallel = tp, vocab_parallel
        self.static_step = static_step
        self.counts = {"captured": 0, "replayed": 0, "static_eager": 0, "dynamic": 0}
        self.graphs = GraphManager(buckets, cuda_graphs, self.counts)
        self.buffers: Buffers | None = None
        self.cfg: DecodeConfig | None = None
        self.backend = None
        self._no_queries = SeqQueries.causal(0, 0)
        self._dyn = (None, None, None)   # (description key, layout, block tables) of the dynamic step

    # ---- buffers of a call ---------------------------------------------------------------------------------
    def prepare(self, cfg: DecodeConfig, backend, g: CallGeometry, budget_name: str) -> Buffers:
        """The buffers of a call of geometry ``g``: the previous call's, reset, when nothing they hold or a
        captured step bakes in changed (static step only); else new ones (checked to fit in memory first)."""
        self.cfg, self.backend, self._dyn = cfg, backend, (None, None, None)
        n_scratch = self.graphs.sizes[-1] if self.static_step else 1
        mask_free = cfg.mode == "ar" or not cfg.suppress_mask
        # what the captured step bakes in besides the geometry (a new value needs new buffers and graphs)
        baked = (cfg.policy, cfg.tau, cfg.confidence, cfg.temperature, cfg.top_k, cfg.top_p, mask_free)
        key = (g.batch, g.cap, g.num_pages, g.page_size, g.pages_per_seq, n_scratch, cfg.max_spans, cfg.tags.mask,
               cfg.tags.pad, self.graphs.sizes, baked)
        b = self.buffers
        if (self.static_step and b is not None and key == b.key and not b.cache.sequences
                and b.cache.num_free_pages == b.cache.num_pages):
            # same geometry: keep the buffers the captured graphs point at, reset their contents
            b.tokens_flat[:g.batch * g.cap].fill_(cfg.tags.mask)
            for t in (b.state.masks_left, b.state.step, b.state.deferred):
                t.zero_()
            b.state.num_steps.fill_(1)
            return b
        self.graphs.reset()   # free the old buffers first
        self.buffers = None
        check_cache_fits(what=f"{budget_name}={getattr(cfg, budget_name)}", nb=g.batch, cap=g.cap,
                         num_pages=g.num_pages, page_size=g.page_size, pages_per_seq=g.pages_per_seq,
                         n_scratch=n_scratch, geo=self.geo, dtype=self.dtype, device=self.device)
        maxpos = getattr(self.model.config, "max_position_embeddings", None)
        if maxpos is not None and g.cap - 4 > maxpos:
            raise ValueError(f"requests need up to {g.cap - 4} positions (prompt + {budget_name}), beyond "
                             f"the model's max_position_embeddings={maxpos}")
        cache = PagedKVCache(self.geo["num_layers"], self.geo["num_kv_heads"], self.geo["head_dim"], g.num_pages,
                             g.page_size, max_seqs=g.batch, max_pages_per_seq=g.pages_per_seq, dtype=self.dtype,
                             device=self.device)
        flat = torch.full((g.batch * g.cap + n_scratch,), cfg.tags.mask, dtype=torch.int64, device=self.device)
        flat[g.batch * g.cap:] = cfg.tags.pad
        state = SpanState.new(g.batch * cfg.max_spans, self.device)
        suppress = None if mask_free else torch.tensor([cfg.tags.mask], dtype=torch.int64, device=self.device)
        self.buffers = Buffers(key, cache, flat, flat[:g.batch * g.cap].view(g.batch, g.cap), g.cap, g.batch * g.cap,
                               state, suppress, torch.zeros(state.num_spans, 2, dtype=torch.int32, device=self.device))
        return self.buffers

    # ---- a step --------------------------------------------------------------------------------------------
    def run(self, desc: StepDesc) -> tuple[np.ndarray, int]:
        """Run the step ``desc`` (static when it fits the largest bucket, else dynamic). Returns the step's read
        (host int64: every LM-head row's token, then from the second value on, every span's ``masks_left``)."""
        if self.static_step and self.graphs.fits(desc):
            return self._run_static(desc)
        return self._run_dynamic(desc)

    def device_step(self, io: StepIO) -> None:
        """The device work of one step, the same for both forms (and what a CUDA graph captures): the queries'
        tokens, the model forward (each layer's K/V written into the cache, span attention), the LM head on the
        LM-head rows, :func:`~pd_kernels.token_confidence`, the AR token write, :func:`~pd_kernels.commit_spans`
        and the read buffer. No host sync, no host value of the step."""
        b, cfg = self.buffers, self.cfg
        flat = b.tokens_flat
        ctx = StepContext(b.cache, io.layout, io.slots, io.block_table, self.backend)
        hidden = forward_hidden(self.model, flat.index_select(0, io.in_idx), io.layout.q_pos, ctx)
        if self.tp is not None and type(hidden).__name__ == "DTensor":   # metadata only
            from ..parallel.tp import TensorParallelError
            raise TensorParallelError(f"the tensor-parallel model's final hidden states are a DTensor "
                                      f"({hidden.placements}): a layout other than column/row-wise attention and MLP "
                                      f"(sequence parallel?) is not implemented")
        R = io.rows.shape[0]
        if R:
            tp = self.tp
            if tp is not None and tp.head_sharded:   # this rank's vocabulary slice (no [N, V] gather by the plan)
                local = tp.local_logits(self.model, hidden, io.rows)
                if self.vocab_parallel:
                    tok, conf = choose_tokens_vocab_parallel(local, cfg, io.seed, io.offset, b.suppress, io.tok_conf,
                                                             tp)
                else:
                    tok, conf = choose_tokens(tp.gather_logits(local), cfg, io.seed, io.offset, b.suppress,
                                              io.tok_conf, self.backend)
            else:
                logits = logits_for_rows(self.model, hidden, io.rows)
                tok, conf = choose_tokens(logits, cfg, io.seed, io.offset, b.suppress, io.tok_conf, self.backend)
            ar = None
            if io.forced.shape[0]:   # a bucket's non-AR rows write PAD into their scratch element
                ar = write_ar(flat, io.ar_dst, io.forced, io.val, tok[io.ar], cfg.tags.pad)
            if io.s_dst.shape[0]:
                io.span_rows32.copy_(io.span_rows)
                commit_spans(tok[io.span], conf[io.span], io.s_dst, io.span_rows32, flat, b.state, policy=cfg.policy,
                             tau=cfg.tau, mask_id=cfg.tags.mask, out=io.commit_out, backend=self.backend)
            read = torch.index_select(flat, 0, io.dst, out=io.read[:R])   # every row's token after the step
            if ar is not None:   # an AR row that had no token reads its -1 (its buffer holds PAD)
                read[io.ar] = torch.where(ar < 0, ar, read[io.ar])
        io.read[R:].copy_(b.state.masks_left)

    def _run_dynamic(self, desc: StepDesc) -> tuple[np.ndarray, int]:
        """The dynamic form: index tensors of exactly the description's size (one host-to-device copy; the
        layout and block tables are reused while the description is)."""
        b = self.buffers
        nq, nr, ns, na, S = desc.nq, desc.nr, desc.ns, desc.na, b.state.num_spans
        key, layout, bt = self._dyn
        if key != (id(desc), desc.gen):
            layout, bt = SpanLayout.build(desc.seqs, self.device), b.cache.block_tables(desc.cache_rows)
            self._dyn = ((id(desc), desc.gen), layout, bt)
        host = np.concatenate([desc.in_idx, desc.slots, desc.rows, desc.dst, desc.seed, desc.offset, desc.forced,
                               desc.val, desc.span_rows.reshape(-1)])
        dev = torch.from_numpy(host).to(self.device)   # every index of the step: one host-to-device copy
        in_idx, slots, rows, dst, seed, offset, forced, val, span_rows = \
            dev.split([nq, nq, nr, nr, nr, nr, na, na, 2 * S])
        io = StepIO(layout, bt, in_idx, slots, rows, dst, seed, offset, slice(0, ns), dst[:ns], slice(ns, nr),
                    dst[ns:], forced, val, span_rows.view(S, 2), b.span_rows32,
                    torch.empty(nr + S, dtype=torch.int64, device=self.device))
        self.device_step(io)
        self.counts["dynamic"] += 1
        return io.read.cpu().numpy(), nr       # the step's one device-to-host read

    def _run_static(self, desc: StepDesc) -> tuple[np.ndarray, int]:
        """The static form: the description padded into its bucket (one host-to-device copy, plus the static
        layout's when the description changed), the device step (its graph, or eagerly), the read."""
        b = self.buffers
        bk = self.graphs.bucket(desc.nq, desc.nr, self._new_bucket)
        changed = bk.fill(desc, b.scratch, self.cfg.tags.pad)
        # the staging buffer is free: the previous step ended with a device-to-host read (a sync)
        bk.idx.copy_(bk.staging, non_blocking=True)
        if changed:
            seqs = [self._no_queries] * b.cache.max_seqs   # layout sequence b = cache row b
            for row, sq in zip(desc.cache_rows, desc.seqs):
                seqs[row] = sq
            bk.layout.update(seqs)
        self.graphs.run(bk, self.static_body)
        bk.read_host.copy_(bk.read)  # the step's one device-to-host read
        return bk.read_host.numpy(), bk.R

    def static_body(self, bk: Bucket) -> None:
        """The device step on a bucket's buffers (an attribute lookup at every step: benchmarks and tests
        replace it to record or stub the device work)."""
        self.device_step(bk.io)

    def _new_bucket(self, Q: int, R: int) -> Bucket:
        b = self.buffers
        # max_kv: a sequence never holds more than cap tokens; it bounds the split-K workspace
        layout = StaticSpanLayout(Q, b.tokens.shape[0], self.device,
                                  group=self.geo["num_heads"] // self.geo["num_kv_heads"],
                                  max_segments=b.tokens.shape[0] * self.cfg.max_spans, max_kv=b.cap)
        return Bucket(Q, R, b.state.num_spans, layout, b.cache.block_table, self.device)
