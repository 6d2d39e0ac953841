"""Markdown summary and PNG plots of a ``bench_decoder.py`` run (its JSON payload).

    python benchmarks/report.py benchmarks/results/decoder_h200.json [--to benchmarks/results/decoder_h200]

writes ``<to>.md`` (a summary the README's performance section can take as it is) and, where matplotlib is
installed (the ``bench`` extra: ``pip install -e ".[bench]"``), three plots:

* ``<to>_speedup.png``  - batch-1 speedup of every mode against our ``ar`` and against the reference-style
  loop of the same mode, per variant (dynamic step, CUDA graphs);
* ``<to>_floor.png``    - ms per step of each mode and of the reference loop, with the weight-read floor
  (weight bytes / copy bandwidth measured in the same run) as a line;
* ``<to>_sweep.png``    - the knob sweep: critical path and latency against the steps ratio per policy, and
  latency against tau for the threshold policies.
"""
from __future__ import annotations

import argparse
import json
import os

GOALS = (  # (label, mode row, field, threshold, higher is better)
    ("PD end-to-end vs our AR >= 2.2x", "pd", "vs_ar", 2.2, True),
    ("PD-DA end-to-end vs our AR >= 2.0x", "pd-da", "vs_ar", 2.0, True),
    ("PD per-step latency <= 1.25x the weight-read floor", "pd", "floor_ratio", 1.25, False),
    ("PD loop >= 3x the reference-style loop", "pd", "vs_reference", 3.0, True),
)


def _f(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _table(rows, cols, heads=None) -> list:
    heads = heads or cols
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_f(r.get(c)) for c in cols) + " |")
    return out


def best_rows(data: dict, batch: int = 1) -> dict:
    """mode -> main row at ``batch`` of the best variant present (graphs, else static, else dynamic)."""
    out = {}
    rank = {"graphs": 0, "static": 1, "dynamic": 2}
    for r in data["rows"]:
        if r.get("part") == "main" and r.get("batch") == batch and r["impl"] != "reference-loop":
            cur = out.get(r["mode"])
            if cur is None or rank.get(r["variant"], 3) < rank.get(cur["variant"], 3):
                out[r["mode"]] = r
    return out


def summary_markdown(data: dict) -> str:
    env, meta = data["env"], data.get("meta", {})
    rows = data["rows"]
    smoke = env.get("device", "").startswith("cpu")
    m = meta.get("model", {})
    cfg = meta.get("config", {})
    wl = meta.get("workload", {}).get("stats", {})
    ceil = {r["impl"]: r for r in rows if r.get("part") == "ceiling"}
    lines = [f"### Decoder end to end: {env.get('device')} ({m.get('name')}, {m.get('layers')} layers, "
             f"{m.get('dtype')})",
             ""]
    if smoke:
        lines += ["**Smoke run on a CPU: these timings only show that the suite runs; they are not results.**", ""]
    if meta.get("interrupted") or not data.get("complete", True):
        lines += ["**This run was cut short: only the rows below were measured.**", ""]
    samples = env.get("gpu_samples", {})
    clock = ""
    if samples.get("available"):
        clock = (f", SM clock {samples['sm_clock_mhz']['min']}-{samples['sm_clock_mhz']['max']} MHz, "
                 f"power up to {samples['power_w']['max']} W, temperature up to {samples['temp_c']['max']} C")
    lines.append(f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, driver "
                 f"{env.get('driver', '-')}, commit `{str(env.get('commit'))[:12]}`{clock}.")
    if "copy" in ceil and "matmul" in ceil:
        lines.append(f"Measured in the same run: device copy {_f(ceil['copy'].get('GB/s'), 4)} GB/s (read + write), "
                     f"matmul {_f(ceil['matmul'].get('TFLOP/s'), 4)} TFLOP/s; weights read per step "
                     f"{m.get('weight_bytes_per_step', 0) / 1e9:.3g} GB.")
    if wl:
        lines.append(f"Workload ({meta['workload']['params']['note']}, seed {meta['workload']['params']['seed']}): "
                     f"{wl['requests']} requests, "
                     f"spans per plan mean {wl['spans_per_plan']['mean']}, tokens per span mean "
                     f"{wl['tokens_per_span']['mean']}, rounds mean {wl['rounds']['mean']}, AR answers mean "
                     f"{wl['ar_tokens']['mean']} tokens; policy `{cfg.get('policy')}`, steps ratio "
                     f"{cfg.get('steps_ratio')}, greedy. Critical-path ratio AR / PD of this sample (schedule): "
                     f"{wl['critical_path_schedule']['ar_over_pd']}x"
                     + (f" (the whole population: {wl['selection']['population_shape'][4]}x at steps ratio 0.5, "
                        f"{wl['selection']['population_shape'][5]}x at 1.0)." if wl.get("selection") else "."))
    lines.append("")
    main1 = [dict(r, wall=f"{_f(r['wall_ms'], 4)} [{_f(r['wall_p20_ms'], 4)}-{_f(r['wall_p80_ms'], 4)}]",
                  cp=f"{_f(r['critical_path'], 4)} ({_f(r['cp_plan'], 4)} + {_f(r['cp_diffusion'], 4)})")
             for r in rows if r.get("part") == "main" and r.get("batch") == 1]
    sweep = [r for r in rows if r.get("part") == "sweep"]
    sections = (
        ("Batch 1, per request (wall: median [20th-80th percentile] over the requests; speedups: ratio of summed "
         "wall times on the same requests):", main1,
         ("impl", "mode"), ("cp", "critical path (plan + diffusion)"), ("wall", "wall ms"), ("ms_per_step", "ms/step"),
         ("floor_ratio", "/ floor"), ("roofline_ratio", "/ roofline"), ("vs_ar", "vs our AR"),
         ("cp_vs_ar", "critical path vs AR"), ("roofline_vs_ar", "roofline bound vs AR"),
         ("vs_reference", "vs reference loop"), ("tok_per_s", "tok/s"),
         ("tokens_match_reference", "same tokens as reference")),
        ("Larger batches (throughput; latency = a request's share of the batch's steps):",
         [r for r in rows if r.get("part") == "main" and r.get("batch", 1) > 1],
         ("impl", "mode"), ("batch", "batch"), ("tok_per_s", "tok/s"), ("vs_ar", "vs our AR"),
         ("wall_ms", "latency ms (median)"), ("tokens_match_batch1", "same tokens as batch 1")),
        ("Reference-style loop (dense masks, re-rotated cache, full-vocab softmax, host loops), batch 1:",
         [r for r in rows if r.get("impl") == "reference-loop"],
         ("mode", "mode"), ("critical_path", "critical path"), ("wall_ms", "wall ms"), ("ms_per_step", "ms/step"),
         ("floor_ratio", "/ floor"), ("vs_ar", "vs its AR")),
        (f"Knob sweep (pd, batch 1, {sweep[0]['requests'] if sweep else 0} requests):", sweep,
         ("policy", "policy"), ("steps_ratio", "r"), ("tau", "tau"), ("critical_path", "critical path"),
         ("wall_ms", "wall ms"), ("ms_per_step", "ms/step"), ("vs_ar", "vs our AR"),
         ("cp_vs_ar", "critical path vs AR")),
    )
    for title, rs, *cols in sections:
        if rs:
            lines += [title, ""] + _table(rs, [c for c, _ in cols], [h for _, h in cols]) + [""]
    best = best_rows(data)
    if best and not smoke:
        lines += ["Goals (issue 11; best variant per mode):", ""]
        for label, mode, field, thr, up in GOALS:
            r = best.get(mode)
            v = r.get(field) if r else None
            if v is None:
                lines.append(f"- {label}: not measured")
                continue
            ok = v >= thr if up else v <= thr
            bound = f"; the floors of this run allow {r['roofline_vs_ar']:.3g}x" if field == "vs_ar" and \
                r.get("roofline_vs_ar") else ""
            lines.append(f"- {label}: {v:.3g} ({r['impl']}) - {'met' if ok else f'missed by {abs(v - thr) / thr:.0%}'}"
                         f"{bound}")
        lines.append("")
    return "\n".join(lines)


def _finish(plt, fig, ax, labels, ylabel, title, path) -> str:
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(data: dict, stem: str) -> list:
    """Write the PNGs; returns their paths, or raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    dev = data["env"].get("device", "")
    tag = " (CPU smoke: not results)" if dev.startswith("cpu") else ""
    out = []
    main1 = [r for r in rows if r.get("part") == "main" and r.get("batch") == 1]
    if main1:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [r["impl"] for r in main1]
        x = range(len(main1))
        ax.bar([i - 0.2 for i in x], [r.get("vs_ar") or 0 for r in main1], 0.4, label="vs our AR")
        ax.bar([i + 0.2 for i in x], [r.get("vs_reference") or 0 for r in main1], 0.4, label="vs reference loop")
        ax.axhline(1.0, color="gray", lw=0.8)
        out.append(_finish(plt, fig, ax, labels, "speedup (x)", f"End-to-end speedup, batch 1, {dev}{tag}",
                           stem + "_speedup.png"))

        peer = [r for r in rows if r.get("impl") == "reference-loop"]
        fl = main1 + peer
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(range(len(fl)), [r["ms_per_step"] for r in fl],
               color=["C0" if r["impl"] != "reference-loop" else "C3" for r in fl])
        ax.axhline(main1[0]["floor_ms_per_step"], color="k", ls="--", lw=1, label="weight-read floor")
        out.append(_finish(plt, fig, ax, [r["impl"] if r["impl"] != "reference-loop" else "ref:" + r["mode"]
                                          for r in fl], "ms per step",
                           f"Per-step latency against the floor, batch 1, {dev}{tag}", stem + "_floor.png"))
    sweep = [r for r in rows if r.get("part") == "sweep"]
    if sweep:
        fig, axs = plt.subplots(1, 3, figsize=(12, 3.6))
        for pol in dict.fromkeys(r["policy"] for r in sweep):
            rs = sorted((r for r in sweep if r["policy"] == pol and (pol == "schedule" or r["tau"] == 0.9)),
                        key=lambda r: r["steps_ratio"])
            if len({r["steps_ratio"] for r in rs}) > 1:
                axs[0].plot([r["steps_ratio"] for r in rs], [r["critical_path"] for r in rs], "o-", label=pol)
                axs[1].plot([r["steps_ratio"] for r in rs], [r["wall_ms"] for r in rs], "o-", label=pol)
            ts = sorted((r for r in sweep if r["policy"] == pol and r["steps_ratio"] == 1.0), key=lambda r: r["tau"])
            if pol != "schedule" and len(ts) > 1:
                axs[2].plot([r["tau"] for r in ts], [r["wall_ms"] for r in ts], "o-", label=pol)
        axs[0].set(xlabel="steps ratio", ylabel="critical path (steps)")
        axs[1].set(xlabel="steps ratio", ylabel="wall ms per request (median)")
        axs[2].set(xlabel="tau (steps ratio 1)", ylabel="wall ms per request (median)")
        for a in axs:
            if a.get_lines():
                a.legend(fontsize=7)
            else:
                a.text(0.5, 0.5, "no setting of this sweep in the run", ha="center", va="center",
                       transform=a.transAxes, fontsize=8)
        fig.suptitle(f"PD knob sweep, batch 1, {dev}{tag}", fontsize=9)
        fig.tight_layout()
        out.append(stem + "_sweep.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)
    return out


def write_report(data: dict, stem: str) -> list:
    """Write ``<stem>.md`` and the PNGs; returns lines saying what was written (or why PNGs were not)."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write(summary_markdown(data) + "\n")
    msgs = [f"wrote {stem}.md"]
    try:
        msgs += [f"wrote {p}" for p in plots(data, stem)]
    except ImportError:
        msgs.append("no PNG plots: matplotlib is not installed (pip install -e '.[bench]')")
    return msgs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a bench_decoder.py --out file")
    p.add_argument("--to", default=None, help="output stem (default: the JSON path without .json)")
    a = p.parse_args(argv)
    with open(a.json) as f:
        data = json.load(f)
    if data.get("bench") != "decoder":
        raise SystemExit(f"{a.json} is a {data.get('bench')!r} benchmark file, not a bench_decoder.py one")
    for line in write_report(data, a.to or os.path.splitext(a.json)[0]):
        print(line)


if __name__ == "__main__":
    main()
