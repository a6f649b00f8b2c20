"""Build script: the package, plus the C++/CUDA extension staged_fast._C.

Install against the torch already in the environment (the extension must match its ABI):

    pip install --no-build-isolation -e .

With a CUDA torch and a CUDA toolkit (CUDA_HOME) this builds a CUDAExtension (CPU OpenMP kernels plus
the CUDA kernels); otherwise a CppExtension with -fopenmp (CPU kernels only). Set STAGED_FAST_NO_EXT=1
to skip the extension: staged_fast.ops then runs the PyTorch reference and says so once.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = "csrc"


def _extensions():
    if os.environ.get("STAGED_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("staged_fast: torch is not importable; building without the extension", file=sys.stderr)
        return [], {}
    sources = [f"{CSRC}/grow_cpu.cpp", f"{CSRC}/module.cpp"]
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    cxx = ["-O3", *openmp]  # the C++ standard is the one BuildExtension picks for this torch
    with_cuda = torch.cuda.is_available() or os.environ.get("STAGED_FAST_FORCE_CUDA") == "1"
    if with_cuda and cpp_extension.CUDA_HOME is not None:
        ext = cpp_extension.CUDAExtension(
            "staged_fast._C",
            sources + [f"{CSRC}/grow_cuda.cu"],
            extra_compile_args={"cxx": cxx + ["-DSTAGED_FAST_WITH_CUDA"], "nvcc": ["-O3", "-DSTAGED_FAST_WITH_CUDA"]},
            extra_link_args=openmp,
        )
    else:
        ext = cpp_extension.CppExtension("staged_fast._C", sources, extra_compile_args=cxx, extra_link_args=openmp)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
