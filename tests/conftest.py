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
