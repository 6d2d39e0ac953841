"""The synthetic task of the shipped tiny planned-diffusion model: list sub-requests, checked exactly.

A prompt is one to three *parts* separated by ``;``. A part is an operation and a list of letters, or
``then`` and an operation, which applies the operation to the previous part's answer; no letter appears
twice in a prompt::

    rev o c m h k ; sort j d a f i n b    two independent parts: one planning round, two spans
    sort k d a f i ; then rev             the second part needs the first: a <sync/> round
    rev a b                               a short answer: not worth a plan

Operations: ``rev`` (reverse) and ``sort`` (alphabetical). A part's answer is its letters followed by
``;``; the whole answer is the parts' answers in order.

Planned-diffusion layout (the training format, SPEC section 9, and what the model writes at inference):
the independent parts (at most two) form round 1; a ``then`` part is in the round after the part it
reads. Each round's plan has one entry per part, ``<promise>-<topic> OP N </topic>`` (the topic is the
operation, ``N = ceil(len(answer) / LENGTH_SCALE)``); the span is the part's answer padded with ``[PAD]``
to ``N * LENGTH_SCALE`` tokens. Rounds end with ``<sync/>``, the last one with EOS. A single part of at
most ``SHORT_MAX`` letters is answered directly, with no plan.

Why the task looks like this (a model of about a million parameters, trained in under 30 minutes on two
CPU cores; version 4: an earlier version with 7 to 13 letters from a-z reached only 45% exact match in
40 minutes of training):

* letters are distinct across the prompt, so a letter names its part and its place: a small model finds
  the next letter by content (the letter after / before the one just written), in any part;
* the letters are ``a``-``p`` and planned parts have 3, 5 or 7 of them: short exact answers, a small
  alphabet to order for ``sort``;
* planned parts have an odd number of letters, so every answer (letters and ``;``) fills its
  span exactly: both ends of a span are anchored, and the model can fill it from both ends at once;
* a round has at most two spans: under PD a span sees the prefix and itself only, so the only thing that
  tells it which plan entry it is, is its position; "right after the plan" or "not" is a distinction a
  tiny model learns quickly, counting spans by distance is not;
* the plan entry is four tokens (one topic word), so the plan is a small part of the critical path.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

LETTERS = tuple("abcdefghijklmnop")
OPS = ("rev", "sort")
THEN = "then"
SEP = ";"
LENGTH_SCALE = 2        # masks per announced unit (DecodeConfig.length_scale of the tiny model)
MAX_PARTS = 3           # parts per prompt
MAX_ROUND_PARTS = 2     # independent parts (spans of round 1)
MAX_ITEMS = 7           # letters per part
PLANNED_ITEMS = (3, 5, 7)   # list lengths of planned parts
SHORT_MAX = 2           # a one-part prompt with at most this many letters is answered without a plan
EVAL_BUCKETS = 10       # one prompt in EVAL_BUCKETS (by a hash of its text) is held out of training


def apply_op(op: str, items: tuple[str, ...]) -> tuple[str, ...]:
    """The answer letters of ``op`` on ``items``."""
    if op == "rev":
        return tuple(reversed(items))
    if op == "sort":
        return tuple(sorted(items))
    raise ValueError(f"unknown operation {op!r}: expected one of {OPS}")


@dataclass(frozen=True)
class Part:
    """One sub-request: ``op`` on ``items``, or (``then=True``) on the previous part's answer."""
    op: str
    items: tuple[str, ...]
    then: bool = False

    @property
    def words(self) -> list[str]:
        return [THEN, self.op] if self.then else [self.op, *self.items]


@dataclass(frozen=True)
class Example:
    """A prompt of the task, with its ground truth and its planned-diffusion layout."""
    parts: tuple[Part, ...]

    def __post_init__(self):
        _validate(self.parts)

    @property
    def prompt(self) -> str:
        return f" {SEP} ".join(" ".join(p.words) for p in self.parts)

    def part_answers(self) -> list[list[str]]:
        """Per part: its answer words (letters then ``;``)."""
        out, prev = [], None
        for p in self.parts:
            letters = apply_op(p.op, prev if p.then else p.items)
            out.append([*letters, SEP])
            prev = letters
        return out

    @property
    def answer(self) -> list[str]:
        return [w for a in self.part_answers() for w in a]

    @property
    def planned(self) -> bool:
        """False for a prompt whose answer is short enough that a plan is not worth it."""
        return not (len(self.parts) == 1 and len(self.parts[0].items) <= SHORT_MAX)

    def rounds(self) -> list[list[int]]:
        """Part indices per planning round (a ``then`` part runs one round after the part it reads)."""
        level = []
        for i, p in enumerate(self.parts):
            level.append(level[i - 1] + 1 if p.then else 0)
        return [[i for i, lv in enumerate(level) if lv == r] for r in range(max(level) + 1)]

    def check(self, answer_words) -> bool:
        """Exact match of an answer (a string or a list of words) against the ground truth."""
        words = answer_words.split() if isinstance(answer_words, str) else list(answer_words)
        return words == self.answer


def _validate(parts) -> None:
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"a prompt has 1 to {MAX_PARTS} parts, got {len(parts)}")
    for i, p in enumerate(parts):
        if p.op not in OPS:
            raise ValueError(f"part {i + 1}: unknown operation {p.op!r} (expected one of {', '.join(OPS)})")
        if p.then:
            if i == 0:
                raise ValueError(f"part 1: '{THEN} {p.op}' needs a previous part to read")
            if p.items:
                raise ValueError(f"part {i + 1}: '{THEN} {p.op}' takes no letters of its own")
            continue
        n = len(p.items)
        if not 1 <= n <= MAX_ITEMS:
            raise ValueError(f"part {i + 1}: 1 to {MAX_ITEMS} letters, got {n}")
        if n not in PLANNED_ITEMS and not (len(parts) == 1 and n <= SHORT_MAX):
            raise ValueError(f"part {i + 1} has {n} letters: the model was trained on "
                             f"{', '.join(map(str, PLANNED_ITEMS))} letters per part (or 1 to {SHORT_MAX} "
                             f"in a one-part prompt)")
        bad = [c for c in p.items if c not in LETTERS]
        if bad:
            raise ValueError(f"part {i + 1}: {bad[0]!r} is not one of the letters {LETTERS[0]}-{LETTERS[-1]}")
        seen = {c for q in parts[:i] for c in q.items}
        dup = [c for j, c in enumerate(p.items) if c in seen or c in p.items[:j]]
        if dup:
            raise ValueError(f"letter {dup[0]!r} appears twice: letters must be distinct across the prompt "
                             f"(the model was trained so)")
        if any(q.then for q in parts[:i]):
            raise ValueError(f"part {i + 1}: independent parts come before the '{THEN}' parts")
        if i >= MAX_ROUND_PARTS:
            raise ValueError(f"at most {MAX_ROUND_PARTS} independent parts (a round has at most "
                             f"{MAX_ROUND_PARTS} spans), then '{THEN} OP' parts")


def parse_prompt(text: str) -> Example:
    """An :class:`Example` from a prompt in the task's own words, e.g. ``"rev h o e ; sort k d a ; then rev"``.
    Raises ``ValueError`` naming what is wrong (unknown word, bad part, too many parts or letters)."""
    chunks = [c.split() for c in text.replace(SEP, f" {SEP} ").split(SEP)]
    if not text.strip() or any(not c for c in chunks):
        raise ValueError(f"empty part in prompt {text!r}: write parts like 'rev a b c ; sort d e f'")
    parts = []
    for i, words in enumerate(chunks):
        if words[0] == THEN:
            if len(words) != 2:
                raise ValueError(f"part {i + 1} {' '.join(words)!r}: write '{THEN} OP' with OP in {', '.join(OPS)}")
            parts.append(Part(words[1], (), then=True))
        else:
            parts.append(Part(words[0], tuple(words[1:])))
    return Example(tuple(parts))


def is_held_out(example: Example) -> bool:
    """Prompts held out of training (evaluation split): a fixed tenth of all prompts, by a hash of the text."""
    return int(hashlib.sha1(example.prompt.encode()).hexdigest()[:8], 16) % EVAL_BUCKETS == 0


class TaskGenerator:
    """Seeded stream of examples: 60% two independent parts, 10% one part (lists of 3, 5 or 7 letters),
    20% one or two parts and a ``then`` part (a ``<sync/>`` round), 10% short (one part of 1..2 letters,
    answered without a plan). Letters are drawn without replacement across the prompt.

    ``split="train"`` never yields a held-out prompt, ``split="eval"`` only held-out ones."""

    KINDS = (("two", 0.60), ("one", 0.10), ("dependent", 0.20), ("short", 0.10))

    def __init__(self, seed: int, split: str = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.rng = random.Random(seed)
        self.split = split

    def _parts(self, lengths: list[int]) -> list[Part]:
        letters = self.rng.sample(LETTERS, sum(lengths))   # distinct across the prompt
        out, i = [], 0
        for n in lengths:
            out.append(Part(self.rng.choice(OPS), tuple(letters[i:i + n])))
            i += n
        return out

    def _draw(self) -> Example:
        r = self.rng.random()
        kind = next((k for k, w in self._cum if r < w), "short")
        planned = lambda k: [self.rng.choice(PLANNED_ITEMS) for _ in range(k)]  # noqa: E731
        if kind == "two":
            return Example(tuple(self._parts(planned(2))))
        if kind == "one":
            return Example(tuple(self._parts(planned(1))))
        if kind == "dependent":
            parts = self._parts(planned(self.rng.randint(1, MAX_ROUND_PARTS)))
            return Example(tuple(parts + [Part(self.rng.choice(OPS), (), then=True)]))
        return Example(tuple(self._parts([self.rng.randint(1, SHORT_MAX)])))

    @property
    def _cum(self):
        acc, out = 0.0, []
        for k, w in self.KINDS:
            acc += w
            out.append((k, acc))
        return out

    def __iter__(self):
        return self

    def __next__(self) -> Example:
        while True:
            ex = self._draw()
            if is_held_out(ex) == (self.split == "eval"):
                return ex

    def take(self, n: int) -> list[Example]:
        return [next(self) for _ in range(n)]


def plan_length(answer_words: int) -> int:
    """N of a plan entry for a span of ``answer_words`` tokens."""
    return math.ceil(answer_words / LENGTH_SCALE)
