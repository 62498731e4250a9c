"""Shared body of the pytest-benchmark tests: check an implementation once, then let pytest-benchmark time it."""

import pytest
import torch

from peft_fast.benchmark import suites
from peft_fast.benchmark.cases import tolerance
from peft_fast.benchmark.runner import impl_names

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cases(group: str, quick: bool = False):
    return suites(_DEVICE, quick)[group]


def case_params(group: str):
    """(case, impl) pairs for parametrize; ids read like the CLI's table rows."""
    out = []
    for case in cases(group):
        for impl in impl_names(case, _DEVICE):
            out.append(pytest.param(case, impl, id=f"{case.id} · {impl}"))
    return out


def run(benchmark, case, impl_name, device, dtype, quick, quick_ids):
    if quick and case.id not in quick_ids:
        pytest.skip("not in the quick list")
    case.prepare(device, dtype)
    try:
        impl = case.build(impl_name)
        if impl is None:
            pytest.skip(f"{impl_name} is not installed")
        if impl.check is not None:
            err = impl.check()
            assert err < tolerance(dtype), f"{impl_name} is wrong on {case.id}: relative error {err:.2e}"
        benchmark.extra_info.update(case=case.id, impl=impl_name, **case.params)

        def step():
            impl.step(0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        benchmark.pedantic(step, warmup_rounds=3, rounds=20 if device.type == "cuda" else 5, iterations=1)
    finally:
        case.release()
