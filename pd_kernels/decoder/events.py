"""Events of :meth:`pd_kernels.decoder.Decoder.stream` (and of ``generate(..., on_event=...)``), in the order
they happen.

Per request the order is: ``PlanToken``\\* (the AR tokens of round 1), ``RoundStarted`` (the plan's spans are
allocated), then per step ``SpanCommit``\\* and, when a span has no masks left, ``SpanFinished`` (its tokens
are final from then on), ``RoundFinished`` once every span of the round is, then the next round's
``PlanToken``\\* ..., and ``RequestFinished`` last (the :class:`~pd_kernels.decoder.GenerationResult`).
``mode="ar"`` requests give ``PlanToken``\\* then ``RequestFinished``; ``mode="diffusion"`` one round of one
span. Events of different requests interleave as their steps do.

``request`` is the index of the prompt in the list given to ``stream`` / ``generate``; ``round`` counts from 1;
``span`` is the span's index in its round. Token values are ids; decode them with the model's tokenizer.
A span's text is final when its ``SpanFinished`` arrives, so a client can print finished spans in order while
later ones are still diffusing (the demo does).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlanToken:
    """An AR token appended to the request (a plan token, or the AR baseline's next token)."""
    request: int
    round: int
    position: int
    token: int


@dataclass(frozen=True)
class RoundStarted:
    """The round's plan is complete: its spans are allocated (masks) and start diffusing."""
    request: int
    round: int
    plan: tuple            # the round's AR tokens (terminator excluded)
    span_lengths: tuple    # masks per span
    span_starts: tuple     # position of each span's first mask


@dataclass(frozen=True)
class SpanCommit:
    """Positions of one span committed in one step (absolute positions in the request's sequence)."""
    request: int
    round: int
    span: int
    positions: tuple
    tokens: tuple


@dataclass(frozen=True)
class SpanFinished:
    """A span has no masks left: ``tokens`` (its mask positions, in order) are final."""
    request: int
    round: int
    span: int
    tokens: tuple


@dataclass(frozen=True)
class RoundFinished:
    """Every span of the round is finished. ``answer``: the request's answer tokens so far (what
    ``GenerationResult.answer`` holds if the request ended here)."""
    request: int
    round: int
    answer: tuple


@dataclass(frozen=True)
class RequestFinished:
    """The request is done; ``result`` is its :class:`~pd_kernels.decoder.GenerationResult`."""
    request: int
    result: object


EVENTS = (PlanToken, RoundStarted, SpanCommit, SpanFinished, RoundFinished, RequestFinished)
