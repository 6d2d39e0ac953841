"""Build script. Metadata lives in pyproject.toml.

A plain ``pip install -e .`` builds nothing: the CUDA extension is compiled just in time on first use
(``pd_kernels/_cuda_ext.py``). ``PD_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .`` builds it
ahead of time as ``pd_kernels._C`` against the installed torch, with the JIT build's nvcc flags
(``_cuda_ext.NVCC_FLAGS``); ``PD_KERNELS_CUDA_ARCH`` (default ``9.0a``) and ``MAX_JOBS`` apply.

A wheel or a non-editable ``pip install .`` ships the CUDA sources as package data: ``build_py`` copies the
repository's top-level ``csrc/`` into the built package as ``pd_kernels/csrc/``, where the JIT build of an
installed package finds them (``_cuda_ext.source_dir``). ``MANIFEST.in`` puts ``csrc/`` into the sdist.
"""
import glob
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
CSRC_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


def csrc_files() -> list[str]:
    """Every CUDA / C++ source and header under ``csrc/`` (relative to it), sorted."""
    out = []
    for root, _, files in os.walk(CSRC):
        out += [os.path.relpath(os.path.join(root, f), CSRC) for f in files if f.endswith(CSRC_SUFFIXES)]
    return sorted(out)


class BuildPyWithCsrc(build_py):
    """``build_py`` that also copies ``csrc/`` into the built package as ``pd_kernels/csrc/``. Skipped for
    editable installs: those read ``csrc/`` in the checkout."""

    def _csrc_targets(self):
        return [(os.path.join(CSRC, f), os.path.join(self.build_lib, "pd_kernels", "csrc", f)) for f in csrc_files()]

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        targets = self._csrc_targets()
        if not targets:
            raise RuntimeError(f"no CUDA sources under {CSRC}: refusing to build a package without them")
        for src, dst in targets:
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst, preserve_mode=False)

    def get_outputs(self, include_bytecode=1):
        extra = [] if getattr(self, "editable_mode", False) else [dst for _, dst in self._csrc_targets()]
        return super().get_outputs(include_bytecode) + extra


ext_modules, cmdclass = [], {"build_py": BuildPyWithCsrc}
if os.environ.get("PD_KERNELS_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # the nvcc flags have one home, pd_kernels/_cuda_ext.py (loaded by path: the package is not installed yet)
    spec = importlib.util.spec_from_file_location("_pd_kernels_cuda_ext", os.path.join(HERE, "pd_kernels", "_cuda_ext.py"))
    cuda_ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_ext)
    ext_modules = [CUDAExtension(
        "pd_kernels._C",
        sources=sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/bindings/*.cpp")),
        include_dirs=[CSRC],
        extra_compile_args={"cxx": ["-O3"], "nvcc": [*cuda_ext.NVCC_FLAGS, *cuda_ext.arch_flags()]},
    )]
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
