"""The planned-diffusion decoder loop (SPEC sections 3-6) on the pd_kernels ops, batched.

One :class:`Decoder` step is one forward pass of the model over the packed queries of every running
request, whatever its phase:

* ``prefill``   - the prompt, causal (one step);
* ``plan``      - one AR token (a plan token, the AR baseline's next token, or the ``<sync/>`` tag), causal;
* ``diffusion`` - every token of every unfinished span of the request's current round (PD / PD-DA).

A step: build the :class:`~pd_kernels.SpanLayout` and the step's index tensors on the host (two
host-to-device copies), run the model (each attention layer: :func:`~pd_kernels.paged_kv_write` then
:func:`~pd_kernels.span_attention`), apply the LM head to the needed rows only (the last AR token; for a
span, the rows that predict its masks under the Dream shift), :func:`~pd_kernels.token_confidence` on
those rows, write AR tokens into the device token buffer and :func:`~pd_kernels.commit_spans` the span
rows in place, then **one** device-to-host read (the sampled AR tokens and every span's ``masks_left``)
that drives the host bookkeeping (next layout, plan parsing, finished spans and requests).

Static step and CUDA graphs (``Decoder(..., cuda_graphs=True)``; ``static_step=True`` alone runs the same
step eagerly, also on the CPU): the step's device work runs from fixed buffers of a *bucket* and is captured
in one CUDA graph per bucket; see :class:`Decoder` for what is captured and what is not.

Forced plans (``forced_plans``) replace the sampled plan tokens (the model still forwards them, so the
critical path and the cache are those of a real plan): random-weight models then run multi-span,
multi-round generations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .._checks import debug_enabled
from ..integrations.transformers import (StepContext, check_model, enabled, forward_hidden, graph_capture_issues,
                                          is_enabled, model_geometry)
from .config import DecodeConfig
from .plan import parse_plan
from .stats import RequestStats


@dataclass
class GenerationResult:
    """Output of one request.

    Attributes:
        answer: answer token ids (spans in order with tags, ``[PAD]``, EOS and MASK removed; for ``ar`` the
            tokens before EOS; for ``diffusion`` the answer cut at the first EOS; a plan with no usable
            entry contributes its own AR tokens).
        sequence: the whole final sequence (prompt, plans, spans with tags, ``<sync/>`` tags); plan
            terminators are not part of it.
        plans: AR tokens of each round (terminator excluded).
        spans: per round, per span, the span's tokens at its mask positions.
        stats: :class:`RequestStats`.
    """
    answer: list
    sequence: list
    plans: list
    spans: list
    stats: RequestStats

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason


def _span_rows(span_ids, num_spans: int, first_row: int) -> list[int]:
    """``span_rows`` of :func:`~pd_kernels.commit_spans`, flattened (``[2 S]``: first row, row count per span
    id) for step rows whose span ids are ``span_ids``, numbered from ``first_row``. Each span's rows are
    contiguous in a step (one run of its mask positions)."""
    out = [0] * (2 * num_spans)
    for k, sid in enumerate(span_ids):
        if out[2 * sid + 1] == 0:
            out[2 * sid] = first_row + k
        elif out[2 * sid] + out[2 * sid + 1] != first_row + k:
            raise RuntimeError(f"rows of span {sid} are not contiguous in the step")
        out[2 * sid + 1] += 1
    return out


@dataclass
class _Span:
    start: int          # position of the span's first token (<async>, or the prompt's last token in diffusion)
    length: int         # tokens the span forwards (tags included)
    masks: int          # mask positions: offsets 1..masks
    sid: int            # span id in the SpanState
    active: bool = True
    left: int = -1      # masks_left after the last step (-1: no step yet)


@dataclass
class _Request:
    idx: int
    prompt: list
    forced: list | None
    slot: int = -1
    seq: int = -1
    phase: str = "prefill"
    length: int = 0                    # tokens in the sequence (= reserved cache positions)
    prefill_len: int = 0
    plan: list = field(default_factory=list)       # AR tokens of the current round
    plans: list = field(default_factory=list)
    round_spans: list = field(default_factory=list)  # list[_Span] of the current round
    prefix: int = 0
    terminator: str = ""
    spans_out: list = field(default_factory=list)
    answer: list = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    result: GenerationResult | None = None

    @property
    def new_tokens(self) -> int:
        return self.length - len(self.prompt)


DEFAULT_BUCKETS = tuple(16 << i for i in range(8))  # 16 .. 2048 packed queries (and LM-head rows)


class _Bucket:
    """Fixed device buffers of one static-step bucket (``Q`` packed query rows, ``R`` LM-head rows), the
    :class:`~pd_kernels.StaticSpanLayout` of its attention, and its CUDA graph once captured.

    ``idx`` (int64, device) holds every host-built index of a step, refilled by one host-to-device copy from
    ``staging`` (pinned on CUDA): ``in_idx [Q]`` (flat token-buffer index of each packed query), ``slots [Q]``
    (cache slot, -1 = padding), then per LM-head row ``rows [R]`` (packed query row), ``ar_dst [R]``,
    ``forced [R]``, ``val [R]``, ``s_dst [R]``, then ``span_rows [2 S]`` (per span id: first LM-head row,
    row count) and ``offset [1]`` (the RNG offset).
    Outputs: ``tok``, ``conf`` ``[R]``, ``read [R + S]`` (each row's AR value, then every span's
    ``masks_left``: what the host reads after the step)."""

    def __init__(self, Q: int, R: int, num_spans: int, layout, device):
        self.Q, self.R = Q, R
        S = num_spans
        n = 2 * Q + 5 * R + 2 * S + 1
        self.idx = torch.zeros(n, dtype=torch.int64, device=device)
        self.staging = torch.zeros(n, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.host = self.staging.numpy()
        v = [self.idx[0:Q], self.idx[Q:2 * Q]] + [self.idx[2 * Q + i * R:2 * Q + (i + 1) * R] for i in range(5)]
        self.in_idx, self.slots, self.rows, self.ar_dst, self.forced, self.val, self.s_dst = v
        self.span_rows = self.idx[2 * Q + 5 * R:2 * Q + 5 * R + 2 * S].view(S, 2)
        self.offset = self.idx[2 * Q + 5 * R + 2 * S:]
        self.span_rows32 = torch.zeros(S, 2, dtype=torch.int32, device=device)
        self.tok = torch.zeros(R, dtype=torch.int64, device=device)
        self.conf = torch.zeros(R, dtype=torch.float32, device=device)
        self.committed = torch.zeros(num_spans, dtype=torch.int32, device=device)
        self.all_done = torch.zeros(1, dtype=torch.bool, device=device)
        self.read = torch.zeros(R + num_spans, dtype=torch.int64, device=device)
        self.layout = layout
        self.calls = 0
        self.graph = None


class Decoder:
    """Batched planned-diffusion / AR / diffusion decoding of a transformers model on pd_kernels.

    Args:
        model: a transformers causal LM (families in
            :data:`~pd_kernels.integrations.transformers.VERIFIED_MODEL_TYPES`; a feature the kernels do not
            implement raises ``UnsupportedModelError`` here). :meth:`generate` switches it to pd_kernels
            attention for the call and restores its own attention afterwards.
        config: :class:`DecodeConfig`.
        max_batch: most requests decoded together; further prompts wait and join as others finish.
        backend: pd_kernels backend of every op (``None``: the current default, see :func:`pd_kernels.use_backend`).
        on_step: optional ``callable(decoder)`` run after every step (the demo's live view).
        cuda_graphs: run each step's device work as a CUDA graph, captured once per bucket (CUDA models
            only: a model on another device raises ``ValueError``). Implies ``static_step``.
        static_step: run each step from the fixed buffers of a bucket (the capturable step) without
            capturing it (default: ``cuda_graphs``). Same tokens as the default dynamic step; works on CPU.
        buckets: ascending bucket sizes, used for both the packed query count and the LM-head row count
            (default 16, 32, ..., 2048). A step is padded up to the smallest bucket that holds it.

    Dynamic step (default): every step builds a :class:`~pd_kernels.SpanLayout` and index tensors of
    exactly its size (two host-to-device copies), runs the model, the LM head on the needed rows,
    :func:`~pd_kernels.token_confidence`, the AR token write and :func:`~pd_kernels.commit_spans`, then one
    device-to-host read.

    Static step (``static_step=True`` / ``cuda_graphs=True``): a step with ``nq`` packed queries and ``nr``
    LM-head rows (one per AR request, one per mask position of every active span) uses the bucket
    ``(Q, R)`` = (smallest bucket >= ``nq``, smallest bucket >= ``max(nr, 1)``), with ``max_batch`` sequences
    and ``max_batch * max_spans`` segments. Per bucket: a :class:`~pd_kernels.StaticSpanLayout` (layout
    sequence ``b`` = cache row ``b``, so the cache's own block table is the graph's block table) and fixed
    index / output buffers (:class:`_Bucket`). Padding: query rows past ``nq`` read the token buffer's
    scratch area (``buckets[-1]`` elements past the ``[max_batch, cap]`` rows that always hold ``PAD``,
    never ``MASK``), have slot ``-1`` (:func:`~pd_kernels.paged_kv_write` skips them) and are empty layout
    rows (attention output 0). LM-head rows past ``nr``, and the unused destination of real rows (an AR row
    has no commit destination, a span row no AR destination), point at scratch element ``k`` for row ``k``
    (destinations stay distinct): the AR write stores ``PAD`` there and :func:`~pd_kernels.commit_spans`
    ignores those rows (in no span's ``span_rows`` range; their destination is not ``MASK`` either). Row order
    (AR rows, then span rows, then padding) is the dynamic step's, so the counter-based RNG draws the same
    noise; the RNG offset is a one-element device tensor refilled with the step's indices.

    **Captured** in the CUDA graph of a bucket (one graph per bucket; all share one memory pool): the token
    gather (``tokens[in_idx]``), the whole model forward (embeddings, RoPE, projections, MLPs, norms, and
    in each layer :func:`~pd_kernels.paged_kv_write` + :func:`~pd_kernels.span_attention` on the static
    layout), the LM head on the ``R`` rows, :func:`~pd_kernels.token_confidence` (``out=``, device RNG
    offset), the AR token write (``index_copy_``), :func:`~pd_kernels.commit_spans` (``out=``) and the copy
    of the AR values and every span's ``masks_left`` into the read buffer.

    **Not captured** (host, between replays): admission, plan parsing, span/round bookkeeping, and the
    cache ``reserve`` / token-template / ``SpanState.reset`` writes of the host loop (as in the dynamic
    step); choosing the bucket; packing the step's indices into the pinned staging buffer and its one
    non-blocking host-to-device copy; :meth:`~pd_kernels.StaticSpanLayout.update` (host packing + one
    non-blocking copy); the step's one device-to-host read of ``read`` (a sync: the host needs the AR tokens
    and ``masks_left`` to plan the next step; it also guarantees the staging buffer is free again). The first
    step of a bucket runs eagerly (warm-up: Triton compilation, cuBLAS handles, and the attention's split-K
    workspace, sized by the bucket), the second captures the graph (capture runs nothing)
    and replays it, later ones replay. ``graph_counts``
    counts ``captured`` graphs, ``replayed`` steps, ``static_eager`` steps and ``dynamic`` (overflow) steps.

    Overflow: a step with more packed queries than the largest bucket (e.g. the prefill of a long prompt)
    runs on the dynamic path; buckets never grow (a capture per new size would be unbounded).

    The buffers the graphs point at (paged cache, token buffer, span state) are kept across
    :meth:`generate` calls while their geometry (batch, sequence capacity, pages) is unchanged, so graphs
    captured in one call replay in the next; a new geometry drops them.
    """

    def __init__(self, model, config: DecodeConfig | None = None, *, max_batch: int = 8, backend: str | None = None,
                 on_step=None, cuda_graphs: bool = False, static_step: bool | None = None, buckets=None):
        if not is_enabled(model):  # refuse what pd_kernels cannot run; generate() enables it and restores it
            check_model(model)
        self.model = model
        self.cfg = config or DecodeConfig()
        self.max_batch = max_batch
        self.backend = backend
        self.on_step = on_step
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.geo = model_geometry(model)
        if self.cfg.tags.max_id() >= self.geo["vocab_size"]:
            raise ValueError(f"control-tag ids {self.cfg.tags} do not fit the model's vocabulary "
                             f"({self.geo['vocab_size']}): pass DecodeConfig(tags=ControlTags(...))")
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
        self.graph_counts = {"captured": 0, "replayed": 0, "static_eager": 0, "dynamic": 0}
        self._arena_key = None
        self._buckets: dict = {}
        self._graph_pool = None

    # ------------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], forced_plans: list | None = None) -> list[GenerationResult]:
        """Decode every prompt (lists of token ids). ``forced_plans[i]``: ``None`` or a list of rounds, each
        the AR tokens to force in that round (usually ending with ``<sync/>`` or EOS, see
        :func:`~pd_kernels.decoder.make_plan`); rounds past the list, or tokens past a round's list, are sampled.
        Returns one :class:`GenerationResult` per prompt, in order. The model runs on pd_kernels attention
        only during the call: its own attention implementation is restored when it returns or raises."""
        with enabled(self.model):
            return self._generate(prompts, forced_plans)

    def _generate(self, prompts: list[list[int]], forced_plans: list | None = None) -> list[GenerationResult]:
        from .. import PagedKVCache, SpanState

        cfg = self.cfg
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, each with at least one token")
        forced_plans = forced_plans or [None] * len(prompts)
        if len(forced_plans) != len(prompts):
            raise ValueError(f"{len(forced_plans)} forced plans for {len(prompts)} prompts")
        self.reqs = [_Request(i, [int(t) for t in p], f) for i, (p, f) in enumerate(zip(prompts, forced_plans))]
        extra = max(cfg.max_new_tokens, cfg.answer_len + 1 if cfg.mode == "diffusion" else 0)
        self.cap = max(len(p) for p in prompts) + extra + 4
        nb = min(self.max_batch, len(prompts))
        ps = cfg.page_size
        pages_per_seq = -(-self.cap // ps) + 1
        num_pages = cfg.num_pages or nb * pages_per_seq
        key = (nb, self.cap, num_pages, ps, pages_per_seq, cfg.max_spans, cfg.tags.mask, cfg.tags.pad, self.buckets)
        if (self.static_step and key == self._arena_key and not self.cache.sequences
                and self.cache.num_free_pages == self.cache.num_pages):
            # same geometry: keep the buffers the captured graphs point at, reset their contents
            self._tok_store[:nb * self.cap].fill_(cfg.tags.mask)
            for t in (self.state.masks_left, self.state.step, self.state.deferred):
                t.zero_()
            self.state.num_steps.fill_(1)
        else:
            self._buckets = {}  # graphs and buffers of the previous geometry
            self._arena_key = key
            self.cache = PagedKVCache(self.geo["num_layers"], self.geo["num_kv_heads"], self.geo["head_dim"],
                                      num_pages, ps, max_seqs=nb, max_pages_per_seq=pages_per_seq,
                                      dtype=self.dtype, device=self.device)
            # [nb, cap] token rows, then a scratch area (always PAD, never MASK) of one element per LM-head row
            # of the largest bucket: the static step's padding rows gather from it and write into it (row k
            # into element k: destinations stay distinct)
            n_scratch = self.buckets[-1] if self.static_step else 1
            self._tok_store = torch.full((nb * self.cap + n_scratch,), cfg.tags.mask, dtype=torch.int64,
                                         device=self.device)
            self._tok_store[nb * self.cap:] = cfg.tags.pad
            self.tokens = self._tok_store[:nb * self.cap].view(nb, self.cap)
            self.tokens_flat = self._tok_store
            self.scratch = nb * self.cap
            self.state = SpanState.new(nb * cfg.max_spans, self.device)
            self.suppress = torch.tensor([cfg.tags.mask], dtype=torch.int64, device=self.device)
        self.free_slots = list(range(nb - 1, -1, -1))
        self.queue = list(self.reqs)
        self.running: list[_Request] = []
        self.step_index = 0
        with torch.no_grad():
            while self.queue or self.running:
                while self.queue and self.free_slots:
                    self._admit(self.queue.pop(0))
                self._step()
                if self.on_step is not None:
                    self.on_step(self)
        return [r.result for r in self.reqs]

    # ---- request life cycle ------------------------------------------------------------------------
    def _admit(self, r: _Request) -> None:
        r.slot = self.free_slots.pop()
        r.seq = self.cache.add_sequence()
        self.running.append(r)
        n = len(r.prompt)
        self.tokens[r.slot, :n] = torch.tensor(r.prompt, dtype=torch.int64).to(self.device)
        if self.cfg.mode == "diffusion":
            # the answer is one span anchored on the prompt's last token (its hidden state predicts the first
            # mask); the rest of the prompt is prefilled causally
            r.prefill_len = n - 1
            if r.prefill_len:
                self.cache.reserve(r.seq, r.prefill_len, slots=False)
                r.length = r.prefill_len
                r.phase = "prefill"
            else:
                self._open_diffusion_answer(r)
        else:
            r.prefill_len = n
            self.cache.reserve(r.seq, n, slots=False)
            r.length = n
            r.phase = "prefill"

    def _finish(self, r: _Request, reason: str) -> None:
        r.stats.finish_reason = reason
        r.stats.answer_tokens = len(r.answer)
        seq = self.tokens[r.slot, :r.length].tolist()
        r.result = GenerationResult(list(r.answer), seq, r.plans, r.spans_out, r.stats)
        self.cache.free(r.seq)
        self.free_slots.append(r.slot)
        self.running.remove(r)
        r.phase = "done"

    def _open_diffusion_answer(self, r: _Request) -> None:
        cfg = self.cfg
        n = len(r.prompt)
        L = cfg.answer_len
        start = n - 1
        self.cache.reserve(r.seq, L + 1, slots=False)
        r.length = n + L
        self.tokens[r.slot, n:n + L] = cfg.tags.mask
        r.prefix = start
        r.round_spans = [_Span(start, L + 1, L, r.slot * cfg.max_spans)]
        r.terminator = "eos"
        r.stats.rounds = 1
        r.stats.spans = 1
        self._reset_spans(r)
        r.phase = "diffusion"

    def _reset_spans(self, r: _Request) -> None:
        steps = max(1, int(self.cfg.steps_ratio * max(s.masks for s in r.round_spans)))
        self.state.reset([s.sid for s in r.round_spans], [s.masks for s in r.round_spans],
                         [steps] * len(r.round_spans))

    def _end_plan(self, r: _Request, terminator: str) -> None:
        """The round's plan is complete (terminator ``sync``/``eos``/``length``): open its spans."""
        cfg, tags = self.cfg, self.cfg.tags
        r.plans.append(list(r.plan))
        r.terminator = terminator
        if cfg.mode == "ar":
            r.answer.extend(t for t in r.plan if t not in tags.specials)
            self._finish(r, terminator)
            return
        entries, errors = parse_plan(r.plan, tags, length_scale=cfg.length_scale, max_span_len=cfg.max_span_len,
                                     max_spans=cfg.max_spans)
        r.stats.plan_errors.extend(f"round {r.stats.rounds}: {e}" for e in errors)
        lens = [e.length for e in entries]
        room = cfg.max_new_tokens - r.new_tokens
        fitted = []
        for L in lens:  # spans that do not fit in max_new_tokens are shortened, then dropped
            if room - 2 < 1:
                r.stats.plan_errors.append(f"round {r.stats.rounds}: span dropped (max_new_tokens)")
                r.terminator = "length"
                continue
            if L + 2 > room:
                r.stats.plan_errors.append(f"round {r.stats.rounds}: span of {L} shortened to {room - 2} "
                                           f"(max_new_tokens)")
                L = room - 2
                r.terminator = "length"
            fitted.append(L)
            room -= L + 2
        if not fitted:
            # no usable plan entry: the round's AR text is the answer
            r.answer.extend(t for t in r.plan if t not in tags.specials)
            self._finish(r, "length" if r.terminator == "length" else "no_plan")
            return
        r.prefix = r.length
        template, spans, pos = [], [], r.length
        for j, L in enumerate(fitted):
            template += [tags.async_open] + [tags.mask] * L + [tags.async_close]
            spans.append(_Span(pos, L + 2, L, r.slot * cfg.max_spans + j))
            pos += L + 2
        self.cache.reserve(r.seq, len(template), slots=False)
        self.tokens[r.slot, r.length:pos] = torch.tensor(template, dtype=torch.int64).to(self.device)
        r.length = pos
        r.round_spans = spans
        r.stats.rounds += 1
        r.stats.spans += len(spans)
        self._reset_spans(r)
        r.phase = "diffusion"
        r.plan = []

    def _end_round(self, r: _Request) -> None:
        """Every span of the round is finished: collect them, then ``<sync/>`` (next round) or finish."""
        cfg, tags = self.cfg, self.cfg.tags
        row = self.tokens[r.slot, r.prefix:r.length].tolist()
        spans = [row[s.start - r.prefix + 1: s.start - r.prefix + 1 + s.masks] for s in r.round_spans]
        r.spans_out.append(spans)
        for s in spans:
            r.stats.span_tokens += len(s)
        if cfg.mode == "diffusion":
            ans = spans[0]
            if tags.eos in ans:
                ans = ans[:ans.index(tags.eos)]
            r.answer.extend(t for t in ans if t not in tags.specials)
            self._finish(r, "eos")
            return
        for s in spans:
            r.answer.extend(t for t in s if t not in tags.specials)
        if r.terminator == "sync":
            if r.stats.rounds >= cfg.max_rounds:
                self._finish(r, "max_rounds")
                return
            if cfg.max_new_tokens - r.new_tokens < 2:
                self._finish(r, "length")
                return
            self.tokens[r.slot, r.length] = tags.sync
            self.cache.reserve(r.seq, 1, slots=False)
            r.length += 1
            r.phase = "plan"
            return
        self._finish(r, r.terminator)

    # ---- one step ------------------------------------------------------------------------------------
    def _step(self) -> None:
        from .. import SeqQueries

        cfg = self.cfg
        t0 = time.perf_counter()
        batch = list(self.running)
        cap = self.cap
        # per request: its queries, their positions, its AR row and span rows (row numbers relative to the
        # request's first packed query)
        ents = []
        for r in batch:
            base = r.slot * cap
            ar, sp = None, []
            if r.phase in ("prefill", "plan"):
                start, n = (0, r.prefill_len) if r.phase == "prefill" else (r.length - 1, 1)
                sq = SeqQueries.causal(start, n)
                pos = list(range(start, start + n))
                if not (r.phase == "prefill" and cfg.mode == "diffusion"):
                    f = self._forced_token(r)
                    ar = (n - 1, base + start + n, 0 if f is None else 1, 0 if f is None else f)
            else:
                spans = r.round_spans
                sq = SeqQueries.spans(r.prefix, [s.length for s in spans], [s.active for s in spans],
                                      mode="pd-da" if cfg.mode == "pd-da" else "pd")
                pos, q = [], 0
                for s in spans:
                    if not s.active:
                        continue
                    pos.extend(range(s.start, s.start + s.length))
                    sp.extend((q + i, base + s.start + 1 + i, s.sid) for i in range(s.masks))
                    q += s.length
            ents.append((r, sq, pos, ar, sp))
        nq = sum(len(e[2]) for e in ents)
        if self.static_step and nq <= self.buckets[-1]:
            ar_vals, masks_left = self._run_static(ents, nq)
        else:
            ar_vals, masks_left = self._run_dynamic(ents)
        self.step_index += 1
        dt = time.perf_counter() - t0
        ar_reqs = [e[0] for e in ents if e[3] is not None]
        phases = [r.phase for r in batch]
        for r, phase in zip(batch, phases):
            r.stats.steps[phase] += 1
            r.stats.time_s[phase] += dt
        for r, v in zip(ar_reqs, ar_vals):
            self._after_ar(r, int(v))
        for r, phase in zip(batch, phases):
            if r.phase != phase:  # moved on in _after_ar: this step's masks_left is not about its new round
                continue
            if r.phase == "prefill":  # diffusion mode: the prompt is in the cache, open the answer
                self._open_diffusion_answer(r)
            elif r.phase == "diffusion":
                for s in r.round_spans:
                    left = masks_left[s.sid]
                    if s.active and left > 0 and 0 <= s.left <= left:
                        # nothing committed: every masked row had no valid token (commit_spans never commits
                        # a negative token) and the next step would see the same; the span ends with its masks
                        r.stats.plan_errors.append(f"round {r.stats.rounds}: span {s.sid % cfg.max_spans} stopped "
                                                   f"with {left} masks (no valid token)")
                        s.active = False
                    s.left = left
                    s.active = s.active and left > 0
                if not any(s.active for s in r.round_spans):
                    self._end_round(r)

    def _run_dynamic(self, ents) -> tuple[list, list]:
        """The dynamic step: layout and index tensors of exactly the step's size. Returns (AR values,
        masks_left of every span) from the step's one device-to-host read."""
        from .. import SpanLayout, commit_spans, token_confidence

        cfg = self.cfg
        cap, ps = self.cap, self.cache.page_size
        seqs, in_idx, slots = [], [], []
        ar_rows, ar_dst, ar_forced, ar_val = [], [], [], []
        sp_rows, sp_dst, sp_span = [], [], []
        q0 = 0
        for r, sq, pos, ar, sp in ents:
            pages = self.cache.pages(r.seq)
            base = r.slot * cap
            seqs.append(sq)
            if ar is not None:
                ar_rows.append(q0 + ar[0])
                ar_dst.append(ar[1])
                ar_forced.append(ar[2])
                ar_val.append(ar[3])
            for q, d, sid in sp:
                sp_rows.append(q0 + q)
                sp_dst.append(d)
                sp_span.append(sid)
            in_idx.extend(base + p for p in pos)
            slots.extend(pages[p // ps] * ps + p % ps for p in pos)
            q0 += len(pos)
        layout = SpanLayout.build(seqs, self.device)
        # every host-built index of the step in one host-to-device copy
        nq, na, ns = len(in_idx), len(ar_rows), len(sp_rows)
        S = self.state.num_spans
        host = torch.tensor(in_idx + slots + ar_rows + sp_rows + ar_dst + ar_forced + ar_val + sp_dst
                            + _span_rows(sp_span, S, 0), dtype=torch.int64)
        dev = host.to(self.device)
        o = 0

        def take(n):
            nonlocal o
            o += n
            return dev[o - n:o]

        input_idx, slot_mapping, rows = take(nq), take(nq), take(na + ns)
        a_dst, a_forced, a_val, s_dst = take(na), take(na), take(na), take(ns)
        span_rows = take(2 * S).to(torch.int32).view(S, 2)
        input_ids = self.tokens_flat.index_select(0, input_idx)
        block_table = self.cache.block_tables([r.seq for r, *_ in ents])
        ctx = StepContext(self.cache, layout, slot_mapping, block_table, self.backend)
        hidden = forward_hidden(self.model, input_ids, layout.q_pos[:nq], ctx)
        read = []
        if na + ns:
            logits = self.model.get_output_embeddings()(hidden.index_select(0, rows))
            tok, conf = token_confidence(logits, confidence=cfg.confidence, temperature=cfg.temperature,
                                         seed=cfg.seed, offset=self.step_index << 20, suppress_ids=self.suppress,
                                         backend=self.backend)
            if na:
                vals = torch.where(a_forced.bool(), a_val, tok[:na])
                self.tokens_flat.index_copy_(0, a_dst, vals)
                read.append(vals)
            if ns:
                commit_spans(tok[na:], conf[na:], s_dst, span_rows, self.tokens_flat, self.state, policy=cfg.policy,
                             tau=cfg.tau, mask_id=cfg.tags.mask, backend=self.backend)
                read.append(self.state.masks_left.to(torch.int64))
        host_read = torch.cat(read).tolist() if read else []  # the step's one device-to-host read
        self.graph_counts["dynamic"] += 1
        return host_read[:na], host_read[na:]

    # ---- the static (capturable) step ----------------------------------------------------------------------
    def _bucket(self, nq: int, nr: int) -> _Bucket:
        from .. import StaticSpanLayout

        Q = next(b for b in self.buckets if b >= nq)
        R = next(b for b in self.buckets if b >= max(nr, 1))  # nr <= nq: always found
        bk = self._buckets.get((Q, R))
        if bk is None:
            nb = self.tokens.shape[0]
            # max_kv: a sequence never holds more than cap tokens; it bounds the split-K workspace
            layout = StaticSpanLayout(Q, nb, self.device, group=self.geo["num_heads"] // self.geo["num_kv_heads"],
                                      max_segments=nb * self.cfg.max_spans, max_kv=self.cap)
            bk = self._buckets[(Q, R)] = _Bucket(Q, R, self.state.num_spans, layout, self.device)
        return bk

    def _run_static(self, ents, nq: int) -> tuple[list, list]:
        """The static step: pack the step into the fixed buffers of its bucket (one host-to-device copy plus
        the static layout's), run the captured graph (or the same work eagerly), one device-to-host read."""
        from .. import SeqQueries

        cap, ps = self.cap, self.cache.page_size
        nr = sum(e[3] is not None for e in ents) + sum(len(e[4]) for e in ents)
        bk = self._bucket(nq, nr)
        Q, R, h = bk.Q, bk.R, bk.host
        scratch, pad = self.scratch, self.cfg.tags.pad
        # packed queries in cache-row order: layout sequence b = row b of the cache's block table
        seqs = [SeqQueries.causal(0, 0)] * self.cache.max_seqs
        first = {}
        q0 = 0
        for r, sq, pos, _, _ in sorted(ents, key=lambda e: e[0].seq):
            seqs[r.seq] = sq
            pages = self.cache.pages(r.seq)
            base = r.slot * cap
            n = len(pos)
            h[q0:q0 + n] = [base + p for p in pos]
            h[Q + q0:Q + q0 + n] = [pages[p // ps] * ps + p % ps for p in pos]
            first[r.idx] = q0
            q0 += n
        h[nq:Q] = scratch   # padding queries: gather the scratch element (PAD) ...
        h[Q + nq:2 * Q] = -1  # ... and write no K/V
        rows, ar_dst, forced, val, s_dst = (h[2 * Q + i * R:2 * Q + (i + 1) * R] for i in range(5))
        spare = np.arange(scratch, scratch + R)  # row k's unused destination: scratch element k (distinct)
        rows[:], ar_dst[:], forced[:], val[:], s_dst[:] = 0, spare, 1, pad, spare
        k = 0
        for r, _, _, ar, _ in ents:   # AR rows first, then span rows, in batch order (the dynamic step's)
            if ar is not None:
                rows[k], ar_dst[k], forced[k], val[k] = first[r.idx] + ar[0], ar[1], ar[2], ar[3]
                k += 1
        na = k
        sids = []
        for r, _, _, _, sp in ents:
            for q, d, sid in sp:
                rows[k], s_dst[k] = first[r.idx] + q, d
                sids.append(sid)
                k += 1
        S = self.state.num_spans
        h[2 * Q + 5 * R:2 * Q + 5 * R + 2 * S] = _span_rows(sids, S, na)  # rows past them: in no span
        h[-1] = self.step_index << 20   # RNG offset
        # the staging buffer is free: the previous step ended with a device-to-host read (a sync)
        bk.idx.copy_(bk.staging, non_blocking=True)
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
        read = bk.read.tolist()  # the step's one device-to-host read
        return read[:na], read[R:]

    def _capture(self, bk: _Bucket) -> None:
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._static_body(bk)
        bk.graph = graph
        self.graph_counts["captured"] += 1

    def _static_body(self, bk: _Bucket) -> None:
        """The device work of a static step: fixed shapes, fixed buffers, no host sync (what is captured)."""
        from .. import commit_spans, token_confidence

        cfg = self.cfg
        input_ids = self.tokens_flat.index_select(0, bk.in_idx)
        ctx = StepContext(self.cache, bk.layout, bk.slots, self.cache.block_table, self.backend)
        hidden = forward_hidden(self.model, input_ids, bk.layout.q_pos, ctx)
        logits = self.model.get_output_embeddings()(hidden.index_select(0, bk.rows))
        token_confidence(logits, confidence=cfg.confidence, temperature=cfg.temperature, seed=cfg.seed,
                         offset=bk.offset, suppress_ids=self.suppress, out=(bk.tok, bk.conf), backend=self.backend)
        vals = torch.where(bk.forced.bool(), bk.val, bk.tok)
        self.tokens_flat.index_copy_(0, bk.ar_dst, vals)
        bk.span_rows32.copy_(bk.span_rows)
        commit_spans(bk.tok, bk.conf, bk.s_dst, bk.span_rows32, self.tokens_flat, self.state, policy=cfg.policy,
                     tau=cfg.tau, mask_id=cfg.tags.mask, out=(bk.committed, bk.all_done), backend=self.backend)
        bk.read[:bk.R].copy_(vals)
        bk.read[bk.R:].copy_(self.state.masks_left)

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
        if tok == tags.eos or (tok == tags.sync and self.cfg.mode != "ar"):
            self._end_plan(r, "eos" if tok == tags.eos else "sync")
            return
        if r.new_tokens >= self.cfg.max_new_tokens:
            self._end_plan(r, "length")
            return
        self.cache.reserve(r.seq, 1, slots=False)
        r.length += 1
        r.plan.append(tok)
        r.stats.plan_tokens += 1


def generate(model, prompts: list[list[int]], config: DecodeConfig | None = None, *, forced_plans=None,
             max_batch: int = 8, backend: str | None = None, on_step=None, cuda_graphs: bool = False,
             static_step: bool | None = None, buckets=None) -> list[GenerationResult]:
    """Functional form of :meth:`Decoder.generate` (arguments as :class:`Decoder`)."""
    return Decoder(model, config, max_batch=max_batch, backend=backend, on_step=on_step, cuda_graphs=cuda_graphs,
                   static_step=static_step, buckets=buckets).generate(prompts, forced_plans)
