"""A request and its current round: the host state the scheduler advances from each step's read.

Nothing here touches the device. A :class:`Request` holds its own copy of its sequence (from the reads), its
plan, its spans (:class:`Span`), its answer and stats; the rules that only read and write that state (which
AR token is forced, how a plan's spans are fitted into the budget, what a round adds to the answer, why the
request ended) are its methods. The scheduler (:mod:`pd_kernels.decoder.scheduler`) applies the device side of
each change (cache pages, the token buffer, the span state).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .config import ControlTags
from .stats import RequestStats


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
class Span:
    """One span of a round: ``length`` forwarded tokens from position ``start`` (tags included), ``masks`` of
    them from ``start + moff`` to be filled."""
    start: int          # position of the span's first query (<async>; diffusion: the token before the answer)
    length: int         # tokens the span forwards (tags included)
    moff: int           # offset of the first mask from start (mask positions start+moff .. +masks-1)
    masks: int
    sid: int            # span id in the SpanState (buffer_row * max_spans + index)
    index: int          # index in its round
    toks: np.ndarray    # tokens at its mask positions as last read (final once finished)
    active: bool = True
    stalled: bool = False   # ended with masks left: no step could commit a token (no usable id)

    @property
    def first_mask(self) -> int:
        return self.start + self.moff


@dataclass
class Request:
    """One prompt's decoding state. ``phase``: ``prefill``, ``plan`` (AR steps), ``diffusion`` (the round's
    active spans), ``refresh`` (the finished round once more), ``done``."""
    idx: int
    prompt: list
    forced: list | None
    seed: int
    budget: int                         # new tokens it may add
    max_pages: int                      # cache pages it may come to hold (prompt + budget positions)
    buffer_row: int = -1                # its row of the token buffer (and of the span state's span ids)
    seq: int = -1                       # its cache row (PagedKVCache sequence)
    phase: str = "prefill"
    length: int = 0                     # tokens in the sequence (= reserved cache positions)
    prefill_len: int = 0
    toks: list = field(default_factory=list)        # host copy of the sequence
    plan: list = field(default_factory=list)        # AR tokens of the current round
    plans: list = field(default_factory=list)
    round_spans: list = field(default_factory=list)  # list[Span] of the current round
    prefix: int = 0
    terminator: str = ""
    spans_out: list = field(default_factory=list)
    answer: list = field(default_factory=list)
    pieces: list = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    result: GenerationResult | None = None
    part: object = None                             # its StepPart of the next step (None: rebuild)
    pages: list = field(default_factory=list)       # its cache pages (refreshed when a position needs more)

    @property
    def new_tokens(self) -> int:
        return self.length - len(self.prompt)

    @property
    def steps(self) -> int:
        """Steps taken so far: the counter of its RNG keys."""
        return self.stats.critical_path

    def forced_token(self, mode: str) -> int | None:
        """The forced AR token of its next AR step (``forced_plans``), or None: sampled."""
        f = self.forced
        k = self.stats.rounds if mode != "ar" else 0
        if f is None or k >= len(f) or len(self.plan) >= len(f[k]):
            return None
        return int(f[k][len(self.plan)])

    def fit_spans(self, entries) -> list[int]:
        """Mask counts of the plan's entries once fitted into what is left of the budget (each span also takes
        its two tags): too long ones are shortened, ones with no room are dropped (noted; the request will
        end with ``"length"``)."""
        room = self.budget - self.new_tokens
        fitted = []
        for e in entries:
            n = e.length
            if room - 2 < 1:
                self.stats.plan_errors.append(f"round {self.stats.rounds}: span dropped (budget)")
                self.terminator = "length"
                continue
            if n + 2 > room:
                self.stats.plan_errors.append(f"round {self.stats.rounds}: span of {n} shortened to {room - 2} "
                                              f"(budget)")
                n = room - 2
                self.terminator = "length"
            fitted.append(n)
            room -= n + 2
        return fitted

    def round_template(self, fitted: list[int], tags: ControlTags, max_spans: int) -> tuple[list, list]:
        """``(tokens, spans)`` of a round of spans with ``fitted`` masks, right after the sequence:
        ``<async> MASK... </async>`` per span."""
        template, spans, pos = [], [], self.length
        for j, n in enumerate(fitted):
            template += [tags.async_open] + [tags.mask] * n + [tags.async_close]
            spans.append(Span(pos, n + 2, 1, n, self.buffer_row * max_spans + j, j, np.full(n, tags.mask, np.int64)))
            pos += n + 2
        return template, spans

    def add_answer(self, toks, specials) -> None:
        """Append ``toks`` (tags, MASK and PAD removed) to the answer as one piece."""
        piece = [t for t in toks if t not in specials]
        if piece:
            self.answer.extend(piece)
            self.pieces.append(piece)

    def end_diffusion(self, tags: ControlTags, specials) -> None:
        """``mode="diffusion"``: the canvas is final. The answer stops at its first EOS; the finish reason is
        ``"eos"`` when it has one, else ``"no_token"`` when it stopped with masks (no usable id), else
        ``"length"`` (the canvas ended). A canvas cut by the budget keeps ``"length"``."""
        canvas = self.spans_out[-1][0]
        eos = tags.eos in canvas
        self.add_answer(canvas[:canvas.index(tags.eos)] if eos else canvas, specials)
        if self.terminator != "length":
            self.terminator = "eos" if eos else "no_token" if self.round_spans[0].stalled else "length"

    def finish(self, reason: str, answer_text: str) -> GenerationResult:
        """The request is done: its :class:`GenerationResult`."""
        self.stats.finish_reason = reason
        self.stats.answer_tokens = len(self.answer)
        self.result = GenerationResult(list(self.answer), list(self.toks), self.plans, self.spans_out, self.stats,
                                       self.pieces, answer_text)
        self.phase = "done"
        return self.result
