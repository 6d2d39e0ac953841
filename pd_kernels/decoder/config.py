"""Decoder configuration: control-tag ids (SPEC section 2) and the knobs of the loop (sections 3-5)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODES = ("ar", "pd", "pd-da", "diffusion")
POLICIES = ("schedule", "pd_threshold", "threshold")
CONFIDENCES = ("prob", "margin", "neg_entropy")


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
        if len(self.digits) != 10:
            raise ValueError(f"ControlTags.digits must list the ids of '0'..'9', got {len(self.digits)} ids")
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


@dataclass
class DecodeConfig:
    """Knobs of :func:`pd_kernels.decoder.generate`.

    Attributes:
        mode: ``"ar"`` (plain autoregressive, the baseline), ``"pd"``, ``"pd-da"`` (dense attention between
            the spans of a round) or ``"diffusion"`` (no plan: ``diffusion_len`` masks after the prompt).
        steps_ratio: r in ``steps = max(1, int(r * max_k L_k))`` per round (SPEC section 3).
        policy: commit policy, ``"schedule" | "pd_threshold" | "threshold"`` (SPEC section 5).
        confidence: ``"prob" | "margin" | "neg_entropy"``.
        tau: threshold of ``pd_threshold`` / ``threshold``.
        temperature: 0 = greedy; > 0 samples with a counter-based RNG seeded by ``seed`` (no top-p).
        max_new_tokens: cap on the tokens a request adds after its prompt (plan, tags, spans, ``<sync/>``).
        max_rounds: cap on plan/diffuse rounds; the last allowed round ends the request even after ``<sync/>``.
        length_scale: a plan entry announcing N gets ``N * length_scale`` masks (Dream PD: 10).
        max_span_len: a span longer than this is clamped to it (recorded in ``plan_errors``).
        max_spans: most spans one round may open; further entries are dropped (recorded).
        diffusion_len: answer length of ``mode="diffusion"`` (default: ``max_new_tokens``).
        page_size, num_pages: paged KV cache geometry (``num_pages=None``: sized from the batch).
        tags: control-tag ids.
    """
    mode: str = "pd"
    steps_ratio: float = 1.0
    policy: str = "schedule"
    confidence: str = "prob"
    tau: float = 0.9
    temperature: float = 0.0
    seed: int = 0
    max_new_tokens: int = 512
    max_rounds: int = 16
    length_scale: int = 10
    max_span_len: int = 400
    max_spans: int = 16
    diffusion_len: int | None = None
    page_size: int = 16
    num_pages: int | None = None
    tags: ControlTags = field(default_factory=ControlTags)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {CONFIDENCES}, got {self.confidence!r}")
        if self.steps_ratio <= 0:
            raise ValueError(f"steps_ratio must be > 0, got {self.steps_ratio}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        for name in ("max_new_tokens", "max_rounds", "length_scale", "max_span_len", "max_spans", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def replace(self, **kw) -> "DecodeConfig":
        return dataclasses.replace(self, **kw)

    @property
    def answer_len(self) -> int:
        return self.diffusion_len if self.diffusion_len is not None else self.max_new_tokens
