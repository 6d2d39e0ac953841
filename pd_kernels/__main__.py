"""``python -m pd_kernels demo`` (console script ``pd-kernels``): planned diffusion, live.

With no arguments: a tiny built-in random-weight Qwen2 and a forced two-round plan (random weights plan
nothing sensible), on the GPU if there is one, else the CPU with the torch backend. Prints the plan, the
spans filling in (coloured and updated in place on a terminal, plain lines otherwise) and a stats table:
critical path (sequential forward passes) of PD against AR for the same number of answer tokens.

``--model PATH`` runs a real checkpoint (a Dream / planned-diffusion directory, or any Qwen2/Llama
transformers checkpoint) with its tokenizer; the model writes its own plan.
"""
from __future__ import annotations

import argparse
import sys
import time

COLORS = ["\x1b[36m", "\x1b[33m", "\x1b[35m", "\x1b[32m", "\x1b[34m", "\x1b[31m"]
DIM, RESET, BOLD = "\x1b[2m", "\x1b[0m", "\x1b[1m"


class _Live:
    """on_step callback: draws the spans of request 0 as they fill in."""

    def __init__(self, decode, mask_id, tty: bool):
        self.decode, self.mask, self.tty = decode, mask_id, tty
        self.drawn = 0
        self.round_key = None
        self.printed = set()

    def _lines(self, dec, r):
        row = dec.tokens[r.slot].tolist()
        out = []
        for j, s in enumerate(r.round_spans):
            toks = row[s.start + 1:s.start + 1 + s.masks]
            left = sum(t == self.mask for t in toks)
            if self.tty:  # one terminal row per span (a wrapped row would break the in-place redraw)
                import shutil

                c, room, parts = COLORS[j % len(COLORS)], shutil.get_terminal_size().columns - 22, []
                for t in toks:
                    piece = "_" if t == self.mask else self.decode([t])
                    room -= len(piece)
                    if room < 1:
                        parts.append("...")
                        break
                    parts.append(f"{DIM}_{RESET}" if t == self.mask else f"{c}{piece}{RESET}")
                text = "".join(parts)
            else:
                text = self.decode([t for t in toks if t != self.mask])
            out.append(f"  span {j} [{s.masks - left:3d}/{s.masks}] {text}")
        return out

    def __call__(self, dec):
        r = dec.reqs[0]
        if not r.round_spans:
            return
        key = (r.stats.rounds, r.round_spans[0].start)
        lines = self._lines(dec, r)
        if key != self.round_key:
            if key in self.printed:
                return
            self.round_key, self.drawn = key, 0
            print(f"{BOLD if self.tty else ''}round {r.stats.rounds}: plan{RESET if self.tty else ''} "
                  f"{self.decode(r.plans[-1])}")
        finished = not any(s.active for s in r.round_spans) or r.phase != "diffusion"
        if self.tty:
            if key in self.printed:
                return
            if finished:
                self.printed.add(key)
            if self.drawn:
                sys.stdout.write(f"\x1b[{self.drawn}A")
            for ln in lines:
                sys.stdout.write("\x1b[2K" + ln + "\n")
            self.drawn = len(lines)
            sys.stdout.flush()
        elif finished and key not in self.printed:
            self.printed.add(key)
            print("\n".join(lines))


def _tiny_setup(args):
    import torch

    from .decoder import make_plan
    from .models import TINY_TAGS, ToyTokenizer, tiny_model

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    model = tiny_model(seed=0, device=device)
    tok = ToyTokenizer(TINY_TAGS)
    T = TINY_TAGS
    prompt = tok.encode(args.prompt or "tell me three things about planned diffusion")
    plan = [make_plan(T, [3, 2, 4], topic_tokens=[[101, 102], [103], [104, 105]], terminator="sync"),
            make_plan(T, [2, 3], topic_tokens=[[106], [107, 108]], terminator="eos")]
    return model, tok.decode, T, prompt, [plan], 8


def _real_setup(args):
    import json
    import os

    import torch
    from transformers import AutoTokenizer

    from .decoder import ControlTags
    from .integrations.dream import load_dream

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with open(os.path.join(args.model, "config.json")) as f:
        mt = json.load(f).get("model_type", "").lower()
    if mt in ("dream", "qwen2"):
        model = load_dream(args.model, dtype=dtype, device=device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    text = args.prompt or "Give three tips for staying healthy."
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    else:
        ids = tok.encode(text)
    return model, lambda t: tok.decode(t), ControlTags(), ids, None, 10


def demo(args) -> int:
    import torch

    import pd_kernels

    from .decoder import DecodeConfig, Decoder, format_table

    t_start = time.perf_counter()
    model, decode, tags, prompt, forced, scale = (_real_setup if args.model else _tiny_setup)(args)
    device = next(model.parameters()).device
    backend = args.backend or ("torch" if device.type == "cpu" else None)
    tty = sys.stdout.isatty() and not args.plain
    print(f"pd_kernels {pd_kernels.__version__} demo: {'built-in tiny model, forced plan' if not args.model else args.model}"
          f" on {device.type} (backend {backend or 'auto'}), mode {args.mode}")
    print(f"prompt: {decode(prompt)}")
    cfg = DecodeConfig(mode=args.mode, steps_ratio=args.steps_ratio, tau=args.tau, policy=args.policy,
                       tags=tags, length_scale=args.length_scale or scale, max_new_tokens=args.max_new_tokens)
    live = _Live(decode, tags.mask, tty) if args.mode in ("pd", "pd-da") else None
    res = Decoder(model, cfg, backend=backend, on_step=live).generate([prompt], forced)[0]
    print(f"answer ({res.finish_reason}): {decode(res.answer)}")
    rows = [(args.mode, res.stats)]
    if args.mode != "ar" and not args.no_baseline:
        # AR baseline on the same cache and kernels, for as many answer tokens
        ar_cfg = cfg.replace(mode="ar", max_new_tokens=max(1, len(res.answer)))
        ar = Decoder(model, ar_cfg, backend=backend).generate([prompt])[0]
        rows.append(("ar", ar.stats))
    print()
    print(format_table(rows))
    if len(rows) == 2:
        print(f"critical path: {rows[0][1].critical_path} vs AR {rows[1][1].critical_path} steps "
              f"({rows[1][1].critical_path / max(1, rows[0][1].critical_path):.2f}x fewer sequential forward passes)")
    if device.type == "cpu":
        print("(CPU timings: a smoke run, not GPU performance)")
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pd-kernels", description="pd_kernels: planned-diffusion inference kernels")
    sub = p.add_subparsers(dest="cmd")
    d = sub.add_parser("demo", help="run planned diffusion live (tiny built-in model by default)")
    d.add_argument("--model", default=None, help="checkpoint directory (Dream / Qwen2 / Llama); default: tiny built-in")
    d.add_argument("--prompt", default=None)
    d.add_argument("--mode", default="pd", choices=["ar", "pd", "pd-da", "diffusion"])
    d.add_argument("--steps-ratio", type=float, default=1.0)
    d.add_argument("--tau", type=float, default=0.9)
    d.add_argument("--policy", default="schedule", choices=["schedule", "pd_threshold", "threshold"])
    d.add_argument("--length-scale", type=int, default=None, help="masks per announced unit (default 10; tiny: 8)")
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--backend", default=None, choices=["torch", "triton", "cuda", "auto"])
    d.add_argument("--device", default=None, choices=["cpu", "cuda"])
    d.add_argument("--plain", action="store_true", help="no colours / in-place updates")
    d.add_argument("--no-baseline", action="store_true", help="skip the AR baseline run")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo"] + argv  # the demo is the default command
    args = p.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
