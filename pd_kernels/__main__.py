"""``python -m pd_kernels <command>`` (console script ``pd-kernels``).

Commands live in :data:`COMMANDS` (name -> :class:`Command`): each adds its own options to a sub-parser
and runs with the parsed arguments; :func:`main` owns what every command shares: the default command
(``demo``), one-line errors, Ctrl-C and closed pipes. To add a command, write ``add_arguments(parser)`` and
``run(args) -> int`` and register them in :data:`COMMANDS`.

``demo``: planned diffusion, live. With no arguments: the tiny planned-diffusion model shipped in the
package (:mod:`pd_kernels.tiny`, trained on a synthetic list task) on a fixed held-out prompt, on the GPU if
there is one, else the CPU with the torch backend. Prints, from the decoder's stream of events, the plan the
model writes, the spans filling in (coloured and updated in place on a terminal) and each span as soon as it
is final, in order, while later ones are still diffusing; whether the answer matches the task's ground
truth; then a stats table: critical path (sequential forward passes) of AR, PD, PD-DA and diffusion on that
prompt. ``--prompt`` takes a task prompt in the task's words (``"rev h o e ; sort k d a f b ; then rev"``).
``--model random``: a tiny random-weight Qwen2 with a forced two-round plan (random weights plan nothing
sensible), PD against AR for the same number of answer tokens. ``--check-batch`` then checks that a
request's tokens do not depend on its batch. ``--model PATH`` runs a checkpoint with its tokenizer (the
model writes its own plan): one written by ``train`` like the shipped model, any other with the control tags
read from its tokenizer by their text (or given with ``--tag``).

``train``: train the tiny planned-diffusion model (the defaults reproduce the shipped checkpoint).
``eval``: its accuracy against critical path over held-out prompts (JSON + Pareto plot).

Exit status: 0 done, 1 an error (one line on stderr, ``pd-kernels: error: ...``; ``--traceback`` shows the
full traceback), 2 a bad command line (argparse), 130 interrupted (Ctrl-C), 141 output pipe closed
(``demo | head``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from .tiny import cli as _tiny_cli  # argument parsers of `train` / `eval` (torch is imported when they run)

COLORS = ["\x1b[36m", "\x1b[33m", "\x1b[35m", "\x1b[32m", "\x1b[34m", "\x1b[31m"]
DIM, RESET, BOLD = "\x1b[2m", "\x1b[0m", "\x1b[1m"

# Texts of the planned-diffusion control tags in a PD tokenizer (SPEC section 2), alternatives in order.
TAG_TEXTS = {
    "eos": ("<|im_end|>",),
    "mask": ("<|mask|>",),
    "async_open": ("<async>",),
    "async_close": ("</async>",),
    "promise": ("<promise>-<topic>", "<promise>"),
    "topic_close": ("</topic>",),
    "sync": ("<sync/>", "<sync>"),
    "pad": ("[PAD]",),
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# ---------------------------------------------------------------------------------------------------
# argument types: a bad value is an argparse error (usage + one line, exit 2)
# ---------------------------------------------------------------------------------------------------
def _number(cast, lo, hi=math.inf, *, lo_open: bool = False, note: str = ""):
    """An argparse type: ``cast`` (int or float) of the text, finite, in ``[lo, hi]`` (``(lo, hi]`` when
    ``lo_open``); the messages name the range."""
    rng = (f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]" if math.isfinite(hi)
           else f"{'>' if lo_open else '>='} {lo:g}")
    finite = "a finite number " if cast is float and not math.isfinite(hi) else ""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if cast is int else 'a number'} {rng}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(f"must be {finite}{rng}{note}, got {text}")
        return v
    return parse


_positive_int = _number(int, 1)
_non_negative_int = _number(int, 0)
_positive_float = _number(float, 0, lo_open=True)
_non_negative_float = _number(float, 0)
_probability = _number(float, 0, 1, note=" (a confidence)")
_top_p = _number(float, 0, 1, lo_open=True)


def _tag(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=TOKEN or NAME=ID, got {text!r}")
    if name not in TAG_TEXTS:
        raise argparse.ArgumentTypeError(f"unknown tag {name!r}; tags: {', '.join(TAG_TEXTS)}")
    return name, value


# ---------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------
class _Live:
    """The live view of request 0, drawn from the decoder's stream events (:meth:`pd_kernels.Decoder.stream`).

    Per round: the plan, then the spans filling in (one line per span, redrawn in place on a terminal). A span's
    text is final when it finishes, so the finished spans are shown in order as soon as every span before them
    is final, while later ones are still diffusing: on a terminal in a "final so far" line, otherwise as one
    ``span j final: ...`` line each, saying which spans are still diffusing."""

    def __init__(self, decode, tags, tty: bool):
        self.decode, self.mask, self.tty = decode, tags.mask, tty
        self.hidden = set(tags.specials)   # not part of the answer text
        self.drawn = 0

    def __call__(self, ev) -> None:
        from .decoder import RoundFinished, RoundStarted, SpanCommit, SpanFinished

        if ev.request != 0:
            return
        if isinstance(ev, RoundStarted):
            plan = self.decode(list(ev.plan)) if ev.plan else f"(none: one answer block of {ev.span_lengths[0]} masks)"
            print(f"{BOLD if self.tty else ''}round {ev.round}: plan{RESET if self.tty else ''} {plan}")
            self.spans = [[self.mask] * n for n in ev.span_lengths]
            self.starts, self.final, self.shown, self.drawn = ev.span_starts, [False] * len(ev.span_lengths), 0, 0
        elif isinstance(ev, SpanCommit):
            for p, t in zip(ev.positions, ev.tokens):
                self.spans[ev.span][p - self.starts[ev.span]] = t
        elif isinstance(ev, SpanFinished):
            self.spans[ev.span], self.final[ev.span] = list(ev.tokens), True
            while self.shown < len(self.final) and self.final[self.shown]:   # finished spans, in order
                if not self.tty:
                    busy = [str(j) for j, f in enumerate(self.final) if not f]
                    tail = f"   (span {', '.join(busy)} still diffusing)" if busy else ""
                    print(f"  span {self.shown} final: {self._text(self.spans[self.shown])}{tail}")
                self.shown += 1
        elif not isinstance(ev, RoundFinished):
            return
        if self.tty:
            self._draw()

    def _text(self, toks) -> str:
        return self.decode([t for t in toks if t not in self.hidden])

    def _draw(self) -> None:
        import shutil

        width = shutil.get_terminal_size().columns
        lines = []
        for j, toks in enumerate(self.spans):   # one terminal row per span (a wrapped row breaks the redraw)
            c, room, parts = COLORS[j % len(COLORS)], width - 22, []
            for t in toks:
                piece = "_" if t == self.mask else self.decode([t])
                room -= len(piece)
                if room < 1:
                    parts.append("...")
                    break
                parts.append(f"{DIM}_{RESET}" if t == self.mask else f"{c}{piece}{RESET}")
            done = sum(t != self.mask for t in toks)
            lines.append(f"  span {j} [{done:3d}/{len(toks)}]{'*' if self.final[j] else ' '}{''.join(parts)}")
        final = "".join(self._text(self.spans[j]) for j in range(self.shown))
        lines.append(f"  {BOLD}final so far:{RESET} {final[-(width - 16):] if final else '...'}")
        if self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}A")
        for ln in lines:
            sys.stdout.write("\x1b[2K" + ln + "\n")
        self.drawn = len(lines)
        sys.stdout.flush()


@dataclass
class _Setup:
    model: object
    decode: Callable
    tags: object
    prompt: list
    forced: list | None
    length_scale: int
    notes: list            # lines printed before the prompt
    raw_answer: bool = False  # print the generated sequence, not the answer (tag ids are stand-ins)
    title: str = ""           # what runs, for the first line (default: --model)
    diffusion_len: int | None = None  # answer length of --mode diffusion (default: --max-new-tokens)
    tiny: object = None       # the trained tiny model's (TinyPD, task example): ground truth and every mode


def _device(args) -> str:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available to torch")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _prompt_text(args, default: str) -> str:
    if args.prompt is None:
        return default
    if not args.prompt.strip():
        raise CLIError("--prompt is empty (or only whitespace)")
    return args.prompt


def _tiny_setup(args) -> _Setup:
    from .decoder import make_plan
    from .models import TINY_TAGS, ToyTokenizer, tiny_model

    if args.tag:
        raise CLIError("--tag applies to --model checkpoints (the built-in model has fixed tag ids)")
    model = tiny_model(seed=0, device=_device(args))
    tok = ToyTokenizer(TINY_TAGS)
    T = TINY_TAGS
    prompt = tok.encode(_prompt_text(args, "tell me three things about planned diffusion"))
    plan = [make_plan(T, [3, 2, 4], topic_tokens=[[101, 102], [103], [104, 105]], terminator="sync"),
            make_plan(T, [2, 3], topic_tokens=[[106], [107, 108]], terminator="eos")]
    return _Setup(model, tok.decode, T, prompt, [plan], 8, [], title="built-in random-weight tiny model, forced plan")


TINY_PD_PROMPT = "rev h o e k c ; sort n d j f b i g ; then rev"  # held out of training


def _tiny_pd_setup(args) -> _Setup:
    """The trained tiny planned-diffusion model (the shipped one, or a ``train --out`` directory)."""
    from .models import load_tiny_pd
    from .tiny import task

    if args.tag:
        raise CLIError("--tag applies to --model checkpoints other than the tiny planned-diffusion model (its tag "
                       "ids are in its files)")
    try:
        ex = task.parse_prompt(_prompt_text(args, TINY_PD_PROMPT))
    except ValueError as e:
        raise CLIError(f"--prompt: {e}") from None
    tp = load_tiny_pd(args.model, device=_device(args))
    title = f"tiny planned-diffusion model {'(shipped)' if args.model is None else args.model}"
    return _Setup(tp.model, tp.tokenizer.decode, tp.tokenizer.tags, tp.prompt_ids(ex.prompt, args.mode), None,
                  tp.length_scale, [], title=title, diffusion_len=tp.diffusion_len, tiny=(tp, ex))


def _tiny_pd_compare(s: _Setup, cfg, backend: str | None, mode: str, res) -> list:
    """Stats rows of every mode on the tiny model's prompt (``mode`` already decoded as ``res``), each
    labelled with its answer's verdict; prints the answers of the other modes."""
    from .decoder import Decoder

    tp, ex = s.tiny
    rows = []
    for m in ("ar", "pd", "pd-da", "diffusion"):
        r = res if m == mode else Decoder(s.model, cfg.replace(mode=m), backend=backend).generate(
            [tp.prompt_ids(ex.prompt, m)])[0]
        ok = ex.check(tp.tokenizer.decode(r.answer))
        if m != mode:
            print(f"  {m:9s} ({'correct' if ok else 'wrong'}): {tp.tokenizer.decode(r.answer)}")
        rows.append((f"{m} {'ok' if ok else 'WRONG'}", r.stats))
    return rows


def _token_id(tok, vocab: dict, text: str) -> int | None:
    """The id of ``text`` if the tokenizer holds it as one token (its own vocabulary or an added token)."""
    if text in vocab:
        return int(vocab[text])
    ids = tok.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 and tok.decode(ids) == text else None


def resolve_tags(tok, mode: str, given: list[tuple[str, str]], model_vocab: int):
    """:class:`~pd_kernels.ControlTags` of a checkpoint's tokenizer: ``--tag`` values first (an id or a token
    text), then the PD texts of :data:`TAG_TEXTS`, then (EOS only) the tokenizer's ``eos_token``; digits are
    the tokens ``"0"``..``"9"``. Returns ``(tags, notes)``.

    ``pd`` / ``pd-da`` / ``diffusion`` need every tag and digit: a missing one is a :class:`CLIError` naming
    it. ``ar`` needs EOS only; the other ids stand in (ids past the tokenizer's vocabulary, else reserved
    tokens, else the highest ids) and a note says which."""
    from .decoder import ControlTags

    vocab = tok.get_vocab()
    ids: dict[str, int] = {}
    for name, value in given:
        if value.lstrip("-").isdigit():
            ids[name] = int(value)
        else:
            found = _token_id(tok, vocab, value)
            if found is None:
                raise CLIError(f"--tag {name}={value}: the tokenizer has no single token {value!r}")
            ids[name] = found
    for name, texts in TAG_TEXTS.items():
        if name not in ids:
            for text in texts:
                found = _token_id(tok, vocab, text)
                if found is not None:
                    ids[name] = found
                    break
    if "eos" not in ids and tok.eos_token_id is not None:
        ids["eos"] = int(tok.eos_token_id)
    digits = [_token_id(tok, vocab, str(d)) for d in range(10)]
    missing = [n for n in TAG_TEXTS if n not in ids]
    described = [f"{n} ({TAG_TEXTS[n][0]})" for n in missing] + (["digits 0-9"] if None in digits else [])
    notes = []
    if described and mode != "ar":
        raise CLIError(f"the tokenizer has no planned-diffusion control tag for {', '.join(described)}: this "
                       f"checkpoint was not trained for planned diffusion; use --mode ar, or name the tags with "
                       f"--tag NAME=TOKEN_OR_ID")
    if "eos" not in ids:
        raise CLIError("the tokenizer has no end-of-sequence token (<|im_end|> or eos_token): "
                       "name it with --tag eos=...")
    if described:  # AR needs only EOS: stand-in ids for the rest, preferably ids no text encodes to
        used = set(ids.values()) | {d for d in digits if d is not None}
        reserved = sorted((i for i, t in getattr(tok, "added_tokens_decoder", {}).items()
                           if "reserved" in str(t) and i < model_vocab), reverse=True)
        pool = [i for i in [*range(model_vocab - 1, len(tok) - 1, -1), *reserved, *range(model_vocab - 1, -1, -1)]
                if i not in used]
        stand = iter(dict.fromkeys(pool))
        for n in missing:
            ids[n] = next(stand)
        digits = [d if d is not None else next(stand) for d in digits]
        notes.append(f"note: the tokenizer has no {', '.join(described)}: AR mode needs only EOS; ids "
                     f"{[ids[n] for n in missing]} stand in for {', '.join(missing)} (MASK, {ids['mask']}, is never "
                     f"sampled) and the answer is printed from the raw sequence")
    try:
        return ControlTags(**ids, digits=tuple(digits)), notes
    except ValueError as e:
        raise CLIError(f"control tags from the tokenizer: {e}") from None


def _real_setup(args) -> _Setup:
    import json

    import torch

    from .integrations.transformers import check_model

    path = args.model
    if not os.path.exists(path):
        raise CLIError(f"--model {path}: no such file or directory")
    if not os.path.isdir(path):
        raise CLIError(f"--model {path}: not a directory (expected a checkpoint directory with config.json)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CLIError(f"--model {path}: not a checkpoint directory (no config.json)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except ValueError as e:
        raise CLIError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CLIError(f"{cfg_path} does not hold a JSON object")
    device = _device(args)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mt = str(raw.get("model_type", "")).lower()
    try:
        if mt == "dream":
            from .integrations.dream import load_dream

            model = load_dream(path, dtype=dtype, device=device)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"cannot load the model in {path}: {e}") from None
    check_model(model)  # refuse a model the kernels cannot run before loading anything else
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CLIError(f"cannot load the tokenizer of {path}: {e}") from None
    tags, notes = resolve_tags(tok, args.mode, args.tag or [], model.config.vocab_size)
    text = _prompt_text(args, "Give three tips for staying healthy.")
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = tok.encode(text)
    if not ids:
        raise CLIError("the prompt encodes to no tokens")
    return _Setup(model, lambda t: tok.decode(t), tags, [int(i) for i in ids], None, 10, notes,
                  raw_answer=bool(notes))


def critical_path_line(mode: str, path: int, ar_path: int) -> str:
    """The summary line comparing a mode's critical path with AR's, worded right either way."""
    if path == ar_path:
        cmp = "the same number of sequential forward passes as AR"
    elif path < ar_path:
        cmp = f"{ar_path / max(1, path):.2f}x fewer sequential forward passes than AR"
    else:
        cmp = f"{path / max(1, ar_path):.2f}x more sequential forward passes than AR"
    return f"critical path: {mode} {path} vs AR {ar_path} steps ({cmp})"


def demo(args) -> int:
    import pd_kernels

    from .decoder import DecodeConfig, Decoder, RequestFinished, format_table

    t_start = time.perf_counter()
    if args.model is None or os.path.isfile(os.path.join(args.model, "pd_kernels.json")):
        s = _tiny_pd_setup(args)  # the shipped tiny planned-diffusion model, or one written by `train`
    else:
        s = _tiny_setup(args) if args.model == "random" else _real_setup(args)
    if not s.prompt:
        raise CLIError("the prompt encodes to no tokens")
    device = next(s.model.parameters()).device
    backend = args.backend or ("torch" if device.type == "cpu" else None)
    tty = sys.stdout.isatty() and not args.plain
    print(f"pd_kernels {pd_kernels.__version__} demo: {s.title or args.model}"
          f" on {device.type} (backend {backend or 'auto'}), mode {args.mode}")
    for note in s.notes:
        print(note)
    print(f"prompt: {s.decode(s.prompt)}")
    try:
        cfg = DecodeConfig(mode=args.mode, steps_ratio=args.steps_ratio, tau=args.tau, policy=args.policy,
                           tags=s.tags, length_scale=args.length_scale or s.length_scale,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                           top_p=args.top_p, diffusion_len=s.diffusion_len)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    live = _Live(s.decode, s.tags, tty) if args.mode != "ar" else None
    res = None
    for ev in Decoder(s.model, cfg, backend=backend).stream([s.prompt], s.forced):
        if live is not None:
            live(ev)
        if isinstance(ev, RequestFinished):
            res = ev.result
    answer = s.decode(res.sequence[len(s.prompt):]) if s.raw_answer else res.text(s.decode)
    print(f"answer ({res.finish_reason}): {answer}")
    if s.tiny is not None:
        ex = s.tiny[1]
        print(f"ground truth: {' '.join(ex.answer)}  -> {'correct' if ex.check(answer) else 'WRONG'}")
    rows = [(args.mode, res.stats)]
    if s.tiny is not None and not args.no_baseline:
        print("the other modes on this prompt:")
        rows = _tiny_pd_compare(s, cfg, backend, args.mode, res)
    elif args.mode != "ar" and not args.no_baseline:
        # AR baseline on the same cache and kernels, for as many answer tokens
        ar_cfg = cfg.replace(mode="ar", max_new_tokens=max(1, len(res.answer)))
        ar = Decoder(s.model, ar_cfg, backend=backend).generate([s.prompt])[0]
        rows.append(("ar", ar.stats))
    print()
    print(format_table(rows))
    if len(rows) == 2:
        print(critical_path_line(args.mode, rows[0][1].critical_path, rows[1][1].critical_path))
    elif len(rows) > 2 and args.mode != "ar":
        path = {label.split()[0]: st.critical_path for label, st in rows}
        print(critical_path_line(args.mode, path[args.mode], path["ar"]))
    ok = check_batch(s, cfg, backend) if args.check_batch else True
    if device.type == "cpu":
        print("(CPU timings: a smoke run, not GPU performance)")
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 1


def _batch_requests(s, n: int = 8) -> tuple[list, list]:
    """``n`` requests of different lengths (and, for the tiny model, different forced plans) around the demo's."""
    from .decoder import make_plan

    p = s.prompt
    prompts = [p[:max(1, len(p) - k)] if k % 2 else (p + p[:k])[:len(p) + k] for k in range(n)]
    if s.forced is None:
        return prompts, [None] * n
    T = s.tags
    shapes = [[[3, 2, 4], [2, 3]], [[2]], [[1, 1, 1]], [[2], [1], [2]], [[4, 1]], [[1], [3]], [[2, 2]], [[5]]]
    plans = []
    for k in range(n):
        rounds = shapes[k % len(shapes)]
        plans.append([make_plan(T, nums, terminator="sync" if i < len(rounds) - 1 else "eos")
                      for i, nums in enumerate(rounds)])
    plans[0] = s.forced[0]
    return prompts, plans


def check_batch(s, cfg, backend) -> bool:
    """``--check-batch``: 8 requests decoded alone, all together, and joining while others run (max_batch 3),
    greedy and seeded sampling, dynamic and static step: a request's tokens must not depend on its batch.
    Returns False when a check that should hold fails."""
    from .decoder import Decoder

    prompts, plans = _batch_requests(s)
    print(f"\nbatch invariance: {len(prompts)} requests (prompt lengths {[len(p) for p in prompts]}), each decoded "
          f"alone vs all together (max_batch 8) vs joining while others run (max_batch 3)")
    ok = True
    for kind, temp in (("greedy", 0.0), ("sampled", cfg.temperature or 1.0)):
        c = cfg.replace(temperature=temp, mode=cfg.mode)
        seeds = [cfg.seed + k for k in range(len(prompts))] if temp else None   # one seed per request
        for step in ("dynamic", "static"):
            kw = dict(backend=backend, static_step=step == "static")
            alone = [Decoder(s.model, c, **kw).generate([p], [f], seeds=None if seeds is None else [seeds[k]])[0]
                     for k, (p, f) in enumerate(zip(prompts, plans))]
            bad = []
            for mb in (8, 3):
                out = Decoder(s.model, c, max_batch=mb, **kw).generate(prompts, plans, seeds=seeds)
                bad += [f"request {k} (max_batch {mb})" for k, (a, b) in enumerate(zip(alone, out))
                        if a.sequence != b.sequence]
            if not bad:
                verdict = "identical"
            else:
                verdict = f"DIFFERS: {', '.join(bad)}"
                ok = False
            print(f"  {kind:8s}{'' if not temp else f' T={temp:g}':7s} {step:8s} {verdict}")
    return ok


def _demo_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint directory with config.json, weights and tokenizer: a Dream / planned-diffusion "
                        "checkpoint, or any transformers family pd_kernels supports (Llama, Qwen2/3, Mistral, ...; "
                        "without PD tags in the tokenizer only --mode ar runs), or one written by `train`. Default: "
                        "the tiny planned-diffusion model shipped in the package; `random`: a tiny random-weight "
                        "model with a forced plan (./random for a directory of that name)")
    d.add_argument("--prompt", default=None, help="the user prompt (default: a fixed example); for the tiny "
                   "planned-diffusion model a task in its words, e.g. 'rev h o e ; sort k d a f b ; then rev' "
                   "(parts of 3, 5 or 7 distinct letters a-p, or one part of 1-2)")
    d.add_argument("--mode", default="pd", choices=["ar", "pd", "pd-da", "diffusion"],
                   help="decoding mode: ar (autoregressive baseline), pd (planned diffusion), pd-da (spans of a "
                        "round see each other), diffusion (no plan). Default: pd")
    d.add_argument("--steps-ratio", type=_positive_float, default=1.0,
                   help="diffusion steps per round = ratio x longest span (> 0; default 1.0)")
    d.add_argument("--tau", type=_probability, default=0.9,
                   help="confidence threshold of the threshold policies, in [0, 1] (default 0.9)")
    d.add_argument("--policy", default="schedule", choices=["schedule", "pd_threshold", "threshold"],
                   help="commit policy of a diffusion step (default: schedule)")
    d.add_argument("--length-scale", type=_positive_float, default=None,
                   help="mask tokens per unit a plan entry announces (> 0, may be a float: int(N x scale) masks; "
                        "default 10, random tiny model 8, trained tiny model 2)")
    d.add_argument("--temperature", type=_non_negative_float, default=0.0,
                   help="0 = greedy (default); > 0 samples, with noise keyed by (seed, step, position)")
    d.add_argument("--seed", type=_non_negative_int, default=0, help="RNG seed of the request (default 0)")
    d.add_argument("--top-p", type=_top_p, default=1.0,
                   help="nucleus filter in (0, 1], applied at every temperature as the PD reference does (default 1)")
    d.add_argument("--check-batch", action="store_true",
                   help="afterwards, decode 8 requests alone and in batches (greedy and sampled, dynamic and static "
                        "step) and report whether each request's tokens depend on its batch")
    d.add_argument("--max-new-tokens", type=_positive_int, default=256,
                   help="cap on tokens added after the prompt (>= 1; default 256)")
    d.add_argument("--tag", type=_tag, action="append", metavar="NAME=TOKEN_OR_ID",
                   help=f"control-tag id for --model, as a token text or an id (repeatable; names: "
                        f"{', '.join(TAG_TEXTS)}); default: looked up in the tokenizer by its text")
    d.add_argument("--backend", default=None, choices=["torch", "triton", "cuda", "auto"],
                   help="kernel backend of every op (default: auto on a GPU, torch on the CPU)")
    d.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where to run (default: cuda if available, else cpu)")
    d.add_argument("--plain", action="store_true", help="no colours / in-place updates")
    d.add_argument("--no-baseline", action="store_true", help="skip the AR baseline run")


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: The subcommands of ``python -m pd_kernels``; the first is the default when none is named.
COMMANDS: dict[str, Command] = {
    "demo": Command("run planned diffusion live (the shipped tiny planned-diffusion model by default)",
                    _demo_arguments, demo),
    "train": Command(_tiny_cli.TRAIN_HELP, _tiny_cli.train_arguments, _tiny_cli.train_main),
    "eval": Command(_tiny_cli.EVAL_HELP, _tiny_cli.eval_arguments, _tiny_cli.eval_main),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-kernels", description="pd_kernels: planned-diffusion inference kernels. "
                                f"Commands: {', '.join(COMMANDS)} (default: {next(iter(COMMANDS))}).")
    p.add_argument("--traceback", action="store_true",
                   help="on an error, show the full traceback (accepted anywhere on the command line)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    for name, c in COMMANDS.items():
        sp = sub.add_parser(name, help=c.help, description=c.help)
        c.add_arguments(sp)
        sp.set_defaults(run=c.run)
    return p


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv=None) -> int:
    """Run a command; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--traceback"]
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, next(iter(COMMANDS)))  # the default command
    try:
        args = build_parser().parse_args(argv)
        rc = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not as an "Exception ignored" at interpreter exit
        return rc
    except KeyboardInterrupt:
        if sys.stdout.isatty():
            sys.stdout.write(RESET + "\n")
        return 130
    except BrokenPipeError:
        # the reader went away (demo | head): no traceback, and nothing more to flush to the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        from ._backend import BackendUnavailable
        from .paged_cache import OutOfPages

        torch = sys.modules.get("torch")
        oom = (MemoryError,) + ((torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ())
        if show_traceback or not isinstance(e, (CLIError, ValueError, OSError, BackendUnavailable, OutOfPages,
                                                ImportError, *oom)):
            raise  # not a known kind of bad input or resource limit: a bug, show where
        print(f"pd-kernels: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
