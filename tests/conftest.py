import os

import torch

# Without a GPU, Triton kernels execute in the interpreter on CPU tensors. Must be set before any @triton.jit runs
# (importing torch runs none); on a GPU machine the kernels compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PEFT_FAST_TRITON_AUTOTUNE", "0")  # fixed kernel configs: tests never benchmark candidates
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def force_backend():
    """force_backend("triton") forces that backend (peft_fast.ops.use_backend) until the test ends; later calls nest."""
    from peft_fast import ops

    with contextlib.ExitStack() as stack:
        yield lambda name: stack.enter_context(ops.use_backend(name))


@pytest.fixture(scope="session")
def cpp_lora_module(tmp_path_factory):
    """csrc/lora_autograd.cpp built for this machine's torch (CPU works: it is plain ATen), or a skip.

    On the GPU machine setup.py builds the same file into peft_fast._C; this build lets the CPU suite check it."""
    import shutil

    from torch.utils import cpp_extension

    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("needs a C++ compiler and ninja")
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    build = tmp_path_factory.mktemp("lora_cpp")
    binding = build / "binding.cpp"
    binding.write_text('#include "lora_autograd.h"\n'
                       'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("lora_linear", &lora_linear); '
                       'm.def("lora_add", &lora_add); m.def("qlora_linear", &qlora_linear); }\n')
    module = cpp_extension.load("peft_fast_lora_cpp", [os.path.join(csrc, "lora_autograd.cpp"), str(binding)],
                                extra_include_paths=[csrc], extra_cflags=["-O1"], build_directory=str(build))
    return module


@pytest.fixture(scope="session")
def cpp_lora_linear(cpp_lora_module):
    return cpp_lora_module.lora_linear


@pytest.fixture(scope="session")
def cpp_lora_add(cpp_lora_module):
    return cpp_lora_module.lora_add


@pytest.fixture(scope="session")
def cpp_qlora_linear(cpp_lora_module):
    return cpp_lora_module.qlora_linear
