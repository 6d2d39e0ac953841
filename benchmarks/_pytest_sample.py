"""pytest plugin of ``benchmarks/gpu_check.sh --dry-run``: keep only the first N selected tests of each file.

    pytest -p benchmarks._pytest_sample --sample-per-file 2 -k "not cuda" tests/test_span_attention.py ...

It runs after ``-k`` / ``-m`` deselection, so the sample is taken from what the real run would select: the dry
run on a CPU then proves the selection, the collection and the command line of every test phase without
spending the interpreter's time on all of it.
"""
import pytest


def pytest_addoption(parser):
    parser.addoption("--sample-per-file", type=int, default=0,
                     help="keep the first N selected tests of each file (0: all)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    n = config.getoption("--sample-per-file")
    if n <= 0:
        return
    count: dict[str, int] = {}
    keep, drop = [], []
    for item in items:
        f = item.nodeid.split("::", 1)[0]
        count[f] = count.get(f, 0) + 1
        (keep if count[f] <= n else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
