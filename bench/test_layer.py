"""pytest-benchmark: the `layer` suite of `peft-fast bench`, one test per (case, implementation)."""

import pytest

from _common import case_params, cases, run

QUICK_IDS = {c.id for c in cases("layer", quick=True)}


@pytest.mark.parametrize("case,impl", case_params("layer"))
def test_layer(benchmark, case, impl, device, dtype, request):
    run(benchmark, case, impl, device, dtype, request.config.getoption("--quick-bench"), QUICK_IDS)
