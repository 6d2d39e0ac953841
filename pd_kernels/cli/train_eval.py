"""``python -m pd_kernels train`` and ``python -m pd_kernels eval``: the tiny planned-diffusion model
(:mod:`pd_kernels.tiny`), argument parsers and entry points."""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

from .common import resolve_device


TRAIN_HELP = ("train the tiny planned-diffusion model from scratch on its synthetic task (CPU, under 30 min) and "
              "write a checkpoint directory (transformers Qwen2 files, tokenizer, pd_kernels.json, loss.png); "
              "the defaults reproduce the shipped checkpoint")
EVAL_HELP = ("accuracy against critical path of the tiny planned-diffusion model: decode held-out prompts of its "
             "task in modes ar, pd, pd-da and diffusion, sweeping the steps ratio r and the threshold tau; write "
             "quality.json and quality.png")


def train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m pd_kernels train``."""
    from ..tiny.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data, noise and initialisation (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads (default: %(default)s, as the shipped checkpoint was trained; another "
                        "count changes float reduction order, so the weights may differ bit-wise)")
    p.add_argument("--eval", type=int, default=50, metavar="N",
                   help="after training, decode N held-out prompts per mode and print the accuracy (0: skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m pd_kernels eval``."""
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped tiny model)")
    p.add_argument("--out", default="pd_quality", help="results directory (default: %(default)s)")
    p.add_argument("--n", type=int, default=200, help="held-out prompts (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="r in (0.25, 1), tau 0.9 only")
    p.add_argument("--backend", default=None, choices=["torch", "triton", "cuda", "auto"],
                   help="pd_kernels backend (default: torch on CPU, auto on a GPU)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="where to run (default: cuda if "
                   "available, else cpu)")


def train_main(args) -> int:
    import torch

    from ..tiny.train import TrainConfig, train

    if min(args.steps, args.batch_size, args.threads) < 1:
        raise ValueError(f"--steps, --batch-size and --threads must be >= 1, got {args.steps}, {args.batch_size} "
                         f"and {args.threads}")
    cfg = dataclasses.replace(TrainConfig(), seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, threads=args.threads)
    print(f"training the tiny planned-diffusion model: {cfg.steps} steps of {cfg.batch_size} sequences, "
          f"seed {cfg.seed}, {cfg.threads} CPU threads -> {args.out}")
    t0 = time.perf_counter()
    res = train(cfg, args.out, progress=not args.no_progress)
    h = res["history"]
    print(f"done in {time.perf_counter() - t0:.0f} s ({h['wall_s'] / cfg.steps:.3f} s/step), final loss "
          f"{h['loss'][-1]:.4f}; wrote {os.path.abspath(args.out)}"
          + ("" if os.path.exists(os.path.join(args.out, "loss.png")) else
             " (loss.png not written: pip install 'pd_kernels[bench]')"))
    if args.eval:
        from ..tiny import evaluate
        from ..tiny.checkpoint import load

        torch.set_num_threads(1)  # the decoder's CPU ops are tiny: one thread is fastest
        tp = load(args.out)
        ex = evaluate.held_out(args.eval)
        for mode in ("ar", "pd", "pd-da", "diffusion"):
            s = evaluate.summarize(evaluate.decode(tp, ex, mode))
            print(f"  {mode:9s} exact match {100 * s['accuracy']:5.1f}%  critical path {s['critical_path']:.1f}  "
                  f"plan errors {100 * s['plan_error_rate']:.1f}%  ({args.eval} held-out prompts, greedy, r=1)")
    return 0


def eval_main(args) -> int:
    import torch

    from ..tiny import evaluate

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    device = resolve_device(args.device)
    backend = args.backend or ("torch" if device == "cpu" else None)
    if device == "cpu":
        torch.set_num_threads(1)
    doc = evaluate.run(args.model, args.out, n=args.n, quick=args.quick, backend=backend, device=device)
    print()
    print(evaluate.markdown_table(doc["rows"]))
    print(f"wrote {os.path.join(os.path.abspath(args.out), 'quality.json')}"
          + (" and quality.png" if os.path.exists(os.path.join(args.out, "quality.png")) else ""))
    return 0
