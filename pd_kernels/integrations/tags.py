"""Control tags from a tokenizer: the :class:`~pd_kernels.ControlTags` of a checkpoint, looked up by text.

A planned-diffusion tokenizer holds the control tags as tokens (SPEC section 2: ``<|mask|>``, ``<async>``,
``<promise>``, ...). :func:`tags_from_tokenizer` finds their ids by text (the texts of :data:`TAG_TEXTS`, in
order), EOS also as the tokenizer's ``eos_token``, the digits as the tokens ``"0"``..``"9"``; ``overrides``
name any of them explicitly. :func:`missing_tags` says what a tokenizer lacks (a plain Llama or Qwen tokenizer
lacks every tag but EOS: such a checkpoint decodes ``mode="ar"`` only, with stand-in ids for the rest).

Works with any transformers tokenizer (``get_vocab``, ``encode(..., add_special_tokens=False)``, ``decode``,
``eos_token_id``, ``len``).
"""
from __future__ import annotations

from typing import Mapping

from ..decoder import ControlTags

#: Texts of the planned-diffusion control tags in a PD tokenizer (SPEC section 2), alternatives in order.
TAG_TEXTS: dict[str, tuple[str, ...]] = {
    "eos": ("<|im_end|>",),
    "mask": ("<|mask|>",),
    "async_open": ("<async>",),
    "async_close": ("</async>",),
    "promise": ("<promise>-<topic>", "<promise>"),
    "topic_close": ("</topic>",),
    "sync": ("<sync/>", "<sync>"),
    "pad": ("[PAD]",),
}


def _token_id(tok, vocab: dict, text: str) -> int | None:
    """The id of ``text`` if the tokenizer holds it as one token (its own vocabulary or an added token)."""
    if text in vocab:
        return int(vocab[text])
    ids = tok.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 and tok.decode(ids) == text else None


def _lookup(tok, overrides: Mapping[str, int | str] | None) -> tuple[dict[str, int], list[int | None]]:
    """``(ids found per tag name, digit ids with None where missing)``: ``overrides`` first, then the texts of
    :data:`TAG_TEXTS`, then (EOS only) ``tok.eos_token_id``."""
    vocab = tok.get_vocab()
    ids: dict[str, int] = {}
    for name, value in (overrides or {}).items():
        if name not in TAG_TEXTS:
            raise ValueError(f"unknown control tag {name!r}; tags: {', '.join(TAG_TEXTS)}")
        if isinstance(value, str):
            found = _token_id(tok, vocab, value)
            if found is None:
                raise ValueError(f"control tag {name}={value!r}: the tokenizer has no single token {value!r}")
            ids[name] = found
        else:
            ids[name] = value   # an id: ControlTags checks it
    for name, texts in TAG_TEXTS.items():
        if name not in ids:
            found = next((i for i in (_token_id(tok, vocab, t) for t in texts) if i is not None), None)
            if found is not None:
                ids[name] = found
    if "eos" not in ids and getattr(tok, "eos_token_id", None) is not None:
        ids["eos"] = int(tok.eos_token_id)
    return ids, [_token_id(tok, vocab, str(d)) for d in range(10)]


def _describe(name: str) -> str:
    return "digits 0-9" if name == "digits" else f"{name} ({TAG_TEXTS[name][0]})"


def missing_tags(tokenizer, overrides: Mapping[str, int | str] | None = None) -> dict[str, str]:
    """What ``tokenizer`` lacks of the :class:`~pd_kernels.ControlTags` (after ``overrides``): tag name ->
    a description naming its text (``{"mask": "mask (<|mask|>)", ...}``), ``"digits"`` if any of the digit
    tokens ``"0"``..``"9"`` is missing. Empty for a planned-diffusion tokenizer."""
    ids, digits = _lookup(tokenizer, overrides)
    names = [n for n in TAG_TEXTS if n not in ids] + (["digits"] if None in digits else [])
    return {n: _describe(n) for n in names}


def tags_from_tokenizer(tokenizer, overrides: Mapping[str, int | str] | None = None, *, stand_ins: bool = False,
                        vocab_size: int | None = None) -> ControlTags:
    """The :class:`~pd_kernels.ControlTags` of ``tokenizer``, read by the tags' texts (:data:`TAG_TEXTS`).

    Args:
        tokenizer: a transformers tokenizer (any object with ``get_vocab``, ``encode``, ``decode``,
            ``eos_token_id`` and ``len``).
        overrides: tag name -> an id (int) or a token text (str), taking precedence over the lookup (names:
            the keys of :data:`TAG_TEXTS`).
        stand_ins: for ``mode="ar"`` on a tokenizer without planned-diffusion tags (AR needs EOS only): give
            every missing tag and digit a stand-in id no text encodes to where possible: ids between the
            tokenizer's length and ``vocab_size``, then the tokenizer's reserved tokens, then the highest ids.
            :func:`missing_tags` says which ids are stand-ins.
        vocab_size: the model's vocabulary size (``model.config.vocab_size``; default ``len(tokenizer)``),
            where stand-in ids are taken from.

    Raises ``ValueError`` naming what is wrong: an unknown override name or a text that is not one token; a
    missing tag or digit (without ``stand_ins``); no EOS at all; ids that are not distinct.
    """
    ids, digits = _lookup(tokenizer, overrides)
    missing = [n for n in TAG_TEXTS if n not in ids]
    if "eos" in missing:
        raise ValueError("the tokenizer has no end-of-sequence token (<|im_end|> or eos_token): give its id as "
                         "overrides={'eos': ...}")
    if (missing or None in digits) and not stand_ins:
        described = ", ".join(missing_tags(tokenizer, overrides).values())
        raise ValueError(f"the tokenizer has no planned-diffusion control tag for {described}: name them in "
                         f"overrides, or (mode='ar' only) pass stand_ins=True")
    if missing or None in digits:
        vocab_size = len(tokenizer) if vocab_size is None else int(vocab_size)
        used = set(ids.values()) | {d for d in digits if d is not None}
        reserved = sorted((i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                           if "reserved" in str(t) and i < vocab_size), reverse=True)
        pool = [*range(vocab_size - 1, len(tokenizer) - 1, -1), *reserved, *range(vocab_size - 1, -1, -1)]
        stand = list(dict.fromkeys(i for i in pool if i not in used))
        if len(stand) < len(missing) + digits.count(None):
            raise ValueError(f"no {len(missing) + digits.count(None)} free ids below vocab_size {vocab_size} to "
                             f"stand in for the missing control tags")
        stand.reverse()   # pop() takes them in pool order
        for n in missing:
            ids[n] = stand.pop()
        digits = [d if d is not None else stand.pop() for d in digits]
    try:
        return ControlTags(**ids, digits=tuple(digits))
    except ValueError as e:
        raise ValueError(f"control tags from the tokenizer: {e}") from None
