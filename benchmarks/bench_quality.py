"""Quality against latency of the shipped tiny planned-diffusion model (the paper's Pareto plot).

Over held-out prompts of the model's synthetic task (:mod:`pd_kernels.tiny.task`): exact-match accuracy,
plan-error rate, rounds and critical path (sequential forward passes) for ``ar``, ``pd``, ``pd-da`` and
``diffusion``, sweeping the steps ratio r (``schedule`` policy) and the confidence threshold tau
(``threshold`` policy). Writes ``quality.json`` (rows + environment) and ``quality.png`` (accuracy against
critical path; needs matplotlib) under ``--out`` (default ``benchmarks/results/quality``) and prints the
README table. Same code as ``python -m pd_kernels eval``; this script adds the commit and versions.

The critical path does not depend on the device; accuracy barely does (greedy decoding, fp32 on CPU). The
``wall_s`` column is the whole sweep point on this machine, not a latency result.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._harness import ROOT, environment  # noqa: E402
from pd_kernels.tiny import evaluate  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped tiny model)")
    p.add_argument("--n", type=int, default=200, help="held-out prompts")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality"))
    p.add_argument("--quick", action="store_true", help="r in (0.25, 1), tau 0.9 only")
    p.add_argument("--smoke", action="store_true", help="20 prompts, --quick: check the script runs")
    p.add_argument("--backend", default="torch", help="pd_kernels backend of the decoder (torch on CPU)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    n, quick = (20, True) if a.smoke else (a.n, a.quick)
    doc = evaluate.run(a.model, a.out, n=n, quick=quick, backend=a.backend, device=a.device,
                       meta={"environment": environment(), "smoke": a.smoke})
    print()
    print(evaluate.markdown_table(doc["rows"]))
    print(f"wrote {os.path.join(a.out, 'quality.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
