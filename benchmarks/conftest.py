"""pytest setup of ``pytest benchmarks/ --benchmark-only`` (the pytest-benchmark kernel micro-benchmarks).

Without a GPU the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set here before anything
imports Triton kernels) on tiny shapes: the run checks the benchmarks work, its times are not results.
``--bench-quick`` (or ``PD_BENCH_QUICK=1``) keeps a few representative shapes per op.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)   # the shared 2-core CPU machines: OpenMP spinning slows tiny ops ~10x
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", default=False,
                     help="pd_kernels benchmarks: a few representative shapes per op")


def pytest_configure(config):
    if config.getoption("--bench-quick"):
        os.environ["PD_BENCH_QUICK"] = "1"


def pytest_benchmark_update_commit_info(config, commit_info):
    """pytest-benchmark asks git; where the tree has no ``.git`` (a GPU machine's copy) the commit comes from
    ``benchmarks/provenance.py`` ($PD_KERNELS_COMMIT or the stamp benchmarks/COMMIT), as in every other JSON."""
    if commit_info.get("id") in (None, "unknown", "unversioned"):
        from benchmarks.provenance import commit_id

        commit_info["id"] = commit_id()
