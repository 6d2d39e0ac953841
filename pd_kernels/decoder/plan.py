"""Parsing a plan (SPEC sections 2-3): ``<promise>-<topic> topic words N </topic>`` entries -> span lengths.

Outcomes of malformed plans (never an exception, never a bad kernel launch); each is recorded as a
message in the returned ``errors`` list (and in the request's stats):

* an entry with no digit token between ``<promise>`` and ``</topic>``: the entry is dropped;
* an entry announcing 0, or whose ``int(N * length_scale)`` is 0: dropped (a span needs at least one mask);
* an entry with no ``</topic>`` (unterminated, e.g. the plan was cut by ``max_new_tokens``): dropped;
* a span longer than ``max_span_len``: clamped to ``max_span_len``;
* more than ``max_spans`` entries: the extra ones are dropped.

A plan with no usable entry opens no span; the decoder then treats the round's AR tokens as the answer
(finish reason ``"no_plan"``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ControlTags


@dataclass(frozen=True)
class PlanEntry:
    number: int       # N as written in the plan
    length: int       # masks of the span (int(N * length_scale), clamped)
    start: int        # index of the entry's <promise> token in the parsed token list
    end: int          # index of the entry's </topic> token


def parse_plan(tokens: list[int], tags: ControlTags, *, length_scale: float = 10, max_span_len: int = 400,
               max_spans: int = 16) -> tuple[list[PlanEntry], list[str]]:
    """Entries of a plan (the AR tokens written since the last ``<sync/>``, terminator excluded).

    The first digit token inside an entry and the one right after it, if it is a digit too, give N
    (the reference convention); the span gets ``int(N * length_scale)`` masks (``length_scale`` an int or a
    float, as the reference's). Returns ``(entries, errors)``.
    """
    digit = {t: i for i, t in enumerate(tags.digits)}
    entries: list[PlanEntry] = []
    errors: list[str] = []
    i, n = 0, len(tokens)
    while i < n:
        if tokens[i] != tags.promise:
            i += 1
            continue
        start = i
        j = i + 1
        while j < n and tokens[j] != tags.topic_close and tokens[j] != tags.promise:
            j += 1
        if j >= n or tokens[j] != tags.topic_close:
            errors.append(f"plan entry at {start} has no </topic>: dropped")
            i = j
            continue
        number = None
        for k in range(start + 1, j):
            if tokens[k] in digit:
                number = digit[tokens[k]]
                if k + 1 < j and tokens[k + 1] in digit:
                    number = number * 10 + digit[tokens[k + 1]]
                break
        end = j
        i = j + 1
        if number is None:
            errors.append(f"plan entry at {start} has no number: dropped")
            continue
        if number == 0:
            errors.append(f"plan entry at {start} announces 0 tokens: dropped")
            continue
        scaled = number * length_scale   # a float scale can overflow to inf: compare before int()
        if scaled < 1:
            errors.append(f"plan entry at {start} announces {number} x length_scale {length_scale} = 0 tokens: dropped")
            continue
        if scaled >= max_span_len + 1:
            shown = int(scaled) if scaled < 1e15 else f"{number} x length_scale {length_scale}"
            errors.append(f"plan entry at {start} asks for {shown} tokens: clamped to max_span_len={max_span_len}")
            length = max_span_len
        else:
            length = int(scaled)
        if len(entries) == max_spans:
            errors.append(f"plan entry at {start} exceeds max_spans={max_spans}: dropped")
            continue
        entries.append(PlanEntry(number, length, start, end))
    return entries, errors


def make_plan(tags: ControlTags, numbers: list[int], *, topic_tokens: list[list[int]] | None = None,
              terminator: str = "eos") -> list[int]:
    """Build plan tokens (for forced plans in tests, benchmarks and the demo): one entry per number,
    ``<promise> topic... digits </topic>`` (numbers 0..99), then the terminator (``"eos"``, ``"sync"`` or
    ``None``)."""
    out: list[int] = []
    for k, num in enumerate(numbers):
        if not 0 <= int(num) <= 99:
            raise ValueError(f"make_plan: numbers must be in [0, 99] (parse_plan reads two digits), got {num}")
        out.append(tags.promise)
        if topic_tokens is not None:
            out.extend(topic_tokens[k])
        out.extend(tags.digits[int(c)] for c in str(num))
        out.append(tags.topic_close)
    if terminator == "eos":
        out.append(tags.eos)
    elif terminator == "sync":
        out.append(tags.sync)
    elif terminator is not None:
        raise ValueError(f"terminator must be 'eos', 'sync' or None, got {terminator!r}")
    return out


def text_outside_entries(tokens: list[int], tags: ControlTags) -> list[int]:
    """The plan's tokens outside its ``<promise> ... </topic>`` entries, control tags removed: what the PD
    reference's ``clean_text`` keeps of a plan (its regex removes ``<promise>.*?</topic>``, from a
    ``<promise>`` to the first ``</topic>`` after it, and the tags)."""
    out, i, n = [], 0, len(tokens)
    specials = set(tags.specials)
    while i < n:
        t = tokens[i]
        if t == tags.promise:
            try:
                i = tokens.index(tags.topic_close, i + 1) + 1
                continue
            except ValueError:  # no </topic> after it: the regex leaves the rest as text
                pass
        if t not in specials:
            out.append(t)
        i += 1
    return out
