"""pytest-benchmark suites over the same cases as `peft-fast bench` (peft_fast.benchmark.cases).

    pytest bench --benchmark-group-by=param:case          # GPU sizes on CUDA, small sizes on CPU
    pytest bench --quick-bench                            # the --quick case list

Each test times one implementation (bare base, HF PEFT, peft_fast) of one case with pytest-benchmark; the case
is checked against its reference first, so a wrong implementation fails instead of reporting a time.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--quick-bench", action="store_true", help="the quick case list of `peft-fast bench --quick`")


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32
