"""Quality against latency of the tiny planned-diffusion model (``python -m pd_kernels eval``).

Every request is decoded by :class:`pd_kernels.Decoder` exactly as a user would run it: the prompt in the
task's words, the format tag of the mode (``<ar>`` for ``ar``, ``<pd>`` for ``pd`` / ``pd-da``,
``<diffusion>`` for ``diffusion``), greedy; the answer is checked word for word against the task's ground
truth. Per request: correct or not, plan errors (the decoder's ``plan_errors``: an entry without a number,
a span clamped or dropped, ...), rounds, and the critical path (sequential forward passes).
"""
from __future__ import annotations

import json
import os

import torch

from ..decoder import Decoder
from . import task
from .checkpoint import TinyPD, load


def decode(tp: TinyPD, examples: list, mode: str, *, backend: str | None = "torch", max_batch: int = 64,
           **cfg) -> list[dict]:
    """Decode ``examples`` (:class:`~pd_kernels.tiny.task.Example`) in ``mode``; one row per example."""
    dec = Decoder(tp.model, tp.config(mode, **cfg), max_batch=max_batch, backend=backend)
    results = dec.generate([tp.prompt_ids(ex.prompt, mode) for ex in examples])
    rows = []
    for ex, res in zip(examples, results):
        words = tp.tokenizer.decode(res.answer).split()
        s = res.stats
        rows.append({"correct": ex.check(words), "plan_errors": len(s.plan_errors), "rounds": s.rounds,
                     "critical_path": s.critical_path, "finish": s.finish_reason, "answer": " ".join(words)})
    return rows


def summarize(rows: list[dict]) -> dict:
    n = max(1, len(rows))
    return {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / n,
            "plan_error_rate": sum(r["plan_errors"] > 0 for r in rows) / n,
            "rounds": sum(r["rounds"] for r in rows) / n,
            "critical_path": sum(r["critical_path"] for r in rows) / n}


# ---- the quality / latency sweep ----------------------------------------------------------------------
STEPS_RATIOS = (0.25, 0.5, 0.75, 1.0)
TAUS = (0.5, 0.9, 0.99, 0.999)
EVAL_SEED = 1234


def sweep_configs(quick: bool = False) -> list[dict]:
    """The grid: ``ar`` once; ``pd``, ``pd-da`` and ``diffusion`` with the ``schedule`` policy at each steps
    ratio r, and with the ``threshold`` policy at each tau (commit every position with confidence >= tau,
    at least one per span and step). ``quick``: r in (0.25, 1.0), tau 0.9."""
    rs, taus = ((0.25, 1.0), (0.9,)) if quick else (STEPS_RATIOS, TAUS)
    out = [{"mode": "ar", "policy": "schedule", "steps_ratio": 1.0, "tau": None}]
    for mode in ("pd", "pd-da", "diffusion"):
        out += [{"mode": mode, "policy": "schedule", "steps_ratio": r, "tau": None} for r in rs]
        out += [{"mode": mode, "policy": "threshold", "steps_ratio": 1.0, "tau": t} for t in taus]
    return out


def held_out(n: int, seed: int = EVAL_SEED) -> list:
    """``n`` fixed held-out prompts (never seen in training)."""
    return task.TaskGenerator(seed, "eval").take(n)


def sweep(tp: TinyPD, examples: list, configs: list[dict], *, backend: str | None = "torch", log=print) -> list[dict]:
    """One summary row per config (accuracy, plan-error rate, rounds, critical path, wall seconds), plus
    ``critical_path_vs_ar`` (ratio of mean critical paths) once ``ar`` has run."""
    import time

    rows, ar_path = [], None
    for c in configs:
        kw = {"policy": c["policy"], "steps_ratio": c["steps_ratio"]}
        if c["tau"] is not None:
            kw["tau"] = c["tau"]
        t0 = time.perf_counter()
        per = decode(tp, examples, c["mode"], backend=backend, **kw)
        row = {**c, **summarize(per), "wall_s": round(time.perf_counter() - t0, 3)}
        if c["mode"] == "ar":
            ar_path = row["critical_path"]
        row["critical_path_vs_ar"] = None if ar_path is None else row["critical_path"] / ar_path
        rows.append(row)
        if log:
            log(_fmt_row(row))
    return rows


def _fmt_row(r: dict) -> str:
    knob = f"r={r['steps_ratio']}" if r["policy"] == "schedule" else f"tau={r['tau']}"
    rel = "" if r["critical_path_vs_ar"] is None else f" ({r['critical_path_vs_ar']:.2f}x AR)"
    return (f"{r['mode']:9s} {r['policy']:9s} {knob:9s} acc {100 * r['accuracy']:5.1f}%  plan err "
            f"{100 * r['plan_error_rate']:4.1f}%  rounds {r['rounds']:.2f}  crit.path {r['critical_path']:6.2f}{rel}")


def markdown_table(rows: list[dict]) -> str:
    head = "| mode | policy | r / tau | exact match | plan errors | rounds | critical path | vs AR |\n" \
           "|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        knob = f"r = {r['steps_ratio']}" if r["policy"] == "schedule" else f"tau = {r['tau']}"
        if r["mode"] == "ar":
            knob = "-"
        rel = "1.00x" if r["critical_path_vs_ar"] is None else f"{r['critical_path_vs_ar']:.2f}x"
        lines.append(f"| {r['mode']} | {r['policy'] if r['mode'] != 'ar' else '-'} | {knob} | "
                     f"{100 * r['accuracy']:.1f}% | {100 * r['plan_error_rate']:.1f}% | {r['rounds']:.2f} | "
                     f"{r['critical_path']:.1f} | {rel} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str = "") -> bool:
    """Accuracy against mean critical path (the paper's Pareto plot): one line per mode and policy.
    False (nothing written) without matplotlib."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"ar": "black", "pd": "tab:blue", "pd-da": "tab:green", "diffusion": "tab:red"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for mode in ("pd", "pd-da", "diffusion"):
        for policy, style in (("schedule", "-o"), ("threshold", "--s")):
            pts = sorted((r["critical_path"], 100 * r["accuracy"]) for r in rows
                         if r["mode"] == mode and r["policy"] == policy)
            if pts:
                ax.plot(*zip(*pts), style, color=colors[mode], ms=4, lw=1.2,
                        label=f"{mode} ({'steps ratio r' if policy == 'schedule' else 'threshold tau'})")
    for r in rows:
        if r["mode"] == "ar":
            ax.plot(r["critical_path"], 100 * r["accuracy"], "*", color="black", ms=12, label="ar")
            ax.axvline(r["critical_path"] / 2, color="gray", ls=":", lw=1, label="half of AR's path")
    ax.set_xscale("log")
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500)
             if min(r["critical_path"] for r in rows) / 1.5 <= t <= max(r["critical_path"] for r in rows) * 1.5]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("critical path (sequential forward passes per request, mean)")
    ax.set_ylabel("exact match (%)")
    low = min(100 * r["accuracy"] for r in rows)
    ax.set_ylim(max(-2.0, 5 * (low // 5) - 5), 101)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run(model_dir: str | None, out_dir: str, *, n: int = 200, quick: bool = False, backend: str | None = "torch",
        device: str = "cpu", meta: dict | None = None, log=print) -> dict:
    """Load a checkpoint (default: the shipped one), sweep, write ``quality.json`` (+ ``quality.png`` with
    matplotlib) under ``out_dir``. Returns the JSON document."""
    import datetime
    import platform

    from ..models import tiny_pd_path

    path = model_dir or tiny_pd_path()
    tp = load(path, device=device)
    examples = held_out(n)
    rows = sweep(tp, examples, sweep_configs(quick), backend=backend, log=log)
    doc = {"meta": {"model": os.path.abspath(path), "n_prompts": n, "eval_seed": EVAL_SEED, "greedy": True,
                    "backend": backend, "device": device, "torch": torch.__version__,
                    "python": platform.python_version(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "note": "critical path = sequential forward passes (device independent); wall_s are "
                            "this machine's times for the whole sweep point, not GPU latency",
                    **(meta or {})},
           "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "quality.json"), "w") as f:
        json.dump(doc, f, indent=1)
    if not plot(rows, os.path.join(out_dir, "quality.png"), f"tiny planned-diffusion model, {n} held-out prompts"):
        log("matplotlib is not installed: quality.png not written (pip install 'pd_kernels[bench]')")
    return doc
