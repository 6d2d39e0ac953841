"""Word-level tokenizer of the tiny planned-diffusion model: one token per whitespace-separated word.

The vocabulary holds the control tags of SPEC section 2 (their ids given to the decoder as a
:class:`~pd_kernels.ControlTags`), three *format* tags that end a prompt and select how the model answers
(``<ar>``: the answer token by token; ``<pd>``: plan then spans; ``<diffusion>``: the whole answer as one
block of masks), the digits, and the task's words. An unknown word raises ``ValueError`` naming it.

Saved as ``vocab.json`` plus a Hugging Face ``tokenizer.json`` (WordLevel model, whitespace split), so
``transformers.PreTrainedTokenizerFast.from_pretrained(dir)`` loads the same ids.
"""
from __future__ import annotations

import json
import os

from ..decoder.config import ControlTags
from . import task

TAG_NAMES = {"eos": "<|im_end|>", "mask": "<|mask|>", "async_open": "<async>", "async_close": "</async>",
             "promise": "<promise>-<topic>", "topic_close": "</topic>", "sync": "<sync/>", "pad": "[PAD]"}
FORMATS = {"ar": "<ar>", "pd": "<pd>", "diffusion": "<diffusion>"}
DIGITS = tuple(str(i) for i in range(10))


def default_vocab() -> list[str]:
    return [*TAG_NAMES.values(), *FORMATS.values(), *DIGITS, *task.LETTERS, *task.OPS, task.THEN, task.SEP]


class TinyTokenizer:
    """``encode(text) -> ids``, ``decode(ids) -> text``; ``tags`` (:class:`ControlTags`) and ``format_id``
    (the id of a format tag) for the decoder."""

    def __init__(self, vocab: list[str] | None = None):
        self.vocab = list(vocab or default_vocab())
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        if len(self.ids) != len(self.vocab):
            raise ValueError("tokenizer vocabulary has duplicate words")
        missing = [w for w in (*TAG_NAMES.values(), *FORMATS.values(), *DIGITS) if w not in self.ids]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks {missing}")
        self.tags = ControlTags(**{k: self.ids[w] for k, w in TAG_NAMES.items()},
                                digits=tuple(self.ids[d] for d in DIGITS))

    def __len__(self) -> int:
        return len(self.vocab)

    def format_id(self, fmt: str) -> int:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {tuple(FORMATS)}, got {fmt!r}")
        return self.ids[FORMATS[fmt]]

    def encode(self, text_or_words) -> list[int]:
        words = text_or_words.split() if isinstance(text_or_words, str) else list(text_or_words)
        out = []
        for w in words:
            i = self.ids.get(w)
            if i is None:
                raise ValueError(f"word {w!r} is not in the tiny model's vocabulary")
            out.append(i)
        return out

    def encode_prompt(self, prompt: str, fmt: str) -> list[int]:
        """Prompt ids followed by the format tag of ``fmt`` (``"ar"``, ``"pd"`` or ``"diffusion"``)."""
        return self.encode(prompt) + [self.format_id(fmt)]

    def encode_example(self, example: "task.Example", fmt: str, *, diffusion_len: int) -> tuple[list[int], int]:
        """The training sequence of ``example`` in format ``fmt`` -> ``(ids, response_start)``.

        * ``ar``: prompt ``<ar>`` answer EOS;
        * ``pd``: prompt ``<pd>``, then per round the plan (``<promise>-<topic> N </topic>`` per part), one
          ``<async>`` answer ``[PAD]``... ``</async>`` block per part, ``<sync/>`` between rounds, EOS at the end;
          a short example (``example.planned`` false): prompt ``<pd>`` answer EOS;
        * ``diffusion``: prompt ``<diffusion>`` answer EOS, then EOS up to ``diffusion_len`` answer tokens.
        """
        T = TAG_NAMES
        words = example.prompt.split() + [FORMATS["pd" if fmt == "pd-da" else fmt]]
        start = len(words)
        answer = example.answer
        if fmt == "ar" or (fmt in ("pd", "pd-da") and not example.planned):
            words += answer + [T["eos"]]
        elif fmt in ("pd", "pd-da"):
            parts = example.part_answers()
            rounds = example.rounds()
            for r, idx in enumerate(rounds):
                ns = [task.plan_length(len(parts[i])) for i in idx]
                for i, n in zip(idx, ns):
                    words += [T["promise"], *str(n), T["topic_close"]]
                for i, n in zip(idx, ns):
                    words += [T["async_open"], *parts[i], *[T["pad"]] * (n * task.LENGTH_SCALE - len(parts[i])),
                              T["async_close"]]
                words.append(T["sync"] if r + 1 < len(rounds) else T["eos"])
        elif fmt == "diffusion":
            if len(answer) + 1 > diffusion_len:
                raise ValueError(f"answer of {len(answer)} tokens + EOS does not fit diffusion_len={diffusion_len}")
            words += answer + [T["eos"]] * (diffusion_len - len(answer))
        else:
            raise ValueError(f"fmt must be 'ar', 'pd', 'pd-da' or 'diffusion', got {fmt!r}")
        return self.encode(words), start

    def pd_rounds(self, example: "task.Example") -> list[list[int]]:
        """The AR tokens of each round of ``example``'s PD answer, terminators excluded: what a decoder in
        ``pd`` mode records as the plans (:attr:`pd_kernels.decoder.GenerationResult.plans`) when the model
        writes the reference plan (for a short example: its answer)."""
        ids, start = self.encode_example(example, "pd", diffusion_len=1)
        tags = self.tags
        rounds, cur, inside = [], [], False
        for t in ids[start:]:
            if t == tags.async_open or t == tags.async_close:
                inside = t == tags.async_open
            elif not inside and t in (tags.sync, tags.eos):
                rounds.append(cur)
                cur = []
            elif not inside:
                cur.append(t)
        return rounds

    def decode(self, ids, *, skip_special: bool = False) -> str:
        special = set(self.tags.specials) | {self.ids[f] for f in FORMATS.values()}
        return " ".join(self.vocab[int(i)] for i in ids if not (skip_special and int(i) in special))

    # ---- files -----------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """``vocab.json`` (this class) and ``tokenizer.json`` / ``tokenizer_config.json`` (transformers)."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "vocab.json"), "w") as f:
            json.dump(self.vocab, f, indent=0)
        specials = [*TAG_NAMES.values(), *FORMATS.values()]
        hf = {"version": "1.0", "truncation": None, "padding": None,
              "added_tokens": [{"id": self.ids[w], "content": w, "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True} for w in specials],
              "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
              "decoder": None, "model": {"type": "WordLevel", "vocab": self.ids, "unk_token": "[UNK]"}}  # no [UNK] in the vocab: unknown words raise
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump(hf, f, indent=0)
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": TAG_NAMES["eos"],
                       "pad_token": TAG_NAMES["pad"], "mask_token": TAG_NAMES["mask"],
                       "model_max_length": 512}, f, indent=1)

    @classmethod
    def load(cls, path: str) -> "TinyTokenizer":
        file = os.path.join(path, "vocab.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"{path}: no vocab.json (not a tiny planned-diffusion checkpoint)")
        with open(file) as f:
            return cls(json.load(f))
