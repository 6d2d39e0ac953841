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

Forced plans (``forced_plans``) replace the sampled plan tokens (the model still forwards them, so the
critical path and the cache are those of a real plan): random-weight models then run multi-span,
multi-round generations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..integrations.transformers import StepContext, enable, forward_hidden, is_enabled, model_geometry
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


@dataclass
class _Span:
    start: int          # position of the span's first token (<async>, or the prompt's last token in diffusion)
    length: int         # tokens the span forwards (tags included)
    masks: int          # mask positions: offsets 1..masks
    sid: int            # span id in the SpanState
    active: bool = True


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


class Decoder:
    """Batched planned-diffusion / AR / diffusion decoding of a transformers model on pd_kernels.

    Args:
        model: a transformers causal LM (Qwen2/Llama family); :func:`~pd_kernels.integrations.transformers.enable`
            is called on it if needed (its attention then only runs inside decoder steps).
        config: :class:`DecodeConfig`.
        max_batch: most requests decoded together; further prompts wait and join as others finish.
        backend: pd_kernels backend of every op (``None``: the current default, see :func:`pd_kernels.use_backend`).
        on_step: optional ``callable(decoder)`` run after every step (the demo's live view).
    """

    def __init__(self, model, config: DecodeConfig | None = None, *, max_batch: int = 8, backend: str | None = None,
                 on_step=None):
        self.model = model if is_enabled(model) else enable(model)
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

    # ------------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], forced_plans: list | None = None) -> list[GenerationResult]:
        """Decode every prompt (lists of token ids). ``forced_plans[i]``: ``None`` or a list of rounds, each
        the AR tokens to force in that round (usually ending with ``<sync/>`` or EOS, see
        :func:`~pd_kernels.decoder.make_plan`); rounds past the list, or tokens past a round's list, are sampled.
        Returns one :class:`GenerationResult` per prompt, in order."""
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
        self.cache = PagedKVCache(self.geo["num_layers"], self.geo["num_kv_heads"], self.geo["head_dim"],
                                  cfg.num_pages or nb * pages_per_seq, ps, max_seqs=nb,
                                  max_pages_per_seq=pages_per_seq, dtype=self.dtype, device=self.device)
        self.tokens = torch.full((nb, self.cap), cfg.tags.mask, dtype=torch.int64, device=self.device)
        self.tokens_flat = self.tokens.view(-1)
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
                self.cache.reserve(r.seq, r.prefill_len)
                r.length = r.prefill_len
                r.phase = "prefill"
            else:
                self._open_diffusion_answer(r)
        else:
            r.prefill_len = n
            self.cache.reserve(r.seq, n)
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
        self.cache.reserve(r.seq, L + 1)
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
        self.cache.reserve(r.seq, len(template))
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
            self.cache.reserve(r.seq, 1)
            r.length += 1
            r.phase = "plan"
            return
        self._finish(r, r.terminator)

    # ---- one step ------------------------------------------------------------------------------------
    def _step(self) -> None:
        from .. import SeqQueries, SpanLayout, commit_spans, token_confidence

        cfg, tags = self.cfg, self.cfg.tags
        t0 = time.perf_counter()
        batch = list(self.running)
        seqs, in_idx, slots = [], [], []
        ar_reqs, ar_rows, ar_dst, ar_forced, ar_val = [], [], [], [], []
        sp_rows, sp_dst, sp_span = [], [], []
        q0 = 0
        cap, ps = self.cap, self.cache.page_size
        for r in batch:
            pages = self.cache.pages(r.seq)
            base = r.slot * cap
            if r.phase in ("prefill", "plan"):
                start, n = (0, r.prefill_len) if r.phase == "prefill" else (r.length - 1, 1)
                seqs.append(SeqQueries.causal(start, n))
                pos = list(range(start, start + n))
                if not (r.phase == "prefill" and cfg.mode == "diffusion"):
                    ar_reqs.append(r)
                    ar_rows.append(q0 + n - 1)
                    ar_dst.append(base + start + n)
                    f = self._forced_token(r)
                    ar_forced.append(0 if f is None else 1)
                    ar_val.append(0 if f is None else f)
            else:
                spans = r.round_spans
                seqs.append(SeqQueries.spans(r.prefix, [s.length for s in spans], [s.active for s in spans],
                                             mode="pd-da" if cfg.mode == "pd-da" else "pd"))
                pos, q = [], q0
                for s in spans:
                    if not s.active:
                        continue
                    pos.extend(range(s.start, s.start + s.length))
                    sp_rows.extend(range(q, q + s.masks))
                    sp_dst.extend(range(base + s.start + 1, base + s.start + 1 + s.masks))
                    sp_span.extend([s.sid] * s.masks)
                    q += s.length
            in_idx.extend(base + p for p in pos)
            slots.extend(pages[p // ps] * ps + p % ps for p in pos)
            q0 += len(pos)
        layout = SpanLayout.build(seqs, self.device)
        # every host-built index of the step in one host-to-device copy
        nq, na, ns = len(in_idx), len(ar_rows), len(sp_rows)
        host = torch.tensor(in_idx + slots + ar_rows + sp_rows + ar_dst + ar_forced + ar_val + sp_dst + sp_span,
                            dtype=torch.int64)
        dev = host.to(self.device)
        o = 0

        def take(n):
            nonlocal o
            o += n
            return dev[o - n:o]

        input_idx, slot_mapping, rows = take(nq), take(nq), take(na + ns)
        a_dst, a_forced, a_val, s_dst = take(na), take(na), take(na), take(ns)
        s_span = take(ns).to(torch.int32)
        input_ids = self.tokens_flat.index_select(0, input_idx)
        block_table = self.cache.block_tables([r.seq for r in batch])
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
                commit_spans(tok[na:], conf[na:], s_dst, s_span, self.tokens_flat, self.state, policy=cfg.policy,
                             tau=cfg.tau, mask_id=tags.mask, backend=self.backend)
                read.append(self.state.masks_left.to(torch.int64))
        host_read = torch.cat(read).tolist() if read else []  # the step's one device-to-host read
        self.step_index += 1
        dt = time.perf_counter() - t0
        ar_vals = host_read[:na]
        masks_left = host_read[na:]
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
                    s.active = s.active and masks_left[s.sid] > 0
                if not any(s.active for s in r.round_spans):
                    self._end_round(r)

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
        self.cache.reserve(r.seq, 1)
        r.length += 1
        r.plan.append(tok)
        r.stats.plan_tokens += 1


def generate(model, prompts: list[list[int]], config: DecodeConfig | None = None, *, forced_plans=None,
             max_batch: int = 8, backend: str | None = None, on_step=None) -> list[GenerationResult]:
    """Functional form of :meth:`Decoder.generate`."""
    return Decoder(model, config, max_batch=max_batch, backend=backend, on_step=on_step).generate(
        prompts, forced_plans)
