"""Probe (GPU machine): why does a C++ exception thrown inside peft_fast._C kill the interpreter (SIGSEGV)?

Prints the toolchain facts that decide C++ exception handling across the extension boundary (compilers, the C++ ABI
torch was built with, which pybind11 headers the build sees, the personality routine the .so links), then builds
a tiny torch extension that throws in four ways and calls each, and peft_fast._C with 17 rows, in a child process
with a SIGSEGV handler that prints the native backtrace. Usage: python3 scripts/probe_cxx_throw.py
"""

import glob
import os
import subprocess
import sys
import sysconfig
import tempfile

import torch
from torch.utils import cpp_extension

SOURCE = r"""
#include <torch/extension.h>
#include <execinfo.h>
#include <signal.h>
#include <stdexcept>
#include <unistd.h>

static void on_segv(int sig) {
    void* frames[64];
    int n = backtrace(frames, 64);
    const char msg[] = "\n--- native backtrace at the signal ---\n";
    write(2, msg, sizeof msg - 1);
    backtrace_symbols_fd(frames, n, 2);
    signal(sig, SIG_DFL);
    raise(sig);
}

void install_handler() { signal(SIGSEGV, on_segv); signal(SIGABRT, on_segv); }
int throw_runtime() { throw std::runtime_error("std::runtime_error from the probe"); }
int throw_check() { TORCH_CHECK(false, "TORCH_CHECK from the probe"); return 0; }
int throw_value_error() { throw pybind11::value_error("pybind11::value_error from the probe"); }
int catch_inside() { try { throw std::runtime_error("x"); } catch (const std::exception&) { return 7; } return 0; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("install_handler", &install_handler);
    m.def("throw_runtime", &throw_runtime);
    m.def("throw_check", &throw_check);
    m.def("throw_value_error", &throw_value_error);
    m.def("catch_inside", &catch_inside);
}
"""


def sh(cmd: str) -> str:
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (out.stdout + out.stderr).strip()


def facts() -> None:
    print("python", sys.version.split()[0], sysconfig.get_config_var("CC"))
    print("torch", torch.__version__, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
    for line in torch.__config__.show().splitlines():
        if any(k in line for k in ("GCC", "CXX_COMPILER", "CXX_FLAGS", "clang")):
            print("  torch build:", line.strip()[:300])
    print("env CXX:", os.environ.get("CXX"), "| sysconfig CXX:", sysconfig.get_config_var("CXX"), "| LDCXXSHARED:",
          sysconfig.get_config_var("LDCXXSHARED"), "| c++ on PATH:", sh("command -v c++"))
    print("c++:", sh("c++ --version | head -1"), "| g++:", sh("g++ --version | head -1"))
    print("nvcc:", sh("nvcc --version | tail -2 | head -1"))
    print("pybind11 pip package:", sh(f"{sys.executable} -c 'import pybind11; print(pybind11.__version__, pybind11.get_include())'"))
    torch_pb = os.path.join(os.path.dirname(torch.__file__), "include", "pybind11", "detail", "common.h")
    print("torch's pybind11:", sh(f"grep -m3 'define PYBIND11_VERSION_M' {torch_pb}").replace("\n", " "))
    print("libstdc++ loaded by torch:", sh(f"{sys.executable} -c 'import torch' && grep -o '/[^ ]*libstdc++[^ ]*' "
                                          f"/proc/self/maps 2>/dev/null | head -1"))
    for so in glob.glob("peft_fast/_C*.so"):
        print("peft_fast._C:", so)
        print("  personality:", sh(f"nm -D {so} | grep -i personality").replace("\n", " | "))
        print("  ldd:", sh(f"ldd {so} | grep -E 'stdc|gcc_s|torch_python|c10.so'").replace("\n", " | "))
        print("  comment:", sh(f"readelf -p .comment {so} | grep -v '^$' | tail -3").replace("\n", " | "))
    for ninja in glob.glob("build/**/build.ninja", recursive=True)[:1]:
        print("build.ninja flags:")
        print(sh(f"grep -E '^(cflags|post_cflags|cuda_cflags|ldflags) ' {ninja}"))


def child(code: str, build_dir: str) -> None:
    prog = f"import sys, torch; sys.path.insert(0, {build_dir!r}); import probe_throw as m; m.install_handler(); " + code
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    tail = (out.stdout + out.stderr).strip().splitlines()[-30:]
    print(f"--- {code!r}: rc {out.returncode}")
    for line in tail:
        print("   ", line[:300])


def main() -> None:
    facts()
    build_dir = tempfile.mkdtemp(prefix="probe_throw_")
    cpp_extension.load_inline("probe_throw", SOURCE, build_directory=build_dir, verbose=False)
    for fn in ("catch_inside", "throw_runtime", "throw_check", "throw_value_error"):
        child(f"print('{fn} ->', end=' '); print(m.{fn}())" if fn == "catch_inside" else
              f"\ntry:\n    m.{fn}()\nexcept Exception as e:\n    print('{fn} raised', type(e).__name__, str(e)[:80])", build_dir)
    child("import torch; from peft_fast import _C; x = torch.randn(17, 512, device='cuda', dtype=torch.bfloat16); "
          "q = torch.zeros(256 * 256, device='cuda', dtype=torch.uint8); c = torch.linspace(-1, 1, 16, device='cuda'); "
          "a = torch.rand(256 * 512 // 64, device='cuda')\ntry:\n    _C.qgemv_lora(x, q, c, a, 64, 256, 512, None, None, None)\n"
          "except Exception as e:\n    print('_C raised', type(e).__name__, e)", build_dir)


if __name__ == "__main__":
    main()
