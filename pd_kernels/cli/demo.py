"""``python -m pd_kernels demo``: planned diffusion, live (see :mod:`pd_kernels.cli` for what it prints).

The model comes from one of three setups: the trained tiny planned-diffusion model (the shipped one, or any
checkpoint written by ``train``), the random-weight tiny model with a forced plan (``--model random``), or a
checkpoint directory (:func:`pd_kernels.integrations.checkpoints.load_checkpoint`, control tags from its
tokenizer: :func:`pd_kernels.integrations.tags.tags_from_tokenizer`). The decoding knobs are validated by
:class:`~pd_kernels.DecodeConfig` itself; a value it refuses is a usage error naming the option.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable

from ..decoder import MODES, POLICIES, DecodeConfig, Decoder, RequestFinished, format_table, make_plan
from ..integrations.checkpoints import checkpoint_kind, load_checkpoint
from ..integrations.tags import TAG_TEXTS, missing_tags, tags_from_tokenizer
from .check_batch import check_batch
from .common import CLIError, UsageError, resolve_device
from .live import Live

HELP = "run planned diffusion live (the shipped tiny planned-diffusion model by default)"
#: the tiny model's default threshold: PD at 0.41x AR's critical path, 2 points under AR's exact match on the
#: 200 held-out prompts of the quality sweep (tau 0.9: 0.34x, 3 points under)
TINY_PD_TAU = 0.999
TINY_PD_PROMPT = "rev X Z q l E n k ; sort H z C f g r p ; rev W b I Q o d A"  # held out of training (task.is_held_out)
RANDOM_PROMPT = "tell me three things about planned diffusion"
CHECKPOINT_PROMPT = "Give three tips for staying healthy."

#: the DecodeConfig fields the demo's options set: field -> option
CONFIG_OPTIONS = {"mode": "--mode", "steps_ratio": "--steps-ratio", "tau": "--tau", "policy": "--policy",
                  "length_scale": "--length-scale", "max_new_tokens": "--max-new-tokens",
                  "temperature": "--temperature", "seed": "--seed", "top_p": "--top-p"}


def _tag(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=TOKEN or NAME=ID, got {text!r}")
    if name not in TAG_TEXTS:
        raise argparse.ArgumentTypeError(f"unknown tag {name!r}; tags: {', '.join(TAG_TEXTS)}")
    return name, value


def arguments(d: argparse.ArgumentParser) -> None:
    """The options of ``python -m pd_kernels demo`` (value ranges: :class:`~pd_kernels.DecodeConfig`'s)."""
    d.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint directory with config.json, weights and tokenizer: a Dream / planned-diffusion "
                        "checkpoint, or any transformers family pd_kernels supports (Llama, Qwen2/3, Mistral, ...; "
                        "without PD tags in the tokenizer only --mode ar runs), or one written by `train`. Default: "
                        "the tiny planned-diffusion model shipped in the package; `random`: a tiny random-weight "
                        "model with a forced plan (./random for a directory of that name)")
    d.add_argument("--prompt", default=None, help="the user prompt (default: a fixed example); for the tiny "
                   "planned-diffusion model a task in its words, e.g. 'rev h o e k c ; sort n d J f b ; then rev' "
                   "(1-4 parts of the same odd number, 5-13, of distinct letters a-z A-Z, and at most one "
                   "'then OP' part last; or one part of 1-3 letters)")
    d.add_argument("--mode", default="pd", choices=MODES,
                   help="decoding mode: ar (autoregressive baseline), pd (planned diffusion), pd-da (spans of a "
                        "round see each other), diffusion (no plan). Default: pd")
    d.add_argument("--steps-ratio", type=float, default=1.0,
                   help="diffusion steps per round = ratio x longest span (> 0; default 1.0)")
    d.add_argument("--tau", type=float, default=None,
                   help="confidence threshold of the threshold policies, in [0, 1] (default 0.999 for the tiny "
                        "planned-diffusion model, 0.9 for the others)")
    d.add_argument("--policy", default=None, choices=POLICIES,
                   help="commit policy of a diffusion step (default: threshold for the tiny planned-diffusion "
                        "model, its setting at half of AR's critical path; schedule for the others)")
    d.add_argument("--length-scale", type=float, default=None,
                   help="mask tokens per unit a plan entry announces (> 0, may be a float: int(N x scale) masks; "
                        "default 10, random tiny model 8, trained tiny model 2)")
    d.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples, with noise keyed by (seed, step, position)")
    d.add_argument("--seed", type=int, default=0, help="RNG seed of the request (>= 0; default 0)")
    d.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus filter in (0, 1], applied at every temperature as the PD reference does (default 1)")
    d.add_argument("--check-batch", action="store_true",
                   help="afterwards, decode 8 requests alone and in batches (greedy and sampled, dynamic and static "
                        "step) and report whether each request's tokens depend on its batch")
    d.add_argument("--max-new-tokens", type=int, default=256,
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


def decode_config(args) -> DecodeConfig:
    """The :class:`~pd_kernels.DecodeConfig` of the options (``--length-scale`` left out when not given: the
    model's own is set later). A value it refuses is a :class:`UsageError` naming the option."""
    try:
        return DecodeConfig(**{f: getattr(args, f) for f in CONFIG_OPTIONS if getattr(args, f) is not None})
    except (TypeError, ValueError) as e:
        m = re.match(r"DecodeConfig\.(\w+):? (.*)", str(e), re.S)   # its messages name the field first
        if m and m.group(1) in CONFIG_OPTIONS:
            raise UsageError(CONFIG_OPTIONS[m.group(1)], m.group(2)) from None
        raise CLIError(str(e)) from None


@dataclass
class Setup:
    """What the demo decodes: a model, its tokenizer's ``decode``, tags and the request."""
    model: object
    decode: Callable
    tags: object
    prompt: list
    forced: list | None       # a forced plan (the random model), else None: the model writes its own
    length_scale: float
    title: str                # what runs, for the first line
    notes: list               # lines printed before the prompt
    raw_answer: bool = False  # print the generated sequence, not the answer (tag ids are stand-ins)
    diffusion_len: int | None = None  # answer length of --mode diffusion (default: --max-new-tokens)
    tiny: object = None       # the trained tiny model's (TinyPD, task example): ground truth and every mode
    policy: str = "schedule"  # the commit policy when --policy is not given
    tau: float = 0.9          # the threshold when --tau is not given


def _prompt_text(args, default: str) -> str:
    if args.prompt is None:
        return default
    if not args.prompt.strip():
        raise CLIError("--prompt is empty (or only whitespace)")
    return args.prompt


def _random_setup(args) -> Setup:
    from ..models import TINY_TAGS, SyllableTokenizer, tiny_model

    if args.tag:
        raise CLIError("--tag applies to --model checkpoints (the built-in model has fixed tag ids)")
    model = tiny_model(seed=0, device=resolve_device(args.device))
    tok, T = SyllableTokenizer(TINY_TAGS), TINY_TAGS
    prompt = tok.encode(_prompt_text(args, RANDOM_PROMPT))
    plan = [make_plan(T, [3, 2, 4], topic_tokens=[[101, 102], [103], [104, 105]], terminator="sync"),
            make_plan(T, [2, 3], topic_tokens=[[106], [107, 108]], terminator="eos")]
    return Setup(model, tok.decode, T, prompt, [plan], 8, "built-in random-weight tiny model, forced plan", [])


def _tiny_pd_setup(args, path: str) -> Setup:
    """The trained tiny planned-diffusion model (the shipped one, or a ``train --out`` directory)."""
    from ..tiny import task

    if args.tag:
        raise CLIError("--tag applies to --model checkpoints other than the tiny planned-diffusion model (its tag "
                       "ids are in its files)")
    try:
        ex = task.parse_prompt(_prompt_text(args, TINY_PD_PROMPT))
    except ValueError as e:
        raise CLIError(f"--prompt: {e}") from None
    tp = load_checkpoint(path, device=resolve_device(args.device)).tiny
    title = f"tiny planned-diffusion model {'(shipped)' if args.model is None else args.model}"
    return Setup(tp.model, tp.tokenizer.decode, tp.tokenizer.tags, tp.prompt_ids(ex.prompt, args.mode), None,
                 tp.length_scale, title, [], diffusion_len=tp.diffusion_len, tiny=(tp, ex), policy="threshold",
                 tau=TINY_PD_TAU)


def _checkpoint_setup(args) -> Setup:
    """A checkpoint directory: Dream / planned-diffusion, or another transformers family (tags from the
    tokenizer; without them ``--mode ar`` only, with stand-in ids and a note)."""
    ck = load_checkpoint(args.model, device=resolve_device(args.device))
    tok = ck.tokenizer
    overrides = {n: int(v) if v.lstrip("-").isdigit() else v for n, v in args.tag or []}
    missing = missing_tags(tok, overrides)
    if missing and args.mode != "ar":
        raise CLIError(f"the tokenizer has no planned-diffusion control tag for {', '.join(missing.values())}: this "
                       f"checkpoint was not trained for planned diffusion; use --mode ar, or name the tags with "
                       f"--tag NAME=TOKEN_OR_ID")
    if "eos" in missing:
        raise CLIError("the tokenizer has no end-of-sequence token (<|im_end|> or eos_token): "
                       "name it with --tag eos=...")
    tags = tags_from_tokenizer(tok, overrides, stand_ins=True, vocab_size=ck.model.config.vocab_size)
    notes = []
    if missing:   # AR needs only EOS: stand-in ids for the rest
        names = [n for n in missing if n != "digits"]
        notes.append(f"note: the tokenizer has no {', '.join(missing.values())}: AR mode needs only EOS; ids "
                     f"{[getattr(tags, n) for n in names]} stand in for {', '.join(names)} (MASK, {tags.mask}, is "
                     f"never sampled) and the answer is printed from the raw sequence")
    text = _prompt_text(args, CHECKPOINT_PROMPT)
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = tok.encode(text)
    return Setup(ck.model, tok.decode, tags, [int(i) for i in ids], None, 10, args.model, notes,
                 raw_answer=bool(notes))


def _setup(args) -> Setup:
    if args.model == "random":
        return _random_setup(args)
    if args.model is None:
        from ..models import tiny_pd_path

        return _tiny_pd_setup(args, tiny_pd_path())
    try:
        kind = checkpoint_kind(args.model)
    except OSError as e:   # no such path, not a directory, no config.json: the message starts with the path
        raise CLIError(f"--model {e}") from None
    return _tiny_pd_setup(args, args.model) if kind == "tiny-pd" else _checkpoint_setup(args)


def _tiny_pd_compare(s: Setup, cfg, backend: str | None, mode: str, res) -> list:
    """Stats rows of every mode on the tiny model's prompt (``mode`` already decoded as ``res``), each
    labelled with its answer's verdict; prints the answers of the other modes."""
    tp, ex = s.tiny
    rows = []
    for m in MODES:
        r = res if m == mode else Decoder(s.model, cfg.replace(mode=m), backend=backend).generate(
            [tp.prompt_ids(ex.prompt, m)])[0]
        ok = ex.check(tp.tokenizer.decode(r.answer))
        if m != mode:
            print(f"  {m:9s} ({'correct' if ok else 'wrong'}): {tp.tokenizer.decode(r.answer)}")
        rows.append((f"{m} {'ok' if ok else 'WRONG'}", r.stats))
    return rows


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
    """The demo; under ``torchrun`` (``WORLD_SIZE`` > 1) on every rank, the model tensor-parallel
    (:func:`_tensor_parallel`), only rank 0 printing."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _demo(args, None)
    import contextlib
    import torch
    import torch.distributed as dist

    device = resolve_device(args.device)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        with open(os.devnull, "w") as null, \
                (contextlib.redirect_stdout(null) if dist.get_rank() else contextlib.nullcontext()):
            return _demo(args, dist.get_world_size())
    finally:
        if own:
            dist.destroy_process_group()


def _tensor_parallel(model, world: int):
    """The demo's model sharded over the ``world`` ranks (:func:`pd_kernels.parallel.tp.parallelize`)."""
    from ..parallel.tp import TensorParallelError, parallelize

    try:
        return parallelize(model)
    except TensorParallelError as e:
        raise CLIError(f"tensor parallelism on {world} ranks: {e}") from None


def _demo(args, world: int | None) -> int:
    from .. import __version__

    t_start = time.perf_counter()
    base = decode_config(args)   # before any loading: a bad value is a usage error at once
    s = _setup(args)
    if not s.prompt:
        raise CLIError("the prompt encodes to no tokens")
    if world is not None:
        s.model = _tensor_parallel(s.model, world)
    device = next(s.model.parameters()).device
    backend = args.backend or ("torch" if device.type == "cpu" else None)
    tty = sys.stdout.isatty() and not args.plain
    where = device.type + (f", tensor-parallel on {world} ranks" if world else "")
    print(f"pd_kernels {__version__} demo: {s.title} on {where} (backend {backend or 'auto'}), mode {args.mode}")
    for note in s.notes:
        print(note)
    print(f"prompt: {s.decode(s.prompt)}")
    cfg = base.replace(tags=s.tags, length_scale=args.length_scale or s.length_scale, diffusion_len=s.diffusion_len,
                       policy=args.policy or s.policy, tau=s.tau if args.tau is None else args.tau)
    if args.mode != "ar":
        print(f"policy: {cfg.policy}" + (f" (tau {cfg.tau:g})" if cfg.policy != "schedule" else
                                         f" (steps ratio {cfg.steps_ratio:g})"))
    live = Live(s.decode, s.tags, tty) if args.mode != "ar" else None
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
        rows.append(("ar", Decoder(s.model, ar_cfg, backend=backend).generate([s.prompt])[0].stats))
    print()
    print(format_table(rows))
    if len(rows) == 2:
        print(critical_path_line(args.mode, rows[0][1].critical_path, rows[1][1].critical_path))
    elif len(rows) > 2 and args.mode != "ar":
        path = {label.split()[0]: st.critical_path for label, st in rows}
        print(critical_path_line(args.mode, path[args.mode], path["ar"]))
    ok = check_batch(s.model, cfg, s.prompt, forced_plans=s.forced is not None,
                     backend=backend) if args.check_batch else True
    if device.type == "cpu":
        print("(CPU timings: a smoke run, not GPU performance)")
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 1
