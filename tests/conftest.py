"""Test setup: on a machine without a GPU, Triton kernels run in the interpreter on CPU tensors.

``TRITON_INTERPRET=1`` must be set before the first ``@triton.jit`` runs, hence here, before anything
imports pd_kernels. Fixtures:

* ``device``  - (session) ``DEVICE``: ``"cuda"`` when a GPU is present, else ``"cpu"`` (Triton then runs
  interpreted). The one home of the test device: kernel tests make their tensors and layouts on it (the
  module constant ``DEVICE`` is the same value, for parametrize lists and default arguments); references
  may compute on the CPU and compare with ``.cpu()``;
* ``poison``  - ``poison(t)`` fills a float output with NaN (ints with a sentinel) before a kernel writes;
* ``one_thread`` - one intra-op thread for a module (restored afterwards);
* marker ``gpu`` - tests that need a real GPU are skipped, with the reason, where there is none;
* marker ``cpu_only`` - tests that check CPU-only behaviour (the interpreter, errors without CUDA, host
  clocks) are skipped where a GPU is present, so the GPU run is kernel tests on CUDA tensors.

``INTERPRET`` says whether Triton runs in its interpreter (bf16 math is wrong there, so
``triton_dtypes()`` leaves bf16 out only then).
"""
import os

import pytest

try:
    import torch

    _HAS_GPU = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_GPU = False

if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".inductor_cache"))

import torch  # noqa: E402

HAS_GPU = _HAS_GPU
DEVICE = "cuda" if HAS_GPU else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INT_POISON = -(2**31) + 7


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line("markers", "cpu_only: checks CPU-only behaviour (skipped where a GPU is present)")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        skip, marker = pytest.mark.skip(reason="checks CPU-only behaviour; a GPU is present"), "cpu_only"
    else:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none present (Triton runs in the interpreter here)")
        marker = "gpu"
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    """The device kernel tests run on: ``DEVICE``."""
    return DEVICE


def poison_(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(INT_POISON)
    return t


@pytest.fixture
def poison():
    return poison_


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module, restored afterwards: tiny models are overhead-bound, and on the
    shared 2-core machines OpenMP's spinning threads made such tests ~10x slower
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def triton_dtypes():
    """Dtypes the Triton kernels are tested in here: bf16 math is wrong in the interpreter, so bf16 is left
    out only when Triton is interpreted (on a GPU every dtype runs)."""
    return [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
