"""Decoder configuration: control-tag ids (SPEC section 2) and the knobs of the loop (sections 3-5).

Every knob is validated when the :class:`DecodeConfig` is made: a bad value raises ``ValueError`` (``TypeError``
for a wrong type) naming the field and the value, instead of failing later inside a kernel or the allocator.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from ..ops import CONFIDENCE_KINDS as CONFIDENCES, POLICIES, check_temperature

MODES = ("ar", "pd", "pd-da", "diffusion")
DIFFUSION_ATTENTION = ("causal", "full")
ANSWER_TEXT = ("spans", "reference")
PRESETS = ("reference", "fast")


@dataclass(frozen=True)
class ControlTags:
    """Token ids of the planned-diffusion control tags. Defaults: the Dream tokenizer (SPEC section 2).

    ``digits[i]`` is the id of the digit ``i`` (Dream: 15..24). Nothing in the kernels hard-wires these:
    models with another vocabulary (e.g. the tiny built-in model) pass their own :class:`ControlTags`.
    """
    eos: int = 151645
    mask: int = 151666
    async_open: int = 151667
    async_close: int = 151668
    promise: int = 151669
    topic_close: int = 151670
    sync: int = 151671
    pad: int = 151672
    digits: tuple[int, ...] = tuple(range(15, 25))

    def __post_init__(self):
        if isinstance(self.digits, (str, bytes)) or not hasattr(self.digits, "__len__") or len(self.digits) != 10:
            raise ValueError(f"ControlTags.digits must list the ids of '0'..'9', got {self.digits!r}")
        for name, v in [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "digits"] + \
                [(f"digits[{i}]", d) for i, d in enumerate(self.digits)]:
            if not _is_int(v) or v < 0:
                raise ValueError(f"ControlTags.{name} must be a token id (an int >= 0), got {v!r}")
        for f in dataclasses.fields(self):   # plain ints (numpy ints are accepted), digits a tuple: hashable
            v = getattr(self, f.name)
            object.__setattr__(self, f.name, tuple(int(d) for d in v) if f.name == "digits" else int(v))
        ids = self.specials
        if len(set(ids)) != len(ids) or set(ids) & set(self.digits):
            raise ValueError(f"control-tag ids must be distinct and differ from the digit ids: {self}")

    @property
    def specials(self) -> tuple[int, ...]:
        """Ids stripped from the answer text (all tags, MASK and PAD)."""
        return (self.eos, self.mask, self.async_open, self.async_close, self.promise, self.topic_close,
                self.sync, self.pad)

    def max_id(self) -> int:
        return max(max(self.specials), max(self.digits))


def _is_int(v) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _is_real(v) -> bool:
    """A Python or numpy real number, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _range_text(lo: float, hi: float, lo_open: bool) -> str:
    """`` [lo, hi]`` / `` (lo, hi]`` / `` >= lo`` / `` > lo`` / `` <= hi`` / nothing, for an error message."""
    if math.isfinite(lo) and math.isfinite(hi):
        return f" {'(' if lo_open else '['}{lo}, {hi}]"
    if math.isfinite(lo):
        return f" {'>' if lo_open else '>='} {lo}"
    return f" <= {hi}" if math.isfinite(hi) else ""


@dataclass(frozen=True)
class DecodeConfig:
    """Knobs of :func:`pd_kernels.decoder.generate` (validated on construction; :meth:`replace` re-validates).

    Attributes:
        mode: ``"ar"`` (plain autoregressive, the baseline), ``"pd"``, ``"pd-da"`` (dense attention between
            the spans of a round) or ``"diffusion"`` (no plan: ``diffusion_len`` masks after the prompt).
        steps_ratio: r in ``steps = max(1, int(r * max_k L_k))`` per round (SPEC section 3); finite, > 0 (a count
            past 2^31 - 1 is clamped: every count >= the longest span commits the same way).
        policy: commit policy, ``"schedule" | "pd_threshold" | "threshold"`` (SPEC section 5).
        confidence: ``"prob" | "margin" | "neg_entropy"``.
        tau: threshold of ``pd_threshold`` / ``threshold``, in the range of the confidence it is compared with:
            [0, 1] for ``prob`` and ``margin``; <= 0 for ``neg_entropy`` (minus an entropy, never above 0; with
            the ``schedule`` policy, which never reads tau, any finite tau is kept, so the default 0.9 needs no
            change there).
        temperature: 0 = greedy; > 0 samples (Gumbel-max) with a counter-based RNG. The noise of a position
            is keyed by (the request's seed, the request's own step counter, the absolute position), never by
            the batch, so a seeded request gives the same tokens alone or in any batch.
        seed: default seed of every request (``generate(..., seeds=[...])`` sets one per request); int >= 0.
        top_p: nucleus filter in (0, 1] (1 = off). Applied at every temperature, as the PD reference does:
            at temperature 0 a row whose top-1 probability exceeds ``top_p`` keeps only that token, so its
            confidence becomes exactly 1 (``prob``, ``margin``) or 0 (``neg_entropy``); equal confidences then
            commit in position order (lower position first, the commit's tie rule).
        top_k: keep the ``top_k`` largest logits per row (0 = off), as the reference's ``top_k_logits``.
        suppress_mask: span rows never choose MASK (ours; the reference has no such rule: a committed MASK
            stays MASK in the span and is dropped from the answer). AR rows of ``mode="ar"`` are never
            suppressed (an AR model does not know MASK).
        max_new_tokens: cap on the tokens a request adds after its prompt (plan, tags, spans, ``<sync/>``).
        max_length: if set, the budget is a *total* length (prompt + new tokens, the reference's
            ``max_length``) and replaces ``max_new_tokens``; a prompt must be shorter than it.
        max_rounds: cap on plan/diffuse rounds; the last allowed round ends the request even after ``<sync/>``.
        length_scale: a plan entry announcing N gets ``int(N * length_scale)`` masks (Dream PD: 10); an int or
            a float, finite and > 0.
        max_span_len: a span longer than this is clamped to it (recorded in ``plan_errors``).
        max_spans: most spans one round may open; further entries are dropped (recorded).
        diffusion_len: answer length of ``mode="diffusion"`` (default: the request's budget); never more than the
            budget: a longer one is cut to it (finish reason ``"length"``). Other modes ignore it.
        diffusion_attention: ``mode="diffusion"`` only. ``"causal"`` (ours, the default): the prompt is
            prefilled causally once and cached, the answer block sees the prompt and itself. ``"full"``: the
            paper's diffusion baseline (Dream's ``diffusion_generate``): every step forwards prompt and
            answer together, bidirectionally, with nothing cached.
        refresh_spans: before a round's ``<sync/>``, one extra forward of the round's (finished) spans so that
            later tokens see their final K/V, as the reference's uncached path does (the cached path keeps
            each span's K/V of its last step). Costs one step per round ending in ``<sync/>``
            (``stats.steps["refresh"]``).
        answer_text: ``"spans"`` (ours: the spans' tokens in order; a plan with no usable entry gives its own
            text) or ``"reference"`` (the reference's cleaned output: plan text outside ``<promise> ...
            </topic>`` entries kept, and in :meth:`GenerationResult.text` every piece joined with a space).
        page_size, num_pages: paged KV cache geometry (``num_pages=None``: sized from the batch; a smaller pool
            admits a request only when the pages it may come to hold are free, so requests wait, never run out).
        tags: control-tag ids.

    ``DecodeConfig.preset("reference")`` / ``preset("fast")``: see :meth:`preset`.
    """
    mode: str = "pd"
    steps_ratio: float = 1.0
    policy: str = "schedule"
    confidence: str = "prob"
    tau: float = 0.9
    temperature: float = 0.0
    seed: int = 0
    top_p: float = 1.0
    top_k: int = 0
    suppress_mask: bool = True
    max_new_tokens: int = 512
    max_length: int | None = None
    max_rounds: int = 16
    length_scale: float = 10
    max_span_len: int = 400
    max_spans: int = 16
    diffusion_len: int | None = None
    diffusion_attention: str = "causal"
    refresh_spans: bool = False
    answer_text: str = "spans"
    page_size: int = 16
    num_pages: int | None = None
    tags: ControlTags = field(default_factory=ControlTags)

    def __post_init__(self):
        for name, choices in (("mode", MODES), ("policy", POLICIES), ("confidence", CONFIDENCES),
                              ("diffusion_attention", DIFFUSION_ATTENTION), ("answer_text", ANSWER_TEXT)):
            if getattr(self, name) not in choices:
                raise ValueError(f"DecodeConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name, lo, hi, lo_open in (("steps_ratio", 0.0, math.inf, True), ("temperature", 0.0, math.inf, False),
                                      ("tau",) + self._tau_range(), ("top_p", 0.0, 1.0, True),
                                      ("length_scale", 0.0, math.inf, True)):
            v = getattr(self, name)
            if not _is_real(v):
                raise TypeError(f"DecodeConfig.{name} must be a number, got {type(v).__name__} {v!r}")
            if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
                why = ""
                if name == "tau":
                    why = f" with confidence={self.confidence!r}" + (
                        f" (minus an entropy: never above 0) and policy={self.policy!r}"
                        if self.confidence == "neg_entropy" and math.isfinite(hi) else "")
                raise ValueError(f"DecodeConfig.{name} must be a finite number{_range_text(lo, hi, lo_open)}{why}, "
                                 f"got {v!r}")
            object.__setattr__(self, name, int(v) if isinstance(v, numbers.Integral) else float(v))  # numpy -> Python
        try:   # the op's own bounds (1 / T must be a normal fp32), so a config never fails at its first step
            check_temperature(self.temperature)
        except ValueError as e:
            raise ValueError(f"DecodeConfig.temperature: {e}") from None
        for name, lo, optional in (("seed", 0, False), ("top_k", 0, False), ("max_new_tokens", 1, False),
                                   ("max_length", 2, True), ("max_rounds", 1, False), ("max_span_len", 1, False),
                                   ("max_spans", 1, False), ("diffusion_len", 1, True), ("page_size", 1, False),
                                   ("num_pages", 1, True)):
            v = getattr(self, name)
            if optional and v is None:
                continue
            if not _is_int(v):
                raise TypeError(f"DecodeConfig.{name} must be an int{' or None' if optional else ''}, "
                                f"got {type(v).__name__} {v!r}")
            if v < lo:
                raise ValueError(f"DecodeConfig.{name} must be >= {lo}, got {v}")
            object.__setattr__(self, name, int(v))
        if self.seed >= 2**63:
            raise ValueError(f"DecodeConfig.seed must be < 2^63, got {self.seed}")
        for name in ("suppress_mask", "refresh_spans"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"DecodeConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.tags, ControlTags):
            raise TypeError(f"DecodeConfig.tags must be a ControlTags, got {type(self.tags).__name__}")
        if self.diffusion_attention == "full" and self.mode != "diffusion":
            raise ValueError(f"DecodeConfig.diffusion_attention='full' is the diffusion baseline: it needs "
                             f"mode='diffusion', got mode={self.mode!r}")

    def _tau_range(self) -> tuple[float, float, bool]:
        """``(lo, hi, lo_open)`` of tau: the range of the confidence the threshold policies compare it with."""
        if self.confidence != "neg_entropy":
            return 0.0, 1.0, False
        return -math.inf, (0.0 if self.policy != "schedule" else math.inf), False

    def replace(self, **kw) -> "DecodeConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **kw)

    def budget(self, prompt_len: int) -> int:
        """New tokens a request of ``prompt_len`` tokens may add (``max_length - prompt_len`` when
        ``max_length`` is set, else ``max_new_tokens``)."""
        return self.max_new_tokens if self.max_length is None else self.max_length - prompt_len

    @classmethod
    def preset(cls, name: str, **overrides) -> "DecodeConfig":
        """Named settings (``overrides`` replace fields).

        * ``"reference"``: the public PD code's AlpacaEval settings (``eval/alpaca_eval_diffusion.py``,
          ``alg="pd_entropy"``): schedule policy with ``neg_entropy`` confidence, temperature 0.2, top-p 0.95,
          top-k 50 (its generation config's default), no MASK suppression, ``max_length=1024`` as a total
          length, length scale 10, the answer text assembled as its ``clean_text`` does.
        * ``"fast"``: ours: ``pd_threshold`` (budgeted, threshold 0.9, deferral) with ``prob`` confidence,
          greedy, MASK suppressed in spans, ``max_new_tokens`` budget, the answer as the spans' tokens.

        What we keep different from the reference even under ``"reference"`` (see the README): malformed
        plan entries are dropped (it raises), every round takes at least one step (its ``int(r * L)`` may be
        0), and spans are fitted into the budget (it truncates the finished sequence at ``max_length``).
        """
        if name == "reference":
            base = dict(mode="pd", policy="schedule", confidence="neg_entropy", temperature=0.2, top_p=0.95,
                        top_k=50, suppress_mask=False, max_length=1024, length_scale=10, steps_ratio=1.0,
                        answer_text="reference")
        elif name == "fast":
            base = dict(mode="pd", policy="pd_threshold", confidence="prob", tau=0.9, temperature=0.0, top_p=1.0,
                        top_k=0, suppress_mask=True, length_scale=10, steps_ratio=1.0, answer_text="spans")
        else:
            raise ValueError(f"DecodeConfig.preset: name must be one of {PRESETS}, got {name!r}")
        base.update(overrides)
        return cls(**base)
