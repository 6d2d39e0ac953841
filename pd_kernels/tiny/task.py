"""The synthetic task of the shipped tiny planned-diffusion model: list sub-requests, checked exactly.

A prompt is one to four independent *parts*, optionally followed by a ``then`` part, separated by ``;``. A
part is an operation and a list of letters; ``then OP`` applies the operation to the previous part's answer.
No letter appears twice in a prompt, and the independent parts of a prompt have the same number of letters::

    rev o c m h k V y Z b ; sort j d a f i n B x E ; rev T g u p q L e r W     three independent parts:
                                                                              one planning round, 3 spans
    sort k d a f i P Q s t ; then rev                                         the second part needs the
                                                                              first: a <sync/> round
    rev a b                                                                   a short answer: no plan

Operations: ``rev`` (reverse) and ``sort`` (in the order of :data:`LETTERS`: ``a``-``z``, then ``A``-``Z``).
A part's answer is its letters followed by ``;``; the whole answer is the parts' answers in order.

Planned-diffusion layout (the training format, SPEC section 9, and what the model writes at inference): the
independent parts form round 1; a ``then`` part is in the round after. Each round's plan has one entry per
part, ``<promise>-<topic> N </topic>`` (no topic words: ``N = (letters + 1) / LENGTH_SCALE``); the span is the
part's answer. Rounds end with ``<sync/>``, the last one with EOS. A single part of at most ``SHORT_MAX``
letters is answered directly, with no plan.

Why the task looks like this (version 5; a model of 1.6 million parameters trained in about two hours on two
CPU cores; version 4, with 3-7 letters and at most two spans a round, could not show the method's trade: its
answers of about 12 tokens cost AR about 12 forwards, while a PD plan of two entries alone cost 9):

* answers are long against their plans: mostly three or four spans of 6-14 tokens, each announced by a
  3-token plan entry, so the plan is a small part of the critical path and the spans' parallelism decides it;
* letters are distinct across the prompt, so a letter names its part and its place: the next letter of an
  answer is found by content (the letter before / after the one just written, or the next larger one), in AR
  and inside a span alike, whatever the list's length;
* the independent parts of a prompt have one length, an odd number of letters (5 to 13): every span of a
  round has the same length and its answer fills it exactly. Under PD a span sees the prefix and itself only,
  so its position is all that tells it which plan entry it fills; with equal spans, span ``j`` starts
  ``j x (span + 2)`` tokens after the plan, a regular lattice with a margin of half a span, instead of a sum
  of the earlier spans' lengths (which a tiny model did not learn to count). Both ends of every span are
  anchored (its first letter and the ``;``), so a span fills from both ends at once;
* the training starts on short prompts (:class:`~pd_kernels.tiny.train.TrainConfig`'s ``curriculum``): with
  the long ones from the first step the model stayed on a loss plateau.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from .._checks import cdiv

LETTERS = tuple("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")   # in sort order
_RANK = {c: i for i, c in enumerate(LETTERS)}
OPS = ("rev", "sort")
THEN = "then"
SEP = ";"
LENGTH_SCALE = 2        # masks per announced unit (DecodeConfig.length_scale of the tiny model)
MAX_PARTS = 5           # parts per prompt (independent ones, then at most one ``then`` part)
MAX_ROUND_PARTS = 4     # independent parts (spans of round 1)
PLANNED_ITEMS = (5, 7, 9, 11, 13)   # list lengths of planned parts (one length per prompt) ...
LENGTH_WEIGHTS = (1, 1, 2, 3, 3)    # ... drawn with these weights
SHORT_MAX = 3           # a one-part prompt with at most this many letters is answered without a plan
EVAL_BUCKETS = 10       # one prompt in EVAL_BUCKETS (by a hash of its text) is held out of training


def apply_op(op: str, items: tuple[str, ...]) -> tuple[str, ...]:
    """The answer letters of ``op`` on ``items``."""
    if op == "rev":
        return tuple(reversed(items))
    if op == "sort":
        return tuple(sorted(items, key=lambda c: _RANK.get(c, len(LETTERS))))
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
    lengths = set()
    for i, p in enumerate(parts):
        if p.op not in OPS:
            raise ValueError(f"part {i + 1}: unknown operation {p.op!r} (expected one of {', '.join(OPS)})")
        if p.then:
            if i == 0:
                raise ValueError(f"part {i + 1}: '{THEN} {p.op}' needs a previous part to read")
            if p.items:
                raise ValueError(f"part {i + 1}: '{THEN} {p.op}' takes no letters of its own")
            if i != len(parts) - 1:
                raise ValueError(f"part {i + 1}: at most one '{THEN} OP' part, and it comes last")
            continue
        n = len(p.items)
        if n < 1:
            raise ValueError(f"part {i + 1} has no letters")
        if n not in PLANNED_ITEMS and not (len(parts) == 1 and n <= SHORT_MAX):
            raise ValueError(f"part {i + 1} has {n} letters: the model was trained on "
                             f"{', '.join(map(str, PLANNED_ITEMS))} letters per part (or 1 to {SHORT_MAX} "
                             f"in a one-part prompt)")
        lengths.add(n)
        bad = [c for c in p.items if c not in _RANK]
        if bad:
            raise ValueError(f"part {i + 1}: {bad[0]!r} is not one of the letters a-z, A-Z")
        seen = {c for q in parts[:i] for c in q.items}
        dup = [c for j, c in enumerate(p.items) if c in seen or c in p.items[:j]]
        if dup:
            raise ValueError(f"letter {dup[0]!r} appears twice: letters must be distinct across the prompt "
                             f"(the model was trained so)")
        if i >= MAX_ROUND_PARTS:
            raise ValueError(f"at most {MAX_ROUND_PARTS} independent parts (a round has at most "
                             f"{MAX_ROUND_PARTS} spans), then at most one '{THEN} OP' part")
    if len(lengths) > 1:
        raise ValueError(f"the parts have {' and '.join(map(str, sorted(lengths)))} letters: the parts of a "
                         f"prompt must have the same number of letters (the model was trained so)")


def parse_prompt(text: str) -> Example:
    """An :class:`Example` from a prompt in the task's own words, e.g. ``"rev h o e k c ; sort n d J f b ; then rev"``.
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
    """Seeded stream of examples (kinds below, by weight); the list length of a prompt's parts is drawn from
    :data:`PLANNED_ITEMS`, letters are drawn without replacement across the prompt.

    ``split="train"`` never yields a held-out prompt, ``split="eval"`` only held-out ones: a prompt is held
    out by a hash of its text (:func:`is_held_out`), so any seed draws fresh held-out prompts."""

    #: (kind, weight): ``"k"`` = k independent parts (one round of k spans); ``"dependent"`` = one to three
    #: independent parts and a ``then`` part (a <sync/> round); ``"short"`` = one part of 1..SHORT_MAX letters
    KINDS = (("1", 0.03), ("2", 0.12), ("3", 0.30), ("4", 0.45), ("dependent", 0.07), ("short", 0.03))

    def __init__(self, seed: int, split: str = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.rng = random.Random(seed)
        self.split = split
        acc, self._cum = 0.0, []
        for k, w in self.KINDS:
            acc += w
            self._cum.append((k, acc))

    def _parts(self, k: int, n: int) -> list[Part]:
        letters = self.rng.sample(LETTERS, k * n)   # distinct across the prompt
        return [Part(self.rng.choice(OPS), tuple(letters[i * n:(i + 1) * n])) for i in range(k)]

    def _draw(self) -> Example:
        r = self.rng.random()
        kind = next((k for k, w in self._cum if r < w), "short")
        if kind == "short":
            return Example(tuple(self._parts(1, self.rng.randint(1, SHORT_MAX))))
        n = self.rng.choices(PLANNED_ITEMS, LENGTH_WEIGHTS)[0]
        if kind == "dependent":
            parts = self._parts(self.rng.randint(1, MAX_ROUND_PARTS - 1), n)
            return Example(tuple(parts + [Part(self.rng.choice(OPS), (), then=True)]))
        return Example(tuple(self._parts(int(kind), n)))

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
    return cdiv(answer_words, LENGTH_SCALE)


def max_answer_len() -> int:
    """Longest answer of the task in tokens (every part's letters and ``;``)."""
    return MAX_ROUND_PARTS * (max(PLANNED_ITEMS) + 1)
