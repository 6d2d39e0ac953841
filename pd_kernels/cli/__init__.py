"""``python -m pd_kernels <command>`` (console script ``pd-kernels``).

Commands live in :data:`COMMANDS` (name -> :class:`Command`): each adds its own options to a sub-parser
and runs with the parsed arguments; :func:`main` owns what every command shares: the default command
(``demo``), one-line errors, usage errors found after parsing, Ctrl-C and closed pipes. To add a command,
write ``add_arguments(parser)`` and ``run(args) -> int`` and register them in :data:`COMMANDS`.

``demo`` (:mod:`.demo`): planned diffusion, live. With no arguments: the tiny planned-diffusion model shipped in
the package (:mod:`pd_kernels.tiny`, trained on a synthetic list task) on a fixed held-out prompt, on the GPU if
there is one, else the CPU with the torch backend. Prints, from the decoder's stream of events (:mod:`.live`),
the plan the model writes, the spans filling in (coloured and updated in place on a terminal) and each span as
soon as it is final, in order, while later ones are still diffusing; whether the answer matches the task's
ground truth; then a stats table: critical path (sequential forward passes) of AR, PD, PD-DA and diffusion on
that prompt. ``--prompt`` takes a task prompt in the task's words (``"rev h o e k c ; sort n d J f b ; then rev"``).
``--model random``: a tiny random-weight Qwen2 with a forced two-round plan (random weights plan nothing
sensible), PD against AR for the same number of answer tokens. ``--check-batch`` then checks that a request's
tokens do not depend on its batch (:mod:`.check_batch`, the scenario the tests run too). ``--model PATH`` runs a
checkpoint with its tokenizer (the model writes its own plan): one written by ``train`` like the shipped model,
any other with the control tags read from its tokenizer by their text (or given with ``--tag``).

``train``: train the tiny planned-diffusion model (the defaults reproduce the shipped checkpoint).
``eval``: its accuracy against critical path over held-out prompts (JSON + Pareto plot). Both: :mod:`.train_eval`.

Exit status: 0 done, 1 an error (one line on stderr, ``pd-kernels: error: ...``; ``--traceback`` shows the
full traceback), 2 a bad command line (argparse, or a value :class:`~pd_kernels.DecodeConfig` refuses), 130
interrupted (Ctrl-C), 141 output pipe closed (``demo | head``).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from . import demo as _demo, train_eval as _train_eval
from .common import CLIError, UsageError
from .live import RESET


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: The subcommands of ``python -m pd_kernels``; the first is the default when none is named.
COMMANDS: dict[str, Command] = {
    "demo": Command(_demo.HELP, _demo.arguments, _demo.demo),
    "train": Command(_train_eval.TRAIN_HELP, _train_eval.train_arguments, _train_eval.train_main),
    "eval": Command(_train_eval.EVAL_HELP, _train_eval.eval_arguments, _train_eval.eval_main),
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
        sp.set_defaults(run=c.run, usage_error=sp.error)
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
    except UsageError as e:
        args.usage_error(str(e))   # usage and the message on stderr, exit 2, as argparse's own
    except KeyboardInterrupt:
        if sys.stdout.isatty():
            sys.stdout.write(RESET + "\n")
        return 130
    except BrokenPipeError:
        # the reader went away (demo | head): no traceback, and nothing more to flush to the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        from .._backend import BackendUnavailable
        from ..paged_cache import OutOfPages

        torch = sys.modules.get("torch")
        oom = (MemoryError,) + ((torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ())
        if show_traceback or not isinstance(e, (CLIError, ValueError, OSError, BackendUnavailable, OutOfPages,
                                                ImportError, *oom)):
            raise  # not a known kind of bad input or resource limit: a bug, show where
        print(f"pd-kernels: error: {_one_line(e)}", file=sys.stderr)
        return 1


__all__ = ["COMMANDS", "Command", "CLIError", "UsageError", "build_parser", "main"]
