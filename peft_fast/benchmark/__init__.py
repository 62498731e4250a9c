"""The benchmark suite behind `peft-fast bench` (pytest-benchmark tests in bench/ use the same cases).

cases.py defines what is timed (layer, model training step, decoding) for the bare base, HF PEFT and peft_fast;
runner.py checks, times and measures each; report.py writes the table, JSON, plot and bench/RESULTS.md.
"""

from .cases import DecodeCase, LayerCase, ModelTrainCase, suites
from .runner import CaseResult, ImplResult, environment, run_case, to_json

__all__ = ["DecodeCase", "LayerCase", "ModelTrainCase", "suites", "CaseResult", "ImplResult", "environment",
           "run_case", "to_json"]
