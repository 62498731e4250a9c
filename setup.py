"""Builds the optional CUDA extension peft_fast._C from csrc/ when torch has CUDA and nvcc is found.

Everything else is declared in pyproject.toml. Without a CUDA torch (CI, CPU machines) the extension is skipped with
one line saying why, and peft_fast runs on its torch / Triton paths.
"""

import glob
import os
import sys

from setuptools import find_packages, setup


def _cuda_extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}, "no sources in csrc/"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not installed in the build environment (use --no-build-isolation)"
    if not torch.version.cuda:
        return [], {}, f"torch {torch.__version__} has no CUDA"
    if not CUDA_HOME or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return [], {}, "nvcc not found (set CUDA_HOME)"
    ext = CUDAExtension(
        "peft_fast._C",
        sources,
        # the C++ standard is left to torch's BuildExtension (it matches the one its headers need)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


ext_modules, cmdclass, why_not = _cuda_extension()
if why_not:
    print(f"peft_fast: skipping the CUDA extension peft_fast._C: {why_not}", file=sys.stderr)

# kernels/ lives at the top level (one place for all Triton code) and installs as peft_fast.kernels
kernel_packages = ["peft_fast.kernels"] + [f"peft_fast.kernels.{p}" for p in find_packages("kernels")]
setup(
    packages=find_packages(include=["peft_fast", "peft_fast.*"]) + kernel_packages,
    package_dir={"peft_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
