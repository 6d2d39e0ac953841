"""The CUDA extension: sources in ``csrc/``, built ahead of time or just in time on first use.

``csrc/*.cu`` hold the kernels and plain-C launchers (no torch headers: CI compile-checks them with
nvcc alone); ``csrc/bindings/*.cpp`` declare the ``pd_kernels::*_cuda`` schemas once
(``TORCH_LIBRARY``) and register their CUDA implementations (``TORCH_LIBRARY_IMPL``).

Where the sources are (:func:`source_dir`): ``csrc/`` lives at the top of the repository; a built wheel or
a non-editable ``pip install .`` carries a copy as package data in ``pd_kernels/csrc/`` (``setup.py``
copies it at build time). The installed copy is preferred, then the checkout's ``csrc/`` (editable installs).

Loading order: a prebuilt ``pd_kernels._C`` (``PD_KERNELS_BUILD_CUDA=1 pip install ...``), else a JIT
build with ``torch.utils.cpp_extension.load`` + ninja into a cache directory. Knobs (environment):

* ``PD_KERNELS_CUDA_ARCH``  - arch list for the JIT build, default ``9.0a`` (e.g. ``"8.0;9.0a"``);
* ``PD_KERNELS_BUILD_JOBS`` - parallel compile jobs (sets ``MAX_JOBS``);
* ``PD_KERNELS_BUILD_VERBOSE=1`` - show the compiler output;
* ``PD_KERNELS_CACHE_DIR``  - build directory (default ``~/.cache/pd_kernels/<torch version>``);
* ``PD_KERNELS_NO_JIT=1``   - never build; the cuda backend is then unavailable without a prebuilt.

Importing ``pd_kernels`` never touches any of this; the first call that resolves to the cuda backend does.
"""
from __future__ import annotations

import glob
import os
import threading
from typing import Callable

import torch

_lock = threading.Lock()
_problem: str | None = None
_tried = False

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
#: Where the CUDA sources are looked for, in order: shipped in the installed package, then the checkout.
SOURCE_DIRS = (os.path.join(_PACKAGE, "csrc"), os.path.join(os.path.dirname(_PACKAGE), "csrc"))


def source_dir() -> str:
    """The directory holding the CUDA sources (``*.cu``, ``*.h``, ``bindings/*.cpp``): the first of
    :data:`SOURCE_DIRS` that has any. Raises ``FileNotFoundError`` naming both places when neither has."""
    for d in SOURCE_DIRS:
        if glob.glob(os.path.join(d, "*.cu")):
            return d
    raise FileNotFoundError(f"pd_kernels CUDA sources not found in {SOURCE_DIRS[0]} (installed package) or "
                            f"{SOURCE_DIRS[1]} (source checkout): the package was built without its csrc/ files")


# (qualified name of a C++-declared op, fake implementation): registered once the extension has loaded (a
# fake cannot be registered for an op that does not exist yet). The op modules fill it with @cuda_fake.
_CUDA_FAKES: list[tuple[str, Callable]] = []


def cuda_fake(qualname: str):
    """Decorator: fake (meta) implementation of an op whose schema lives in ``csrc/bindings``."""
    def deco(fn):
        _CUDA_FAKES.append((qualname, fn))
        return fn
    return deco


def sources() -> list[str]:
    """The files the JIT build compiles: ``csrc/*.cu`` then ``csrc/bindings/*.cpp`` (absolute paths)."""
    d = source_dir()
    return sorted(glob.glob(os.path.join(d, "*.cu"))) + sorted(glob.glob(os.path.join(d, "bindings", "*.cpp")))


#: nvcc flags of every build of ``csrc/`` besides the arch flags: the JIT build here, the ahead-of-time build in
#: ``setup.py`` and the compile check ``.ci/check_cuda.sh`` all read this one tuple. ``--use_fast_math`` turns a
#: plain ``logf`` into ``__logf``: code that must match the reference to the bit calls libdevice by name
#: (``__nv_logf`` in the Gumbel noise of ``csrc/token_confidence.cu``), which the flag never rewrites.
NVCC_FLAGS = ("-O3", "--use_fast_math", "-lineinfo")


def arch_flags() -> list[str]:
    """``-gencode`` flags for ``$PD_KERNELS_CUDA_ARCH`` (default ``9.0a``; a list such as ``"8.0;9.0a"``)."""
    flags = []
    for arch in os.environ.get("PD_KERNELS_CUDA_ARCH", "9.0a").replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _build() -> None:
    try:
        import pd_kernels._C  # noqa: F401  (ahead-of-time build)
        return
    except ImportError:
        pass
    if os.environ.get("PD_KERNELS_NO_JIT", "0") not in ("", "0"):
        raise RuntimeError("no prebuilt pd_kernels._C and PD_KERNELS_NO_JIT is set")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("CUDA toolkit not found (set CUDA_HOME=/usr/local/cuda) to JIT-build csrc/")
    if os.environ.get("PD_KERNELS_BUILD_JOBS"):
        os.environ["MAX_JOBS"] = os.environ["PD_KERNELS_BUILD_JOBS"]
    build_dir = os.environ.get("PD_KERNELS_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "pd_kernels", torch.__version__.replace("+", "_"))
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name="pd_kernels_cuda",
        sources=sources(),
        extra_include_paths=[source_dir()],
        extra_cflags=["-O3"],
        extra_cuda_cflags=[*NVCC_FLAGS, *arch_flags()],
        build_directory=build_dir,
        is_python_module=False,
        verbose=os.environ.get("PD_KERNELS_BUILD_VERBOSE", "0") not in ("", "0"),
    )


def load_problem() -> str | None:
    """Load the extension once; return ``None`` when it is usable, else why it is not."""
    global _problem, _tried
    if _tried:
        return _problem
    with _lock:
        if _tried:
            return _problem
        if not torch.cuda.is_available():
            _problem = "no CUDA device is available to torch"
        elif torch.version.cuda is None:
            _problem = "this torch build has no CUDA support"
        else:
            try:
                _build()
                for name, fn in _CUDA_FAKES:
                    torch.library.register_fake(name, fn)
            except Exception as e:  # the message is what the user needs to see
                _problem = f"building/loading the CUDA extension failed: {type(e).__name__}: {e}"
        _tried = True
        return _problem


def is_available() -> bool:
    return load_problem() is None
