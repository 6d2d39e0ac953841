"""Critical-path latency of the whole decoder: PD vs PD-DA vs AR vs diffusion, same cache and kernels.

Model: the tiny built-in Qwen2 (``--model tiny``) or a random-weight Dream-shaped Qwen2 (``--model dream``,
hidden 3584, 28/4 heads, FFN 18944, vocab 152064) with ``--layers`` layers. Random weights plan nothing, so
every request gets a forced plan shaped like SPEC section 8's workload (``--spans``, ``--span-len`` tokens per
span, ``--rounds`` rounds). Reports, per mode: critical path (sequential forward passes), answer tokens,
wall time per request, ms per step and tokens per second. Timings on CPU (``--smoke``) are smoke runs only.

``--cuda-graphs``: every mode runs twice, the default dynamic step (``impl=<mode>``) and the static step
captured as one CUDA graph per bucket (``impl=<mode>+graphs``; warm-up repetitions capture, timed ones
replay; ``graphs``/``replays`` columns count them). Without a GPU the second run is the same static step
run eagerly (``impl=<mode>+static``), which only proves the script works.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks._harness import Bench, parser  # noqa: E402
from pd_kernels.decoder import ControlTags, DecodeConfig, Decoder, make_plan  # noqa: E402
from pd_kernels.models import TINY_TAGS, dream_shaped_config, tiny_model  # noqa: E402


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "dream"])
    p.add_argument("--layers", type=int, default=28, help="layers of the Dream-shaped model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--spans", type=int, default=3)
    p.add_argument("--span-len", type=int, default=80, help="tokens per span (a multiple of --length-scale)")
    p.add_argument("--length-scale", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps-ratio", type=float, default=1.0)
    p.add_argument("--policy", default="schedule")
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--modes", default="ar,pd,pd-da,diffusion")
    p.add_argument("--backend", default=None)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also run each mode with the static step captured in CUDA graphs (one per bucket)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.smoke:
        args.model, args.prompt_len, args.spans, args.span_len, args.length_scale, args.rounds = "tiny", 8, 2, 8, 4, 2
        args.reps, args.warmup = 1, 0
    if args.model == "tiny":
        model, tags = tiny_model(device=device), TINY_TAGS
    else:
        from transformers import Qwen2ForCausalLM

        with torch.device(device):
            model = Qwen2ForCausalLM(dream_shaped_config(args.layers)).to(torch.bfloat16 if cuda else torch.float32)
        model.eval()
        tags = ControlTags()
    backend = args.backend or (None if cuda else "torch")
    bench = Bench("decoder", args)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(30, 200, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    n = max(1, args.span_len // args.length_scale)
    plan = [make_plan(tags, [n] * args.spans, topic_tokens=[[100 + k, 101 + k] for k in range(args.spans)],
                      terminator="sync" if r < args.rounds - 1 else "eos") for r in range(args.rounds)]
    answer = args.spans * n * args.length_scale * args.rounds
    variants = [("", {})]
    if args.cuda_graphs:
        variants.append(("+graphs", {"cuda_graphs": True}) if cuda else ("+static", {"static_step": True}))
    for mode in args.modes.split(","):
        cfg = DecodeConfig(mode=mode, tags=tags, steps_ratio=args.steps_ratio, policy=args.policy, tau=args.tau,
                           length_scale=args.length_scale, max_new_tokens=answer + 64 * args.rounds,
                           diffusion_len=answer)
        if mode == "ar":
            cfg = cfg.replace(max_new_tokens=answer)  # random weights never stop: same answer length as PD
        for suffix, kw in variants:
            dec = Decoder(model, cfg, max_batch=args.batch, backend=backend, **kw)
            times = []
            for rep in range(args.warmup + args.reps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = dec.generate(prompts, [plan] * args.batch if mode in ("pd", "pd-da") else None)
                if cuda:
                    torch.cuda.synchronize()
                if rep >= args.warmup:
                    times.append(time.perf_counter() - t0)
            times.sort()
            wall = times[len(times) // 2]
            s = res[0].stats
            bench.row(impl=mode + suffix, timing=None, model=args.model, layers=model.config.num_hidden_layers,
                      batch=args.batch, critical_path=s.critical_path, plan_steps=s.steps["plan"],
                      diffusion_steps=s.steps["diffusion"], answer_tokens=s.answer_tokens, steps=dec.step_index,
                      wall_ms=round(wall * 1e3, 2), ms_per_step=round(wall * 1e3 / max(1, dec.step_index), 3),
                      tok_per_s=round(sum(r.stats.answer_tokens for r in res) / wall, 1),
                      graphs=dec.graph_counts["captured"], replays=dec.graph_counts["replayed"],
                      dynamic_steps=dec.graph_counts["dynamic"])
    bench.finish(["impl", "model", "layers", "batch", "critical_path", "plan_steps", "diffusion_steps",
                  "answer_tokens", "wall_ms", "ms_per_step", "tok_per_s", "graphs", "replays"])


if __name__ == "__main__":
    main()
