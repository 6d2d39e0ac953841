"""The host side of the decoder loop: which requests run, what the next step does, and what its read means.

:class:`Scheduler` holds the requests of one call. Each step it

* :meth:`~Scheduler.admit` s waiting requests while a token-buffer row is free and the pages they may come to
  hold fit in the cache (so a running request never runs out of pages);
* :meth:`~Scheduler.schedule` s the step: a :class:`~pd_kernels.decoder.step.StepDesc` built from each running
  request's :class:`~pd_kernels.decoder.step.StepPart` (kept while its request does not change; the whole
  description is kept, only its RNG offsets advancing, while no request changes);
* :meth:`~Scheduler.update_from_output` s the requests from the step's read: span commits, finished spans and
  rounds, AR tokens and plans, new rounds (cache pages, a template of ``<async>`` MASK... ``</async>`` in the
  token buffer, ``SpanState.reset``), finished requests (their pages and row freed), and the stream events.

Request state itself lives in :mod:`pd_kernels.decoder.request`; the device buffers in
:class:`~pd_kernels.decoder.runner.Buffers`, which the scheduler writes only on a state change.
"""
from __future__ import annotations

import numpy as np
import torch

from ..layout import SeqQueries
from . import events as ev
from .config import DecodeConfig
from .plan import parse_plan, text_outside_entries
from .request import Request, Span
from .runner import Buffers
from .step import StepDesc, StepPart, describe

_NONE = np.zeros(0, dtype=np.int64)


class Scheduler:
    """The requests of one call (``reqs``, in prompt order): ``queue`` (waiting), ``running``. ``events``: a list
    the stream events are collected in (None: not collected); see :meth:`take_events`."""

    def __init__(self, cfg: DecodeConfig, reqs: list[Request], buffers: Buffers):
        self.cfg, self.reqs, self.buffers = cfg, reqs, buffers
        self.queue = list(reqs)
        self.running: list[Request] = []
        self.free_rows = list(range(buffers.tokens.shape[0] - 1, -1, -1))
        self.pages_held = 0   # pages the running requests may come to hold (admission keeps it <= num_pages)
        self.events: list | None = None
        self._by_row: dict = {}
        self._left = np.zeros(buffers.state.num_spans, dtype=np.int64)   # masks_left of each span at its last step
        self._specials = frozenset(cfg.tags.specials)
        self.desc: StepDesc | None = None
        self._dirty, self._gen = True, 0

    @property
    def done(self) -> bool:
        return not (self.queue or self.running)

    def take_events(self) -> list:
        out, self.events = self.events, ([] if self.events is not None else None)
        return out or []

    def _emit(self, event) -> None:
        if self.events is not None:
            self.events.append(event)

    def _touch(self, r: Request) -> None:
        """``r`` changed state: its part and the step description are rebuilt before the next step."""
        r.part = None
        self._dirty = True

    # ---- admission -----------------------------------------------------------------------------------------
    def admit(self) -> None:
        """Admit waiting requests, in order, while a row is free and their pages fit."""
        cache = self.buffers.cache
        while self.queue and self.free_rows and self.pages_held + self.queue[0].max_pages <= cache.num_pages:
            self._admit(self.queue.pop(0))
        if not self.running:   # cannot happen (the call checked that each request fits alone): no hang
            raise RuntimeError(f"no request could be admitted ({len(self.queue)} waiting)")

    def _admit(self, r: Request) -> None:
        cfg, b = self.cfg, self.buffers
        r.buffer_row = self.free_rows.pop()
        r.seq = b.cache.add_sequence()
        self.pages_held += r.max_pages
        self._by_row[r.buffer_row] = r
        self.running.append(r)
        self._touch(r)
        n = len(r.prompt)
        r.toks = list(r.prompt)
        r.stats.seed = r.seed
        r.stats.method = "diffusion-full" if cfg.diffusion_attention == "full" else cfg.mode
        b.tokens[r.buffer_row, :n] = torch.tensor(r.prompt, dtype=torch.int64).to(b.tokens.device)
        if cfg.mode == "diffusion":
            # ours: the answer is one span anchored on the prompt's last token (its hidden state predicts the
            # first mask), the rest of the prompt is prefilled causally; "full": no prefill at all
            r.prefill_len = 0 if cfg.diffusion_attention == "full" else n - 1
        else:
            r.prefill_len = n
        if r.prefill_len:
            b.cache.reserve(r.seq, r.prefill_len, slots=False)
            r.length = r.prefill_len
            r.phase = "prefill"
        else:
            self._open_diffusion_answer(r)

    # ---- the step description ------------------------------------------------------------------------------
    def schedule(self) -> StepDesc:
        """The step's description: the previous one with its RNG offsets advanced while no request changed
        state, else rebuilt from the requests' parts (each kept while its request does not change)."""
        if self.desc is not None and not self._dirty:
            self.desc.tick()
            return self.desc
        self._gen += 1
        entries = sorted(((r, self._part(r)) for r in self.running), key=lambda e: e[0].seq)
        self.desc = describe(entries, self.buffers.state.num_spans, self._gen)
        self._dirty = False
        return self.desc

    def _part(self, r: Request) -> StepPart:
        """The request's part of the step, from its phase (cached until :meth:`_touch`)."""
        if r.part is not None:
            return r.part
        cache = self.buffers.cache
        base, ps = r.buffer_row * self.buffers.cap, cache.page_size
        if r.phase == "plan":   # the common AR step, kept lean: one query at the last position
            p = r.length - 1
            if p // ps >= len(r.pages):
                r.pages = cache.pages(r.seq)
            f = r.forced_token(self.cfg.mode)
            r.part = StepPart(SeqQueries("causal", start=p, length=1), np.array([base + p], dtype=np.int64),
                              np.array([r.pages[p // ps] * ps + p % ps], dtype=np.int64), _NONE, _NONE, _NONE, (),
                              (), (0, base + p + 1, p + 1, 0 if f is None else 1, 0 if f is None else f))
            return r.part
        ar, s_q, s_pos, sids, cnts = None, [], [], [], []
        if r.phase == "prefill":
            sq = SeqQueries.causal(0, r.prefill_len)
            pos = np.arange(r.prefill_len, dtype=np.int64)
            if self.cfg.mode != "diffusion":
                f = r.forced_token(self.cfg.mode)
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
                    s_pos.append(np.arange(s.first_mask, s.first_mask + s.masks, dtype=np.int64))
                    sids.append(s.sid)
                    cnts.append(s.masks)
                q += s.length
        r.pages = cache.pages(r.seq)
        pages = np.asarray(r.pages, dtype=np.int64)
        s_pos = np.concatenate(s_pos) if s_pos else _NONE
        r.part = StepPart(sq, pos + base, pages[pos // ps] * ps + pos % ps, np.concatenate(s_q) if s_q else _NONE,
                          s_pos + base, s_pos, tuple(sids), tuple(cnts), ar)
        return r.part

    # ---- after a step --------------------------------------------------------------------------------------
    def update_from_output(self, desc: StepDesc, read: np.ndarray, masks_at: int, seconds: float) -> None:
        """Advance the requests of ``desc`` from the step's read (every LM-head row's token, then from
        ``masks_at`` on every span's ``masks_left``): stats, span commits and finished spans/rounds, AR tokens,
        the end of a diffusion-mode prefill or a refresh step. ``seconds``: the step's wall time."""
        phases = [r.phase for r in desc.reqs]
        for r, ph in zip(desc.reqs, phases):
            r.stats.steps[ph] += 1
            r.stats.time_s[ph] += seconds
        vals, masks_left = read[:desc.nr], read[masks_at:]
        ns, ms = desc.ns, self.cfg.max_spans
        if ns:
            if self.events is not None:
                self._commit_events(desc, vals)
            ended, sids = [], desc.span_ids
            left = masks_left[sids]
            # a span that committed nothing had no valid token in any masked row (commit_spans never commits a
            # negative token): the next step would see the same, so it ends now, with its masks
            stalled = (left > 0) & (left >= self._left[sids])
            self._left[sids] = left
            for sid in sids[(left == 0) | stalled].tolist():
                r = self._by_row[sid // ms]
                s = r.round_spans[sid % ms]
                if self._left[sid]:
                    s.stalled = True
                    r.stats.plan_errors.append(f"round {r.stats.rounds}: span {s.index} stopped with "
                                               f"{self._left[sid]} masks (no valid token)")
                first, n = desc.span_rows[sid]
                s.toks, s.active = vals[first:first + n].copy(), False
                r.toks[s.first_mask:s.first_mask + s.masks] = s.toks.tolist()
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
            r = self._by_row[sid // ms]
            s = r.round_spans[sid % ms]
            first, n = desc.span_rows[sid]
            new = vals[first:first + n]
            hit = np.nonzero((s.toks == mask) & (new != mask))[0]
            if len(hit):
                self._emit(ev.SpanCommit(r.idx, r.stats.rounds, s.index, tuple((s.first_mask + hit).tolist()),
                                         tuple(new[hit].tolist())))
            s.toks = new.copy()

    # ---- request transitions -------------------------------------------------------------------------------
    def _after_ar(self, r: Request, tok: int) -> None:
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
        self.buffers.cache.reserve(r.seq, 1, slots=False)
        r.length += 1
        r.plan.append(tok)
        r.toks.append(tok)
        r.stats.plan_tokens += 1
        if self.events is not None:
            self.events.append(ev.PlanToken(r.idx, r.stats.rounds + 1, r.length - 1, tok))
        if r.new_tokens >= r.budget:   # the budget is spent: no forward of a token it cannot keep
            self._end_plan(r, "length")

    def _end_plan(self, r: Request, terminator: str) -> None:
        """The round's plan is complete (terminator ``sync``/``eos``/``length``/``no_token``): open its spans."""
        cfg, tags = self.cfg, self.cfg.tags
        r.plans.append(list(r.plan))
        r.terminator = terminator
        if cfg.mode == "ar":
            r.add_answer(r.plan, self._specials)
            self._finish(r, terminator)
            return
        entries, errors = parse_plan(r.plan, tags, length_scale=cfg.length_scale, max_span_len=cfg.max_span_len,
                                     max_spans=cfg.max_spans)
        r.stats.plan_errors.extend(f"round {r.stats.rounds}: {e}" for e in errors)
        if cfg.answer_text == "reference":   # the reference keeps the plan's text outside its entries
            r.add_answer(text_outside_entries(r.plan, tags), self._specials)
        fitted = r.fit_spans(entries)
        if not fitted:
            if cfg.answer_text == "spans":   # no usable plan entry: the round's AR text is the answer
                r.add_answer(r.plan, self._specials)
            self._finish(r, r.terminator if r.terminator in ("length", "no_token") else "no_plan")
            return
        r.prefix = r.length
        template, spans = r.round_template(fitted, tags, cfg.max_spans)
        self.buffers.cache.reserve(r.seq, len(template), slots=False)
        self.buffers.tokens[r.buffer_row, r.length:r.length + len(template)] = \
            torch.tensor(template, dtype=torch.int64).to(self.buffers.tokens.device)
        r.toks += template
        r.length += len(template)
        r.round_spans = spans
        r.stats.rounds += 1
        r.stats.spans += len(spans)
        self._reset_spans(r)
        r.phase = "diffusion"
        self._touch(r)
        self._emit(ev.RoundStarted(r.idx, r.stats.rounds, tuple(r.plan), tuple(fitted),
                                   tuple(s.first_mask for s in spans)))
        r.plan = []

    def _open_diffusion_answer(self, r: Request) -> None:
        """``mode="diffusion"``: one span of ``diffusion_len`` masks after the prompt (``"full"``: the span is
        the whole sequence, so every query sees prompt and answer)."""
        cfg, b = self.cfg, self.buffers
        n = len(r.prompt)
        L = min(cfg.diffusion_len or r.budget, r.budget)   # the budget caps the canvas too
        start = 0 if cfg.diffusion_attention == "full" else n - 1
        b.cache.reserve(r.seq, n + L - r.length, slots=False)
        r.length = n + L
        b.tokens[r.buffer_row, n:n + L] = cfg.tags.mask
        r.toks += [cfg.tags.mask] * L
        r.prefix = start
        r.round_spans = [Span(start, n + L - start, n - start, L, r.buffer_row * cfg.max_spans, 0,
                              np.full(L, cfg.tags.mask, dtype=np.int64))]
        r.terminator = "length" if L < (cfg.diffusion_len or 0) else ""   # else decided by the canvas
        r.stats.rounds = r.stats.spans = 1
        self._reset_spans(r)
        r.phase = "diffusion"
        self._touch(r)
        self._emit(ev.RoundStarted(r.idx, 1, (), (L,), (n,)))

    def _reset_spans(self, r: Request) -> None:
        for s in r.round_spans:
            self._left[s.sid] = s.masks
        # int32 on the device; every count >= the longest span commits the same way (one token per step at least)
        steps = min(max(1, int(self.cfg.steps_ratio * max(s.masks for s in r.round_spans))), 2**31 - 1)
        self.buffers.state.reset([s.sid for s in r.round_spans], [s.masks for s in r.round_spans],
                                 [steps] * len(r.round_spans))

    def _end_round(self, r: Request) -> None:
        """Every span of the round is finished: collect them, then refresh / ``<sync/>`` (next round) or finish."""
        cfg = self.cfg
        spans = [s.toks.tolist() for s in r.round_spans]
        r.spans_out.append(spans)
        r.stats.span_tokens += sum(len(s) for s in spans)
        if cfg.mode == "diffusion":
            r.end_diffusion(cfg.tags, self._specials)
        else:
            for s in spans:
                r.add_answer(s, self._specials)
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

    def _sync(self, r: Request) -> None:
        """Append ``<sync/>``: its forward (the next plan step) sees every finished span."""
        self.buffers.tokens[r.buffer_row, r.length] = self.cfg.tags.sync
        r.toks.append(self.cfg.tags.sync)
        self.buffers.cache.reserve(r.seq, 1, slots=False)
        r.length += 1
        r.phase = "plan"
        self._touch(r)

    def _finish(self, r: Request, reason: str) -> None:
        result = r.finish(reason, self.cfg.answer_text)
        self.buffers.cache.free(r.seq)
        self.pages_held -= r.max_pages
        self.free_rows.append(r.buffer_row)
        del self._by_row[r.buffer_row]
        self.running.remove(r)
        self._touch(r)
        self._emit(ev.RequestFinished(r.idx, result))
