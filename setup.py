"""Build script. Metadata lives in pyproject.toml.

A plain ``pip install -e .`` builds nothing: the CUDA extension is compiled just in time on first use
(``pd_kernels/_cuda_ext.py``). ``PD_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .`` builds it
ahead of time as ``pd_kernels._C`` against the installed torch; ``PD_KERNELS_CUDA_ARCH`` (default ``9.0a``)
and ``MAX_JOBS`` apply.
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("PD_KERNELS_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    gencode = []
    for arch in os.environ.get("PD_KERNELS_CUDA_ARCH", "9.0a").replace(",", ";").split(";"):
        if arch.strip():
            num = arch.strip().replace(".", "")
            gencode.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    ext_modules = [CUDAExtension(
        "pd_kernels._C",
        sources=sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/bindings/*.cpp")),
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo", *gencode]},
    )]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
