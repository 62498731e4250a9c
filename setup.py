"""Builds the optional CUDA extension peft_fast._C from csrc/ when torch has CUDA and nvcc is found.

Everything else is declared in pyproject.toml. Without a CUDA torch (CI, CPU machines) the extension is skipped with
one line saying why, and peft_fast runs on its torch / Triton paths.
"""

import glob
import os
import shutil
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
        # the C++ autograd node takes the fused kernels of csrc/lora_kernels.h (the CPU test build leaves them out)
        define_macros=[("PEFT_FAST_CUDA_KERNELS", None)],
        # the C++ standard is left to torch's BuildExtension (it matches the one its headers need)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": _build_ext_class(BuildExtension)}, None


def _build_ext_class(BuildExtension):
    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """Links the way torch.utils.cpp_extension.load does: the C++ driver with -shared, none of the link flags of
        Python's sysconfig. On the H200 machine (Python 3.12 venv, 2026-12-02) sysconfig's link line
        (`/opt/gcc/bin/g++ -fno-strict-overflow … -shared`) left a private
        copy of libstdc++ inside _C.so (`nm -D` showed __gxx_personality_v0 and std::ostream defined there): its
        iostreams were never initialised, so the first error message built in C++ segfaulted, while the same code
        built by cpp_extension.load raised cleanly (scripts/probe_cxx_throw.py)."""

        def build_extension(self, ext):
            # c++ from PATH, not $CXX / sysconfig's compiler_cxx: on the H200 machine that was /opt/gcc/bin/g++,
            # whose link put the private libstdc++ into _C.so, while the objects came from the system c++
            cxx = shutil.which("c++") or "c++"
            for key in ("linker_so", "linker_so_cxx"):
                if key in self.compiler.executables:
                    self.compiler.set_executable(key, [cxx, "-shared"])
            self.compiler.set_executable("compiler_cxx", [cxx])  # older setuptools link C++ with compiler_cxx[0]
            try:
                super().build_extension(ext)
            except Exception as exc:  # a toolchain or GPU we never built for must not fail the install
                if os.environ.get("PEFT_FAST_REQUIRE_EXTENSION") == "1":  # (scripts/gpu_check.sh: fail loudly)
                    raise
                print(f"peft_fast: the CUDA extension peft_fast._C did not build ({type(exc).__name__}: {exc}); "
                      "peft_fast runs on its Triton / torch paths. Set PEFT_FAST_REQUIRE_EXTENSION=1 to see the "
                      "build fail instead.", file=sys.stderr)
                self.extensions.remove(ext)  # nothing to copy or package for it

    return BuildExt


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
