"""Build of swamp: pure Python packages plus the CUDA extension ``swamp_kernels._C``.

The extension is built when torch is a CUDA build and a CUDA toolkit is found
(``CUDA_HOME`` or nvcc on PATH); otherwise it is skipped with a message and swamp
runs on its Triton and torch backends. ``TORCH_CUDA_ARCH_LIST`` selects the GPU
architectures (default ``8.0;9.0``); ``SWAMP_NO_CUDA_EXT=1`` skips the build.
"""
import glob
import os

from setuptools import setup

CSRC = os.path.join("swamp_kernels", "csrc")


def _cuda_build():
    if os.environ.get("SWAMP_NO_CUDA_EXT") == "1":
        return None, "SWAMP_NO_CUDA_EXT=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not installed in the build environment"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return None, "no CUDA toolkit found (set CUDA_HOME)"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "*.cu")))
    extension = CUDAExtension(
        "swamp_kernels._C",
        sources,
        include_dirs=[os.path.abspath(CSRC)],
        # -g0 overrides Python's default -g: debug info of the torch headers costs a third
        # of the bindings' compile time. The C++ standard is torch's choice: C++17 with the GPU
        # image's torch 2.11, C++20 with 2.14, so the sources stay C++17 (the kernels are also
        # compiled as C++17 in CI: tests/test_cuda_resources.py).
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return ([extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}), None


built, why_not = _cuda_build()
if built is None:
    print(f"swamp: skipping the CUDA extension swamp_kernels._C ({why_not})")
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = built

setup(ext_modules=ext_modules, cmdclass=cmdclass)
