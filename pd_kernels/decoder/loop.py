"""The planned-diffusion decoder loop (SPEC sections 3-6) on the pd_kernels ops, batched.

One :class:`Decoder` step is one forward pass of the model over the packed queries of every running
request, whatever its phase:

* ``prefill``   - the prompt, causal (one step);
* ``plan``      - one AR token (a plan token, the AR baseline's next token, or the ``<sync/>`` tag), causal;
* ``diffusion`` - every token of every unfinished span of the request's current round (PD / PD-DA);
* ``refresh``   - (``refresh_spans=True``) every span of a finished round once more, before its ``<sync/>``.

A step (:meth:`Decoder._step`): describe it (:mod:`pd_kernels.decoder.step`: one :class:`StepDesc`, reused
while no request changes state), run it (dynamic: exactly the description; static: padded into a bucket, a
CUDA graph per bucket), read back every LM-head row's token and every span's ``masks_left`` (the step's one
device-to-host read), advance the requests (plan parsing, finished spans and rounds, events).

Batch invariance: nothing a request computes depends on the other requests of its batch or on when it was
admitted. Its positions, cache slots and token-buffer row are its own; its RNG noise is keyed by (its seed,
its own step counter, the absolute position); the ops treat rows independently. What remains is the model's
own arithmetic: its matmuls run over the packed tokens of the whole step, and a BLAS library may pick another
kernel (another summation order) for another row count, so greedy near-ties can still flip with the batch
(see the README, "Batch invariance").

Forced plans (``forced_plans``) replace the sampled plan tokens (the model still forwards them, so the
critical path and the cache are those of a real plan): random-weight models then run multi-span,
multi-round generations.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .._checks import debug_enabled
from ..layout import SeqQueries, SpanLayout, StaticSpanLayout
from ..ops import SpanState, commit_spans
from ..paged_cache import PagedKVCache
from ..integrations.transformers import (StepContext, check_model, enabled, forward_hidden, graph_capture_issues,
                                          is_enabled, logits_for_rows, model_geometry)
from . import events as ev
from .config import DecodeConfig
from .inputs import (check_cache_fits, check_decoder_args, check_forced_plans, check_model_state, check_prompts,
                     check_seeds)
from .plan import parse_plan, text_outside_entries
from .stats import RequestStats
from .step import Bucket, Piece, StepDesc, choose_tokens, describe, write_ar


@dataclass
class GenerationResult:
    """Output of one request.

    Attributes:
        answer: answer token ids: the spans in order, tags, ``[PAD]``, EOS and MASK removed (``answer_text=
            "reference"``: also the plan text outside its entries); for ``ar`` the tokens before EOS; for
            ``diffusion`` the answer cut at the first EOS; a plan with no usable entry contributes its own AR
            tokens.
        sequence: the whole final sequence (prompt, plans, spans with tags, ``<sync/>`` tags); plan
            terminators are not part of it.
        plans: AR tokens of each round (terminator excluded).
        spans: per round, per span, the span's tokens at its mask positions.
        stats: :class:`RequestStats`.
        pieces: the pieces ``answer`` is made of, in order (spans; with ``answer_text="reference"`` also the
            plan texts), for :meth:`text`.
        answer_text: the config's ``answer_text``.
    """
    answer: list
    sequence: list
    plans: list
    spans: list
    stats: RequestStats
    pieces: list = field(default_factory=list)
    answer_text: str = "spans"

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason

    def text(self, decode) -> str:
        """The answer as text, ``decode`` a tokenizer's ``decode(list_of_ids) -> str``. ``"spans"``: the answer
        tokens decoded at once; ``"reference"``: the pieces joined with a space, runs of spaces and tabs
        collapsed, stripped (the PD reference's ``clean_text``)."""
        if self.answer_text == "reference":
            return re.sub(r"[ \t]+", " ", " ".join(decode(list(p)) for p in self.pieces)).strip()
        return decode(list(self.answer))


@dataclass
class _Span:
    start: int          # position of the span's first query (<async>; diffusion: the token before the answer)
    length: int         # tokens the span forwards (tags included)
    moff: int           # offset of the first mask from start (mask positions start+moff .. +masks-1)
    masks: int
    sid: int            # span id in the SpanState (slot * max_spans + index)
    index: int          # index in its round
    toks: np.ndarray    # tokens at its mask positions as last read (final once finished)
    active: bool = True


@dataclass
class _Request:
    idx: int
    prompt: list
    forced: list | None
    seed: int
    budget: int                         # new tokens it may add
    max_pages: int                      # cache pages it may come to hold (prompt + budget positions)
    slot: int = -1                      # token-buffer row
    seq: int = -1                       # cache row
    phase: str = "prefill"
    length: int = 0                     # tokens in the sequence (= reserved cache positions)
    prefill_len: int = 0
    toks: list = field(default_factory=list)        # host copy of the sequence
    plan: list = field(default_factory=list)        # AR tokens of the current round
    plans: list = field(default_factory=list)
    round_spans: list = field(default_factory=list)  # list[_Span] of the current round
    prefix: int = 0
    terminator: str = ""
    spans_out: list = field(default_factory=list)
    answer: list = field(default_factory=list)
    pieces: list = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    result: GenerationResult | None = None
    piece: Piece | None = None                      # its part of the next step (None: rebuild)
    pages: list = field(default_factory=list)       # its cache pages (refreshed when a position needs more)

    @property
    def new_tokens(self) -> int:
        return self.length - len(self.prompt)

    @property
    def steps(self) -> int:
        """Steps taken so far: the counter of its RNG keys."""
        return self.stats.critical_path


_NONE = np.zeros(0, dtype=np.int64)
_ENDED = ("this Decoder.stream iterator has ended: a later generate / stream call on its Decoder (or a new "
          "Decoder.cfg) replaced its state; a Decoder decodes one call at a time (use a second Decoder to interleave)")
DEFAULT_BUCKETS = tuple(16 << i for i in range(8))  # 16 .. 2048 packed queries (and LM-head rows)


class Decoder:
    """Batched planned-diffusion / AR / diffusion decoding of a transformers model on pd_kernels.

    Args:
        model: a transformers causal LM in eval mode (families in
            :data:`~pd_kernels.integrations.transformers.VERIFIED_MODEL_TYPES`; a feature the kernels do not
            implement raises ``UnsupportedModelError`` here). :meth:`generate` / :meth:`stream` switch it to
            pd_kernels attention while they run and restore its own attention afterwards.
        config: :class:`DecodeConfig`.
        max_batch: most requests decoded together; further prompts wait and join as others finish.
        backend: pd_kernels backend of every op (``None``: the current default, see :func:`pd_kernels.use_backend`).
        on_step: optional ``callable(decoder)`` run after every step.
        cuda_graphs: run each step's device work as a CUDA graph, captured once per bucket (CUDA models
            only: a model on another device raises ``ValueError``). Implies ``static_step``.
        static_step: run each step from the fixed buffers of a bucket (the capturable step) without
            capturing it (default: ``cuda_graphs``). Same tokens as the default dynamic step; works on CPU.
        buckets: ascending bucket sizes, used for both the packed query count and the LM-head row count
            (default 16, 32, ..., 2048). A step is padded up to the smallest bucket that holds it.

    Both steps run the same :class:`~pd_kernels.decoder.step.StepDesc`. Dynamic step (default): a
    :class:`~pd_kernels.SpanLayout` and index tensors of exactly the step's size (two host-to-device copies),
    the model, the LM head on the description's rows, :func:`~pd_kernels.token_confidence`, the AR token write,
    :func:`~pd_kernels.commit_spans`, one device-to-host read.

    Static step: a step with ``nq`` packed queries and ``nr`` LM-head rows uses the bucket ``(Q, R)`` =
    (smallest bucket >= ``nq``, smallest bucket >= ``max(nr, 1)``), with ``max_batch`` sequences and
    ``max_batch * max_spans`` segments: a :class:`~pd_kernels.StaticSpanLayout` (layout sequence ``b`` = cache
    row ``b``, so the cache's own block table is the graph's) and fixed index / output buffers
    (:class:`~pd_kernels.decoder.step.Bucket`, which also documents the padding). The token buffer has a scratch
    area (``buckets[-1]`` elements past the ``[max_batch, cap]`` rows, always ``PAD``, never ``MASK``) that
    padding rows read and write.

    **Captured** in the CUDA graph of a bucket (all graphs share one memory pool): the token gather, the whole
    model forward (each layer's :func:`~pd_kernels.paged_kv_write` + :func:`~pd_kernels.span_attention` on the
    static layout), the LM head on the ``R`` rows, :func:`~pd_kernels.token_confidence` (``out=``, per-row RNG
    keys read on the device), the AR token write, :func:`~pd_kernels.commit_spans` (``out=``) and the gather of
    the read buffer (every row's token, every span's ``masks_left``).

    **Not captured** (host, between replays): admission, plan parsing, span/round bookkeeping and the cache
    ``reserve`` / token-template / ``SpanState.reset`` writes of a state change; choosing the bucket; packing
    the description into the pinned staging buffer (only the RNG offsets while nothing changed) and its one
    non-blocking host-to-device copy; :meth:`~pd_kernels.StaticSpanLayout.update` (only when the description
    changed); the step's one device-to-host read. The first step of a bucket runs eagerly (warm-up: Triton
    compilation, cuBLAS handles, and the attention's split-K workspace, sized by the bucket), the second
    captures the graph and replays it, later ones replay. ``graph_counts`` counts ``captured`` graphs,
    ``replayed`` steps, ``static_eager`` steps and ``dynamic`` (overflow) steps. A step larger than the largest
    bucket runs on the dynamic path. Buffers (cache, token buffer, span state, buckets) are kept across
    :meth:`generate` calls while their geometry is unchanged, so graphs captured in one call replay in the next.
    """

    def __init__(self, model, config=None, *, max_batch: int = 8, backend: str | None = None, on_step=None,
                 cuda_graphs: bool = False, static_step: bool | None = None, buckets=None):
        config, max_batch = check_decoder_args(model, config, max_batch, backend, on_step, buckets)
        if not is_enabled(model):  # refuse what pd_kernels cannot run; generate() enables it and restores it
            check_model(model)
        self._run, self._stepping, self._generating = 0, False, False   # see _start / _loop
        self.model = model
        self.cfg = config
        self.max_batch = max_batch
        self.backend = backend
        self.on_step = on_step
        self.device, self.dtype = check_model_state(model)
        self.geo = model_geometry(model)
        self._check_tags()
        self.cuda_graphs = bool(cuda_graphs)
        self.static_step = self.cuda_graphs if static_step is None else bool(static_step)
        if self.cuda_graphs and not self.static_step:
            raise ValueError("cuda_graphs=True captures the static step: static_step=False contradicts it")
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device, the model is on {self.device} "
                             f"(static_step=True runs the same fixed-buffer step without capture)")
        if self.cuda_graphs and debug_enabled():
            raise ValueError("cuda_graphs=True cannot run with PD_KERNELS_DEBUG=1 (its checks read device values "
                             "on the host); use static_step=True to debug the same step eagerly")
        if self.cuda_graphs:
            with enabled(self.model):
                issues = graph_capture_issues(self.model)
            if issues:
                raise ValueError("cuda_graphs=True: this model's forward cannot be captured: " + "; ".join(issues))
        b = DEFAULT_BUCKETS if buckets is None else tuple(int(x) for x in buckets)
        if not b or b[0] < 1 or list(b) != sorted(set(b)):
            raise ValueError(f"buckets must be distinct positive sizes in ascending order, got {buckets!r}")
        self.buckets = b
        self._fixed = (self.cuda_graphs, self.static_step, self.buckets)   # checked above: fixed for the Decoder
        self.graph_counts = {"captured": 0, "replayed": 0, "static_eager": 0, "dynamic": 0}
        self._arena_key = None
        self._buckets: dict = {}      # (Q, R) -> Bucket
        self._bucket_of: dict = {}    # (nq, nr) -> Bucket
        self._graph_pool = None
        self.reqs, self.running, self.queue = [], [], []

    # ---- public entry points ---------------------------------------------------------------------------
    def generate(self, prompts, forced_plans=None, *, seeds=None, on_event=None) -> list[GenerationResult]:
        """Decode every prompt (each a list of token ids, or one row of a 2-D tensor) and return one
        :class:`GenerationResult` per prompt, in order.

        ``forced_plans[i]``: ``None`` or a list of rounds, each the AR tokens to force in that round (usually
        ending with ``<sync/>`` or EOS, see :func:`~pd_kernels.decoder.make_plan`); rounds past the list, or tokens
        past a round's list, are sampled. ``seeds[i]``: the RNG seed of request ``i`` (default: the config's
        ``seed``). ``on_event``: ``callable(event)`` for each :mod:`~pd_kernels.decoder.events` event. The model
        runs on pd_kernels attention only during the call: its own attention is restored when it returns or
        raises.

        A Decoder decodes one call at a time: calling :meth:`generate` or :meth:`stream` on it from ``on_event`` or
        ``on_step`` raises ``RuntimeError`` (use a second Decoder); a call made while a :meth:`stream` iterator of
        it is still open ends that stream (resuming it raises ``RuntimeError``)."""
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable or None, got {type(on_event).__name__}")
        self._start(prompts, forced_plans, seeds)
        self._generating = True
        try:
            for e in self._loop(on_event is not None, self._run):
                on_event(e)
        finally:
            self._generating = False
        return [r.result for r in self.reqs]

    def stream(self, prompts, forced_plans=None, *, seeds=None):
        """Like :meth:`generate`, but returns an iterator over the events (:mod:`pd_kernels.decoder.events`) as
        they happen: plan tokens, span commits, finished spans and rounds, finished requests (each with its
        :class:`GenerationResult`). Arguments are checked now; decoding runs as the iterator is consumed, with the
        model on pd_kernels attention until the iterator is exhausted or closed. A later :meth:`generate` /
        :meth:`stream` call on this Decoder, or a new :attr:`cfg`, ends an open stream: resuming it then raises
        ``RuntimeError`` (its requests' state is gone); breaking out of the loop needs nothing else."""
        self._start(prompts, forced_plans, seeds)
        return self._loop(True, self._run)   # the call's run id, taken now (the body starts at the first next())

    @property
    def cfg(self) -> DecodeConfig:
        """The :class:`DecodeConfig` of the next :meth:`generate` / :meth:`stream` call (may be replaced between
        calls; replacing it ends an open stream, and is refused during a call)."""
        return self._cfg

    @cfg.setter
    def cfg(self, config: DecodeConfig) -> None:
        if not isinstance(config, DecodeConfig):
            raise TypeError(f"Decoder.cfg must be a DecodeConfig, got {type(config).__name__}")
        if self._stepping or self._generating:
            raise RuntimeError("Decoder.cfg cannot change during a generate / stream call of this Decoder")
        self._cfg = config
        self._run += 1   # an open stream decoded with the old config: it ends

    # ---- setup -------------------------------------------------------------------------------------------
    def _check_tags(self) -> None:
        if self.cfg.tags.max_id() >= self.geo["vocab_size"]:
            raise ValueError(f"control-tag ids {self.cfg.tags} do not fit the model's vocabulary "
                             f"({self.geo['vocab_size']}): pass DecodeConfig(tags=ControlTags(...))")

    def _start(self, prompts, forced_plans, seeds) -> None:
        """Check a call's arguments, then (only then) reset the decoder's state for it."""
        if self._stepping or self._generating:
            raise RuntimeError("Decoder.generate / stream was called while this Decoder is decoding (from on_step or "
                               "on_event?): a Decoder decodes one call at a time; use a second Decoder")
        cfg, V = self.cfg, self.geo["input_vocab_size"]   # prompts and forced plans are read by the embeddings
        if (self.cuda_graphs, self.static_step, self.buckets) != self._fixed:
            raise ValueError("Decoder.cuda_graphs / static_step / buckets are fixed when the Decoder is made (its "
                             "checks and buffers depend on them): make a new Decoder")
        check_decoder_args(self.model, cfg, self.max_batch, self.backend, self.on_step, self.buckets)
        check_model_state(self.model, self.device, self.dtype)
        self._check_tags()
        prompts = check_prompts(prompts, V)
        forced_plans = check_forced_plans(forced_plans, len(prompts), V)
        seeds = check_seeds(seeds, len(prompts), cfg.seed)
        budgets = [cfg.budget(len(p)) for p in prompts]
        for i, (p, bud) in enumerate(zip(prompts, budgets)):
            if bud < 1:
                raise ValueError(f"prompt {i} has {len(p)} tokens: no room left under max_length={cfg.max_length}")
        # positions a request may hold: prompt + new tokens (a diffusion canvas never exceeds the budget)
        ans = [min(cfg.diffusion_len or b, b) for b in budgets] if cfg.mode == "diffusion" else budgets
        self.cap = max(len(p) + a for p, a in zip(prompts, ans)) + 4
        nb = min(self.max_batch, len(prompts))
        ps = cfg.page_size
        pages_per_seq = -(-self.cap // ps) + 1
        num_pages = cfg.num_pages or nb * pages_per_seq
        if num_pages < -(-(self.cap - 4) // ps):
            raise ValueError(f"DecodeConfig.num_pages={num_pages} cannot hold one request of {self.cap - 4} "
                             f"positions (pages of {ps} tokens)")
        self._run += 1   # from here on the state is this call's: an open stream of an earlier call ends
        self.reqs = [_Request(i, p, f, s, b, -(-(len(p) + a) // ps))
                     for i, (p, f, s, b, a) in enumerate(zip(prompts, forced_plans, seeds, budgets, ans))]
        maxpos = getattr(self.model.config, "max_position_embeddings", None)
        n_scratch = self.buckets[-1] if self.static_step else 1
        mask_free = cfg.mode == "ar" or not cfg.suppress_mask
        # what the captured step bakes in besides the geometry (a new value needs new buffers and graphs)
        baked = (cfg.policy, cfg.tau, cfg.confidence, cfg.temperature, cfg.top_k, cfg.top_p, mask_free)
        key = (nb, self.cap, num_pages, ps, pages_per_seq, n_scratch, cfg.max_spans, cfg.tags.mask, cfg.tags.pad,
               self.buckets, baked)
        if (self.static_step and key == self._arena_key and not self.cache.sequences
                and self.cache.num_free_pages == self.cache.num_pages):
            # same geometry: keep the buffers the captured graphs point at, reset their contents
            self._tok_store[:nb * self.cap].fill_(cfg.tags.mask)
            for t in (self.state.masks_left, self.state.step, self.state.deferred):
                t.zero_()
            self.state.num_steps.fill_(1)
        else:
            self._buckets, self._bucket_of = {}, {}  # free the old arena first
            self._arena_key, self.cache, self._tok_store = None, None, None
            budget_name = "max_length" if cfg.max_length is not None else "max_new_tokens"
            check_cache_fits(what=f"{budget_name}={getattr(cfg, budget_name)}", nb=nb, cap=self.cap,
                             num_pages=num_pages, page_size=ps, pages_per_seq=pages_per_seq, n_scratch=n_scratch,
                             geo=self.geo, dtype=self.dtype, device=self.device)
            if maxpos is not None and self.cap - 4 > maxpos:
                raise ValueError(f"requests need up to {self.cap - 4} positions (prompt + {budget_name}), beyond "
                                 f"the model's max_position_embeddings={maxpos}")
            self._arena_key = key
            self.cache = PagedKVCache(self.geo["num_layers"], self.geo["num_kv_heads"], self.geo["head_dim"],
                                      num_pages, ps, max_seqs=nb, max_pages_per_seq=pages_per_seq,
                                      dtype=self.dtype, device=self.device)
            # [nb, cap] token rows, then a scratch area (always PAD, never MASK) of one element per LM-head row
            # of the largest bucket: the static step's padding rows gather from it and write into it
            self._tok_store = torch.full((nb * self.cap + n_scratch,), cfg.tags.mask, dtype=torch.int64,
                                         device=self.device)
            self._tok_store[nb * self.cap:] = cfg.tags.pad
            self.tokens = self._tok_store[:nb * self.cap].view(nb, self.cap)
            self.tokens_flat = self._tok_store
            self.scratch = nb * self.cap
            self.state = SpanState.new(nb * cfg.max_spans, self.device)
            self.suppress = None if mask_free else torch.tensor([cfg.tags.mask], dtype=torch.int64, device=self.device)
        self._no_queries = SeqQueries.causal(0, 0)
        self._left = np.zeros(self.state.num_spans, dtype=np.int64)   # masks_left of each span at its last step
        self._specials = frozenset(cfg.tags.specials)
        self.free_slots = list(range(nb - 1, -1, -1))
        self._pages_held = 0   # pages the running requests may come to hold (admission keeps it <= num_pages)
        self.queue = list(self.reqs)
        self.running: list[_Request] = []
        self._by_slot: dict = {}
        self.step_index = 0
        self._desc, self._dirty, self._gen, self._dyn_key = None, True, 0, None
        self._events = None

    def _loop(self, events: bool, run: int):
        """Admit and step until every request is done; yields the events of each step when ``events``. ``run``: the
        id of the call (:meth:`_start`); a later call ends this one (it raises when resumed)."""
        if self._run != run:
            raise RuntimeError(_ENDED)
        self._events = [] if events else None
        with enabled(self.model):
            while True:
                if self._run != run:
                    raise RuntimeError(_ENDED)
                if not (self.queue or self.running):
                    break
                self._stepping = True
                try:
                    while self.queue and self.free_slots and \
                            self._pages_held + self.queue[0].max_pages <= self.cache.num_pages:
                        self._admit(self.queue.pop(0))
                    if not self.running:   # cannot happen (_start checked that each request fits alone): no hang
                        raise RuntimeError(f"no request could be admitted ({len(self.queue)} waiting)")
                    with torch.no_grad():
                        self._step()
                    if self.on_step is not None:
                        self.on_step(self)
                finally:
                    self._stepping = False
                if self._events:
                    out, self._events = self._events, []
                    for e in out:
                        if self._run != run:
                            raise RuntimeError(_ENDED)
                        yield e

    def _emit(self, event) -> None:
        if self._events is not None:
            self._events.append(event)

    # ---- one step ----------------------------------------------------------------------------------------
    def _step(self) -> None:
        """One forward pass of every running request: describe, run (static bucket or dynamic), advance."""
        t0 = time.perf_counter()
        desc = self._describe()
        if self.static_step and desc.nq <= self.buckets[-1]:
            read, R = self._run_static(desc)
        else:
            read, R = self._run_dynamic(desc)
        self.step_index += 1
        dt = time.perf_counter() - t0
        phases = [r.phase for r in desc.reqs]
        for r, ph in zip(desc.reqs, phases):
            r.stats.steps[ph] += 1
            r.stats.time_s[ph] += dt
        self._advance(desc, phases, read[:desc.nr], read[R:])

    def _describe(self) -> StepDesc:
        """The step's description: the previous one with its RNG offsets advanced while no request changed
        state, else rebuilt from the requests' pieces (each kept while its request does not change)."""
        if self._desc is not None and not self._dirty:
            self._desc.tick()
            return self._desc
        self._gen += 1
        entries = sorted(((r, self._piece(r)) for r in self.running), key=lambda e: e[0].seq)
        self._desc = describe(entries, self.state.num_spans, self._gen)
        self._dirty = False
        return self._desc

    def _piece(self, r: _Request) -> Piece:
        """The request's part of the step, from its phase (cached until :meth:`_touch`)."""
        if r.piece is not None:
            return r.piece
        base, ps = r.slot * self.cap, self.cache.page_size
        if r.phase == "plan":   # the common AR step, kept lean: one query at the last position
            p = r.length - 1
            if p // ps >= len(r.pages):
                r.pages = self.cache.pages(r.seq)
            f = self._forced_token(r)
            r.piece = Piece(SeqQueries("causal", start=p, length=1), np.array([base + p], dtype=np.int64),
                            np.array([r.pages[p // ps] * ps + p % ps], dtype=np.int64), _NONE, _NONE, _NONE, (), (),
                            (0, base + p + 1, p + 1, 0 if f is None else 1, 0 if f is None else f))
            return r.piece
        ar, s_q, s_pos, sids, cnts = None, [], [], [], []
        if r.phase == "prefill":
            sq = SeqQueries.causal(0, r.prefill_len)
            pos = np.arange(r.prefill_len, dtype=np.int64)
            if self.cfg.mode != "diffusion":
                f = self._forced_token(r)
                n = r.prefill_len
                ar = (n - 1, base + n, n, 0 if f is None else 1, 0 if f is None else f)
        else:   # diffusion / refresh
            refresh = r.phase == "refresh"
            spans = r.round_spans
            sq = SeqQueries.spans(r.prefix, [s.length for s in spans], [refresh or s.active for s in spans],
                                  mode="pd-da" if self.cfg.mode == "pd-da" else "pd")
            pos = sq.positions()
            q = 0
            for s in spans:
                if not s.active:
                    continue
                if not refresh:  # row k of a span predicts mask k from the query before it (Dream shift)
                    s_q.append(np.arange(q + s.moff - 1, q + s.moff - 1 + s.masks, dtype=np.int64))
                    s_pos.append(np.arange(s.start + s.moff, s.start + s.moff + s.masks, dtype=np.int64))
                    sids.append(s.sid)
                    cnts.append(s.masks)
                q += s.length
        r.pages = self.cache.pages(r.seq)
        pages = np.asarray(r.pages, dtype=np.int64)
        s_pos = np.concatenate(s_pos) if s_pos else _NONE
        r.piece = Piece(sq, pos + base, pages[pos // ps] * ps + pos % ps, np.concatenate(s_q) if s_q else _NONE,
                        s_pos + base, s_pos, tuple(sids), tuple(cnts), ar)
        return r.piece

    def _touch(self, r: _Request) -> None:
        """``r`` changed state: its piece and the step description are rebuilt before the next step."""
        r.piece = None
        self._dirty = True

    def _run_dynamic(self, desc: StepDesc) -> tuple[np.ndarray, int]:
        """The dynamic step: index tensors of exactly the description's size (one host-to-device copy; the layout
        is reused while the description is). Returns (the read, where ``masks_left`` starts in it)."""
        cfg = self.cfg
        nq, nr, ns, na, S = desc.nq, desc.nr, desc.ns, desc.na, self.state.num_spans
        if self._dyn_key != (id(desc), desc.gen):
            self._dyn_layout = SpanLayout.build(desc.seqs, self.device)
            self._dyn_bt = self.cache.block_tables(desc.rows_of)
            self._dyn_key = (id(desc), desc.gen)
        host = np.concatenate([desc.in_idx, desc.slots, desc.rows, desc.dst, desc.seed, desc.offset, desc.forced,
                               desc.val, desc.span_rows.reshape(-1)])
        dev = torch.from_numpy(host).to(self.device)   # every index of the step: one host-to-device copy
        in_idx, slots, rows, dst, seed, offset, forced, val, span_rows = \
            dev.split([nq, nq, nr, nr, nr, nr, na, na, 2 * S])
        layout = self._dyn_layout
        ctx = StepContext(self.cache, layout, slots, self._dyn_bt, self.backend)
        hidden = forward_hidden(self.model, self.tokens_flat.index_select(0, in_idx), layout.q_pos[:nq], ctx)
        read = []
        if nr:
            logits = logits_for_rows(self.model, hidden, rows)
            tok, conf = choose_tokens(logits, cfg, seed, offset, self.suppress, None, self.backend)
            if ns:
                commit_spans(tok[:ns], conf[:ns], dst[:ns], span_rows.view(S, 2).to(torch.int32), self.tokens_flat,
                             self.state, policy=cfg.policy, tau=cfg.tau, mask_id=cfg.tags.mask, backend=self.backend)
                read.append(self.tokens_flat.index_select(0, dst[:ns]))
            if na:
                read.append(write_ar(self.tokens_flat, dst[ns:], forced, val, tok[ns:], cfg.tags.pad))
        read.append(self.state.masks_left.to(torch.int64))
        self.graph_counts["dynamic"] += 1
        return torch.cat(read).cpu().numpy(), nr       # the step's one device-to-host read

    # ---- the static (capturable) step ----------------------------------------------------------------------
    def _bucket(self, nq: int, nr: int) -> Bucket:
        bk = self._bucket_of.get((nq, nr))
        if bk is not None:
            return bk
        Q = next(b for b in self.buckets if b >= nq)
        R = next(b for b in self.buckets if b >= max(nr, 1))  # nr <= nq: always found
        bk = self._buckets.get((Q, R))
        if bk is None:
            nb = self.tokens.shape[0]
            # max_kv: a sequence never holds more than cap tokens; it bounds the split-K workspace
            layout = StaticSpanLayout(Q, nb, self.device, group=self.geo["num_heads"] // self.geo["num_kv_heads"],
                                      max_segments=nb * self.cfg.max_spans, max_kv=self.cap)
            bk = self._buckets[(Q, R)] = Bucket(Q, R, self.state.num_spans, layout, self.device)
        self._bucket_of[(nq, nr)] = bk
        return bk

    def _run_static(self, desc: StepDesc) -> tuple[np.ndarray, int]:
        """The static step: pad the description into its bucket (one host-to-device copy, plus the static
        layout's when the description changed), run the captured graph (or the same work eagerly), read."""
        bk = self._bucket(desc.nq, desc.nr)
        changed = bk.fill(desc, self.scratch, self.cfg.tags.pad)
        # the staging buffer is free: the previous step ended with a device-to-host read (a sync)
        bk.idx.copy_(bk.staging, non_blocking=True)
        if changed:
            seqs = [self._no_queries] * self.cache.max_seqs   # layout sequence b = cache row b
            for row, sq in zip(desc.rows_of, desc.seqs):
                seqs[row] = sq
            bk.layout.update(seqs)
        if self.cuda_graphs and bk.graph is None and bk.calls > 0:
            self._capture(bk)
        if bk.graph is not None:
            bk.graph.replay()
            self.graph_counts["replayed"] += 1
        else:
            self._static_body(bk)
            self.graph_counts["static_eager"] += 1
        bk.calls += 1
        bk.read_host.copy_(bk.read)  # the step's one device-to-host read
        return bk.read_host.numpy(), bk.R

    def _capture(self, bk: Bucket) -> None:
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._static_body(bk)
        bk.graph = graph
        self.graph_counts["captured"] += 1

    def _static_body(self, bk: Bucket) -> None:
        """The device work of a static step: fixed shapes, fixed buffers, no host sync (what is captured)."""
        cfg = self.cfg
        input_ids = self.tokens_flat.index_select(0, bk.in_idx)
        ctx = StepContext(self.cache, bk.layout, bk.slots, self.cache.block_table, self.backend)
        hidden = forward_hidden(self.model, input_ids, bk.layout.q_pos, ctx)
        logits = logits_for_rows(self.model, hidden, bk.rows)
        choose_tokens(logits, cfg, bk.seed, bk.offset, self.suppress, (bk.tok, bk.conf), self.backend)
        ar = write_ar(self.tokens_flat, bk.ar_dst, bk.forced, bk.val, bk.tok, cfg.tags.pad)  # non-AR rows: PAD
        bk.span_rows32.copy_(bk.span_rows)
        commit_spans(bk.tok, bk.conf, bk.s_dst, bk.span_rows32, self.tokens_flat, self.state, policy=cfg.policy,
                     tau=cfg.tau, mask_id=cfg.tags.mask, out=(bk.committed, bk.all_done), backend=self.backend)
        # every row's token after the step; an AR row that had no token reads its -1 (its buffer holds PAD)
        bk.read[:bk.R].copy_(torch.where(ar < 0, ar, self.tokens_flat.index_select(0, bk.dst)))
        bk.read[bk.R:].copy_(self.state.masks_left)

    # ---- after a step ------------------------------------------------------------------------------------
    def _advance(self, desc: StepDesc, phases: list, vals: np.ndarray, masks_left: np.ndarray) -> None:
        """Bookkeeping from the step's read: span commits and finished spans/rounds, AR tokens, the end of a
        diffusion-mode prefill or a refresh step. ``vals``: every LM-head row's token after the step."""
        ns, ms = desc.ns, self.cfg.max_spans
        if ns:
            if self._events is not None:
                self._commit_events(desc, vals)
            ended, sids = [], desc.span_ids
            left = masks_left[sids]
            # a span that committed nothing had no valid token in any masked row (commit_spans never commits a
            # negative token): the next step would see the same, so it ends now, with its masks
            stalled = (left > 0) & (left >= self._left[sids])
            self._left[sids] = left
            for sid in sids[(left == 0) | stalled].tolist():
                r = self._by_slot[sid // ms]
                s = r.round_spans[sid % ms]
                if self._left[sid]:
                    r.stats.plan_errors.append(f"round {r.stats.rounds}: span {s.index} stopped with "
                                               f"{self._left[sid]} masks (no valid token)")
                first, n = desc.span_rows[sid]
                s.toks, s.active = vals[first:first + n].copy(), False
                r.toks[s.start + s.moff:s.start + s.moff + s.masks] = s.toks.tolist()
                self._emit(ev.SpanFinished(r.idx, r.stats.rounds, s.index, tuple(s.toks.tolist())))
                self._touch(r)
                if not any(x.active for x in r.round_spans) and r not in ended:
                    ended.append(r)
            for r in ended:
                self._end_round(r)
        for r, v in zip(desc.ar_reqs, vals[ns:].tolist()):
            self._after_ar(r, v)
        for r, ph in zip(desc.reqs, phases):
            if r.phase != ph:   # moved on above
                continue
            if ph == "prefill" and self.cfg.mode == "diffusion":   # the prompt is cached: open the answer
                self._open_diffusion_answer(r)
            elif ph == "refresh":
                self._sync(r)

    def _commit_events(self, desc: StepDesc, vals: np.ndarray) -> None:
        mask, ms = self.cfg.tags.mask, self.cfg.max_spans
        for sid in desc.span_ids.tolist():
            r = self._by_slot[sid // ms]
            s = r.round_spans[sid % ms]
            first, n = desc.span_rows[sid]
            new = vals[first:first + n]
            hit = np.nonzero((s.toks == mask) & (new != mask))[0]
            if len(hit):
                self._emit(ev.SpanCommit(r.idx, r.stats.rounds, s.index, tuple((s.start + s.moff + hit).tolist()),
                                         tuple(new[hit].tolist())))
            s.toks = new.copy()

    # ---- request life cycle ------------------------------------------------------------------------------
    def _admit(self, r: _Request) -> None:
        cfg = self.cfg
        r.slot = self.free_slots.pop()
        r.seq = self.cache.add_sequence()
        self._pages_held += r.max_pages
        self._by_slot[r.slot] = r
        self.running.append(r)
        self._touch(r)
        n = len(r.prompt)
        r.toks = list(r.prompt)
        r.stats.seed = r.seed
        r.stats.method = "diffusion-full" if cfg.diffusion_attention == "full" else cfg.mode
        self.tokens[r.slot, :n] = torch.tensor(r.prompt, dtype=torch.int64).to(self.device)
        if cfg.mode == "diffusion":
            # ours: the answer is one span anchored on the prompt's last token (its hidden state predicts the
            # first mask), the rest of the prompt is prefilled causally; "full": no prefill at all
            r.prefill_len = 0 if cfg.diffusion_attention == "full" else n - 1
        else:
            r.prefill_len = n
        if r.prefill_len:
            self.cache.reserve(r.seq, r.prefill_len, slots=False)
            r.length = r.prefill_len
            r.phase = "prefill"
        else:
            self._open_diffusion_answer(r)

    def _finish(self, r: _Request, reason: str) -> None:
        r.stats.finish_reason = reason
        r.stats.answer_tokens = len(r.answer)
        r.result = GenerationResult(list(r.answer), list(r.toks), r.plans, r.spans_out, r.stats, r.pieces,
                                    self.cfg.answer_text)
        self.cache.free(r.seq)
        self._pages_held -= r.max_pages
        self.free_slots.append(r.slot)
        del self._by_slot[r.slot]
        self.running.remove(r)
        r.phase = "done"
        self._touch(r)
        self._emit(ev.RequestFinished(r.idx, r.result))

    def _open_diffusion_answer(self, r: _Request) -> None:
        """``mode="diffusion"``: one span of ``diffusion_len`` masks after the prompt (``"full"``: the span is
        the whole sequence, so every query sees prompt and answer)."""
        cfg = self.cfg
        n = len(r.prompt)
        L = min(cfg.diffusion_len or r.budget, r.budget)   # the budget caps the canvas too
        start = 0 if cfg.diffusion_attention == "full" else n - 1
        self.cache.reserve(r.seq, n + L - r.length, slots=False)
        r.length = n + L
        self.tokens[r.slot, n:n + L] = cfg.tags.mask
        r.toks += [cfg.tags.mask] * L
        r.prefix = start
        r.round_spans = [_Span(start, n + L - start, n - start, L, r.slot * cfg.max_spans, 0,
                               np.full(L, cfg.tags.mask, dtype=np.int64))]
        r.terminator = "length" if L < (cfg.diffusion_len or 0) else "eos"
        r.stats.rounds = r.stats.spans = 1
        self._reset_spans(r)
        r.phase = "diffusion"
        self._touch(r)
        self._emit(ev.RoundStarted(r.idx, 1, (), (L,), (n,)))

    def _reset_spans(self, r: _Request) -> None:
        for s in r.round_spans:
            self._left[s.sid] = s.masks
        # int32 on the device; every count >= the longest span commits the same way (one token per step at least)
        steps = min(max(1, int(self.cfg.steps_ratio * max(s.masks for s in r.round_spans))), 2**31 - 1)
        self.state.reset([s.sid for s in r.round_spans], [s.masks for s in r.round_spans],
                         [steps] * len(r.round_spans))

    def _end_plan(self, r: _Request, terminator: str) -> None:
        """The round's plan is complete (terminator ``sync``/``eos``/``length``): open its spans."""
        cfg, tags = self.cfg, self.cfg.tags
        r.plans.append(list(r.plan))
        r.terminator = terminator
        if cfg.mode == "ar":
            self._add_answer(r, r.plan)
            self._finish(r, terminator)
            return
        entries, errors = parse_plan(r.plan, tags, length_scale=cfg.length_scale, max_span_len=cfg.max_span_len,
                                     max_spans=cfg.max_spans)
        r.stats.plan_errors.extend(f"round {r.stats.rounds}: {e}" for e in errors)
        if cfg.answer_text == "reference":   # the reference keeps the plan's text outside its entries
            self._add_answer(r, text_outside_entries(r.plan, tags))
        room = r.budget - r.new_tokens
        fitted = []
        for e in entries:  # spans that do not fit in the budget are shortened, then dropped
            L = e.length
            if room - 2 < 1:
                r.stats.plan_errors.append(f"round {r.stats.rounds}: span dropped (budget)")
                r.terminator = "length"
                continue
            if L + 2 > room:
                r.stats.plan_errors.append(f"round {r.stats.rounds}: span of {L} shortened to {room - 2} (budget)")
                L = room - 2
                r.terminator = "length"
            fitted.append(L)
            room -= L + 2
        if not fitted:
            if cfg.answer_text == "spans":   # no usable plan entry: the round's AR text is the answer
                self._add_answer(r, r.plan)
            self._finish(r, r.terminator if r.terminator in ("length", "no_token") else "no_plan")
            return
        r.prefix = r.length
        template, spans, pos = [], [], r.length
        for j, L in enumerate(fitted):
            template += [tags.async_open] + [tags.mask] * L + [tags.async_close]
            spans.append(_Span(pos, L + 2, 1, L, r.slot * cfg.max_spans + j, j, np.full(L, tags.mask, np.int64)))
            pos += L + 2
        self.cache.reserve(r.seq, len(template), slots=False)
        self.tokens[r.slot, r.length:pos] = torch.tensor(template, dtype=torch.int64).to(self.device)
        r.toks += template
        r.length = pos
        r.round_spans = spans
        r.stats.rounds += 1
        r.stats.spans += len(spans)
        self._reset_spans(r)
        r.phase = "diffusion"
        self._touch(r)
        self._emit(ev.RoundStarted(r.idx, r.stats.rounds, tuple(r.plan), tuple(fitted),
                                   tuple(s.start + s.moff for s in spans)))
        r.plan = []

    def _add_answer(self, r: _Request, toks) -> None:
        piece = [t for t in toks if t not in self._specials]
        if piece:
            r.answer.extend(piece)
            r.pieces.append(piece)

    def _end_round(self, r: _Request) -> None:
        """Every span of the round is finished: collect them, then refresh / ``<sync/>`` (next round) or finish."""
        cfg, tags = self.cfg, self.cfg.tags
        spans = [s.toks.tolist() for s in r.round_spans]
        r.spans_out.append(spans)
        r.stats.span_tokens += sum(len(s) for s in spans)
        if cfg.mode == "diffusion":
            ans = spans[0][:spans[0].index(tags.eos)] if tags.eos in spans[0] else spans[0]
            self._add_answer(r, ans)
        else:
            for s in spans:
                self._add_answer(r, s)
        self._emit(ev.RoundFinished(r.idx, r.stats.rounds, tuple(r.answer)))
        if r.terminator != "sync" or cfg.mode == "diffusion":
            self._finish(r, r.terminator)
        elif r.stats.rounds >= cfg.max_rounds:
            self._finish(r, "max_rounds")
        elif r.budget - r.new_tokens < 2:
            self._finish(r, "length")
        elif cfg.refresh_spans:
            r.phase = "refresh"
            self._touch(r)
        else:
            self._sync(r)

    def _sync(self, r: _Request) -> None:
        """Append ``<sync/>``: its forward (the next plan step) sees every finished span."""
        self.tokens[r.slot, r.length] = self.cfg.tags.sync
        r.toks.append(self.cfg.tags.sync)
        self.cache.reserve(r.seq, 1, slots=False)
        r.length += 1
        r.phase = "plan"
        self._touch(r)

    def _forced_token(self, r: _Request):
        f = r.forced
        k = r.stats.rounds if self.cfg.mode != "ar" else 0
        if f is None or k >= len(f) or len(r.plan) >= len(f[k]):
            return None
        return int(f[k][len(r.plan)])

    def _after_ar(self, r: _Request, tok: int) -> None:
        tags = self.cfg.tags
        if r.phase == "prefill":
            r.phase = "plan"
        self._touch(r)
        if tok < 0:   # token_confidence found no usable logit in the row (all suppressed, -inf or NaN)
            r.stats.plan_errors.append(f"round {r.stats.rounds + 1}: no valid AR token")
            self._end_plan(r, "no_token")
            return
        if tok == tags.eos or (tok == tags.sync and self.cfg.mode != "ar"):
            self._end_plan(r, "eos" if tok == tags.eos else "sync")
            return
        self.cache.reserve(r.seq, 1, slots=False)
        r.length += 1
        r.plan.append(tok)
        r.toks.append(tok)
        r.stats.plan_tokens += 1
        if self._events is not None:
            self._events.append(ev.PlanToken(r.idx, r.stats.rounds + 1, r.length - 1, tok))
        if r.length - len(r.prompt) >= r.budget:   # the budget is spent: no forward of a token it cannot keep
            self._end_plan(r, "length")


def generate(model, prompts, config=None, *, forced_plans=None, seeds=None, on_event=None, max_batch: int = 8,
             backend: str | None = None, on_step=None, cuda_graphs: bool = False, static_step: bool | None = None,
             buckets=None) -> list[GenerationResult]:
    """Functional form of :meth:`Decoder.generate` (arguments as :class:`Decoder` and :meth:`Decoder.generate`)."""
    return Decoder(model, config, max_batch=max_batch, backend=backend, on_step=on_step, cuda_graphs=cuda_graphs,
                   static_step=static_step, buckets=buckets).generate(prompts, forced_plans, seeds=seeds,
                                                                       on_event=on_event)
