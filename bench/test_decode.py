"""pytest-benchmark: the `decode` suite of `peft-fast bench`, one test per (case, implementation)."""

import pytest

from _common import case_params, cases, run

QUICK_IDS = {c.id for c in cases("decode", quick=True)}


@pytest.mark.parametrize("case,impl", case_params("decode"))
def test_decode(benchmark, case, impl, device, dtype, request):
    run(benchmark, case, impl, device, dtype, request.config.getoption("--quick-bench"), QUICK_IDS)
