"""Per-request statistics: critical path (sequential forward passes) and tokens / wall time per phase."""
from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("prefill", "plan", "diffusion", "refresh")


@dataclass
class RequestStats:
    """Counters of one request. ``steps[phase]``: forward passes the request took part in (its critical
    path; in a batch the passes are shared with other requests). ``plan`` covers every AR step (the AR
    baseline's decoding, PD plans, the ``<sync/>`` forward); ``refresh`` the extra forward of a round's
    finished spans before its ``<sync/>`` (``refresh_spans=True``). ``method``: what ran, e.g. ``"pd"``,
    ``"diffusion"`` (ours: causal cached prompt) or ``"diffusion-full"`` (the paper's baseline: bidirectional
    over prompt and answer, no cache); ``seed``: the request's RNG seed. ``tokens``: plan tokens (terminators
    excluded), span tokens (masks committed), answer tokens. ``time_s``: wall time of the steps the request
    took part in, by phase (host clock; each step ends with a device read, so it includes the device time).
    ``finish_reason``: ``"eos"``, ``"length"`` (the budget; ``mode="diffusion"``: also a canvas without EOS),
    ``"max_rounds"`` (a round ending in ``<sync/>`` at the round cap), ``"no_plan"`` (a plan with no usable
    entry), ``"no_token"`` (an AR / plan row had no usable id: every id suppressed, filtered, -inf or NaN;
    ``token_confidence`` returned -1, which is never written; ``mode="diffusion"``: the canvas stopped with
    masks, and no EOS, because its rows had none).
    """
    steps: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    time_s: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    plan_tokens: int = 0
    span_tokens: int = 0
    answer_tokens: int = 0
    rounds: int = 0
    spans: int = 0
    plan_errors: list = field(default_factory=list)
    finish_reason: str = ""
    method: str = ""
    seed: int = 0

    @property
    def critical_path(self) -> int:
        return sum(self.steps.values())

    @property
    def wall_s(self) -> float:
        return sum(self.time_s.values())

    def as_dict(self) -> dict:
        return {"critical_path": self.critical_path, "steps": dict(self.steps),
                "time_s": {k: round(v, 6) for k, v in self.time_s.items()}, "wall_s": round(self.wall_s, 6),
                "plan_tokens": self.plan_tokens, "span_tokens": self.span_tokens,
                "answer_tokens": self.answer_tokens, "rounds": self.rounds, "spans": self.spans,
                "plan_errors": list(self.plan_errors), "finish_reason": self.finish_reason, "method": self.method,
                "seed": self.seed}


def format_table(rows: list[tuple[str, RequestStats]]) -> str:
    """A small text table: one line per (label, stats)."""
    head = ("mode", "crit.path", "prefill", "plan", "diffusion", "answer tok", "tok/step", "rounds", "wall s",
            "refresh")
    lines = [head]
    for label, s in rows:
        tps = s.answer_tokens / max(1, s.critical_path)
        lines.append((label, str(s.critical_path), str(s.steps["prefill"]), str(s.steps["plan"]),
                      str(s.steps["diffusion"]), str(s.answer_tokens), f"{tps:.2f}", str(s.rounds),
                      f"{s.wall_s:.3f}", str(s.steps["refresh"])))
    w = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in lines)
