"""The benchmark suite (`peft-fast bench`) on the CPU: end to end at --quick, the correctness gate, regressions."""

import copy
import json
import os

import pytest
import torch

from peft_fast import cli
from peft_fast.benchmark import LayerCase, run_case
from peft_fast.benchmark.cases import Impl
from peft_fast.benchmark.report import compare, table


def test_bench_quick_end_to_end_writes_json_png_and_results(tmp_path, capsys, monkeypatch):
    # as on a user's CPU: no Triton interpreter, so the forced-Triton QLoRA row runs on torch (not in slow motion)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out, results_dir = tmp_path / "run", tmp_path / "site"
    status = cli.main(["bench", "--quick", "--out", str(out), "--no-progress", "--write-results",
                       "--results-dir", str(results_dir)])
    assert status == 0
    payload = json.loads((out / "bench.json").read_text())
    assert payload["environment"]["torch"] == torch.__version__
    from peft_fast.ops import dispatch

    settings = payload["environment"]["settings"]  # (which routes the run timed)
    assert settings["one_gemm_min_rows"] == dispatch.ONE_GEMM_MIN_ROWS
    assert settings["env"] == {k: v for k, v in os.environ.items() if k.startswith("PEFT_FAST_")}
    groups = {c["group"] for c in payload["cases"]}
    assert {"layer", "layer decode", "qlora layer", "model", "decode"} <= groups
    for case in payload["cases"]:
        for name in ("base", "peft", "peft_fast"):
            impl = case["impls"][name]
            assert impl["median_ms"] > 0 and len(impl["samples_ms"]) >= 5, (case["id"], name)
        assert case["impls"]["peft_fast"]["ok"] is True
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| case | base ms (GPU) | PEFT ms (GPU) | peft_fast ms (GPU)" in printed
    md = (results_dir / "RESULTS.md").read_text()
    assert "results.png" in md and payload["cases"][0]["id"] in md and "Settings: fused kernels" in md
    assert sorted(os.listdir(results_dir)) == ["RESULTS.md", "results.json", "results.png"]
    # re-rendering the saved run needs no benchmarking and gives the same table
    assert cli.main(["bench", "--from-json", str(out / "bench.json"), "--out", str(tmp_path / "again")]) == 0
    assert table(payload["cases"]) in capsys.readouterr().out


def _wrong_peft_fast(case, device, dtype):
    """A 'fast' implementation that skips the LoRA term: quick, and wrong."""
    layer = case.base.to(device, dtype)
    return Impl(step=lambda i: layer(case.xs[i]), check=lambda: _err(layer(case.xs[0]), case.reference["y"]))


def _err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_a_wrong_implementation_is_caught_and_never_timed():
    case = LayerCase(48, 40, 40, 8, builders={"peft_fast": _wrong_peft_fast})
    result = run_case(case, torch.device("cpu"), torch.float32, repeats=3)
    fast = result.impls["peft_fast"]
    assert fast.ok is False and fast.rel_err > result.tolerance
    assert fast.median_ms is None and fast.samples_ms == []
    assert result.impls["peft"].ok is True and result.impls["peft"].median_ms > 0
    assert result.wrong == ["peft_fast"]
    from dataclasses import asdict

    row = next(line for line in table([asdict(result)]).splitlines() if line.startswith(f"| {case.id}"))
    assert "WRONG" in row


def test_interleaved_cases_time_every_implementation_in_the_same_rounds(monkeypatch):
    """A case with interleave = True (decode: host-bound) takes one sample of each implementation per round, so a
    host that slows down mid-run slows them all; a wrong implementation is still never timed."""
    calls = []

    def logging(name, wrong=False):
        def build(case, device, dtype):
            layer = case.base.to(device, dtype)
            return Impl(step=lambda i: calls.append(name) or layer(case.xs[i]),
                        check=(lambda: 1.0) if wrong else None)
        return build

    case = LayerCase(48, 40, 40, 8, builders={"base": logging("base"), "peft": logging("peft"),
                                              "peft_fast": logging("peft_fast", wrong=True)})
    monkeypatch.setattr(LayerCase, "interleave", True, raising=False)
    monkeypatch.setattr(LayerCase, "impl_names", ("base", "peft", "peft_fast"), raising=False)
    result = run_case(case, torch.device("cpu"), torch.float32, repeats=4)
    assert result.impls["peft_fast"].ok is False and result.impls["peft_fast"].median_ms is None
    assert "peft_fast" not in calls
    assert len(result.impls["base"].samples_ms) == len(result.impls["peft"].samples_ms) == 4
    timed = calls[calls.index("peft", calls.index("peft") + 1) + 1:]  # after both warm-ups
    assert timed[:8] == ["base", "peft"] * 4


def test_compare_to_flags_a_regression(tmp_path, capsys):
    out = tmp_path / "now"
    assert cli.main(["bench", "--quick", "--suite", "layer", "--out", str(out), "--no-progress"]) == 0
    now = json.loads((out / "bench.json").read_text())
    # without the progress bar, one log line as each implementation starts (where a cut-off run stopped)
    logged = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bench +")]
    assert len(logged) == sum(len(case["impls"]) for case in now["cases"])
    assert logged[0].endswith(f"{now['cases'][0]['id']} · base")
    before = json.loads(json.dumps(now))
    slowed = before["cases"][0]
    for impl in before["cases"][0]["impls"].values():  # the earlier run was 3× faster on the first case
        impl["median_ms"] = impl["median_ms"] / 3
    text, regressed = compare(now["cases"], before["cases"])
    assert regressed == [slowed["id"]]
    assert "REGRESSION" in text and "+200" in text
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(before))
    status = cli.main(["bench", "--from-json", str(out / "bench.json"), "--compare-to", str(earlier),
                       "--out", str(tmp_path / "cmp")])
    assert status == 3
    assert "REGRESSION" in capsys.readouterr().out
    _, none = compare(now["cases"], now["cases"])
    assert none == []


def test_only_runs_the_cases_it_names_and_a_miss_lists_the_suite(tmp_path, capsys):
    out = tmp_path / "only"
    assert cli.main(["bench", "--quick", "--suite", "layer", "--only", "decode", "--out", str(out),
                     "--no-progress"]) == 0
    ids = [case["id"] for case in json.loads((out / "bench.json").read_text())["cases"]]
    assert ids and all("decode" in i for i in ids)
    capsys.readouterr()
    assert cli.main(["bench", "--quick", "--suite", "layer", "--only", "no such case", "--out", str(out),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "matches no case" in err and "layer decode fwd" in err


def test_table_shows_gpu_kernel_time_beside_wall_time():
    """A host-bound row must be visible: wall 1.000 ms with 0.250 ms of kernels prints as "1.000 (0.250)"."""
    from peft_fast.benchmark import report

    case = {"id": "c", "out_bytes": None, "impls": {
        "base": {"median_ms": 0.5, "kernel_ms": 0.4, "ok": None},
        "peft": {"median_ms": 2.0, "ok": True},
        "peft_fast": {"median_ms": 1.0, "kernel_ms": 0.25, "ok": True},
    }}
    row = report.table([case]).splitlines()[2]
    assert "| 0.500 (0.400) | 2.000 | 1.000 (0.250) |" in row
    assert "2.00×" in row  # speed-up vs PEFT


def test_throughput_lines_keep_small_decode_rates_readable():
    """A decode rate of 48 tok/s printed as "0.0k tok/s" (H200 run, 2026-12-02): small rates are printed whole."""
    from peft_fast.benchmark import report

    case = {"id": "d", "impls": {"base": {"units_per_s": 48.24}, "peft_fast": {"units_per_s": 1234.4},
                                 "peft_fast compile": {"units_per_s": 69012.0}}}
    assert report.throughput_lines([case]) == ["- d: base 48.2 tok/s, peft_fast 1234 tok/s, "
                                               "peft_fast compile 69.0k tok/s"]


def _mutated_model_impl(mutate):
    """A peft_fast model-case implementation with one deliberate bug, checked by the case's own gate."""
    def build(case, device, dtype):
        model = case._peft_model("peft_fast")
        mutate(model)
        return Impl(step=lambda i: None, check=lambda: case._check(model))
    return build


def _scale_lora(factor):
    def mutate(model):
        for module in model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                for name in module.scaling:
                    module.scaling[name] *= factor
    return mutate


def _lose_grads(model):
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.register_hook(lambda g: g * 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_gate_catches_a_dropped_mis_scaled_or_gradient_less_lora_term(dtype):
    """Mutations tried: scaling 0 (the LoRA term dropped), scaling × 1.3, lora_A gradients zeroed (as a traced
    autograd.Function once did under torch.compile); each must be WRONG, the real implementation right. In bf16
    the reference is HF PEFT in fp32, errors counted net of PEFT's own bf16 error."""
    from peft_fast.benchmark.cases import LLAMA_TINY, ModelTrainCase

    for mutate in (_scale_lora(0.0), _scale_lora(1.3), _lose_grads):
        case = ModelTrainCase(LLAMA_TINY, 2, 16, builders={"peft_fast bad": _mutated_model_impl(mutate)})
        case.impl_names = ("peft", "peft_fast", "peft_fast bad")
        result = run_case(case, torch.device("cpu"), dtype, repeats=3)
        assert result.impls["peft_fast"].ok is True, result.impls["peft_fast"]
        bad = result.impls["peft_fast bad"]
        assert bad.ok is False and bad.rel_err > result.tolerance, (mutate, bad.rel_err)


def test_qlora_model_case_checks_against_an_fp32_twin_of_the_dequantized_base():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from peft_fast.benchmark.cases import LLAMA_TINY, QLoraTrainCase

    case = QLoraTrainCase(LLAMA_TINY, 1, 16, builders={"peft_fast compile": lambda *a: None,
                                                       "peft_fast compile+graphs": lambda *a: None})
    result = run_case(case, torch.device("cpu"), torch.bfloat16, repeats=2)
    for name in ("peft", "peft_fast"):
        impl = result.impls[name]
        assert impl.ok is True, (name, impl.check_detail, impl.error)
        assert "vs fp32" in impl.check_detail  # the reference's own bf16 error was measured against the twin


def test_dequantize_linears_computes_what_the_4bit_layers_compute():
    pytest.importorskip("bitsandbytes")
    from torch import nn

    from peft_fast.benchmark.quantized import dequantize_linears, quantize_linears

    torch.manual_seed(0)
    # (in_features multiples of the blocksize: bitsandbytes 0.50's own CPU dequantization, which its CPU forward
    # uses, mis-addresses the blocks of other shapes and disagrees with its quantizer there)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32, bias=False))
    original = copy.deepcopy(model)
    quantized = quantize_linears(model, compute_dtype=torch.float32, compress_statistics=True)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = quantized(x)
        twin = dequantize_linears(quantized)
        assert all(type(m) is nn.Linear for m in (twin[0], twin[2])) and twin[0].weight.dtype == torch.float32
        torch.testing.assert_close(twin(x), expected, rtol=1e-4, atol=1e-4)
        assert (twin(x) - original(x)).abs().max() > 1e-3  # the twin holds the rounded NF4 values, not the originals


def test_consumer_qlora_case_runs_both_libraries_and_reports_memory_budgets(tmp_path):
    """The 7B consumer-GPU QLoRA case, at its CPU size: each library prepares its own quantized model, peft_fast is
    checked against its torch path, and budget results (measured on CUDA only) are printed per library."""
    pytest.importorskip("bitsandbytes")
    from dataclasses import asdict

    from peft_fast.benchmark import report, run_case
    from peft_fast.benchmark.consumer import LLAMA_7B, consumer_cases

    (case,) = consumer_cases(torch.device("cpu"), quick=True)
    result = run_case(case, torch.device("cpu"), torch.float32, repeats=2)
    assert set(result.impls) == {"peft", "peft_fast"} and not result.wrong
    assert result.impls["peft_fast"].ok is True and result.impls["peft"].units_per_s > 0
    # the GPU cases are the 7B shape at sequence 2048, batch 1 and 4
    gpu = consumer_cases(torch.device("cuda"), quick=False)
    assert [c.batch for c in gpu] == [1, 4] and all(c.shape == LLAMA_7B and c.seq == 2048 for c in gpu)
    payload = asdict(result)
    payload["impls"]["peft"]["fits"] = {"16": False, "24": True}
    (line,) = report.throughput_lines([payload])
    assert "peft 16 GiB does not fit 24 GiB fits" in line


def test_quick_qlora_suite_leaves_out_the_compiled_rows():
    from peft_fast.benchmark.cases import LLAMA_TINY, ModelTrainCase, QLoraTrainCase, suites

    assert QLoraTrainCase(LLAMA_TINY, 1, 16).impl_names == ModelTrainCase.impl_names
    quick = [c for c in suites(torch.device("cpu"), quick=True)["qlora"] if isinstance(c, QLoraTrainCase)]
    full = [c for c in suites(torch.device("cpu"), quick=False)["qlora"] if isinstance(c, QLoraTrainCase)]
    assert quick and full
    assert not any("compile" in n for c in quick for n in c.impl_names)
    assert all("peft_fast compile" in c.impl_names for c in full)


def test_quick_gpu_qlora_suite_leaves_out_the_forced_triton_rows():
    from peft_fast.benchmark.cases import QLoraLayerCase, suites

    quick = [c for c in suites(torch.device("cuda"), quick=True)["qlora"] if isinstance(c, QLoraLayerCase)]
    full = [c for c in suites(torch.device("cuda"), quick=False)["qlora"] if isinstance(c, QLoraLayerCase)]
    assert len(quick) == len(full) == 3
    assert not any(n.endswith("triton") for c in quick for n in c.impl_names)
    assert all("peft_fast triton" in c.impl_names and "peft_fast" in c.impl_names for c in full)
    assert all("peft_fast" in c.impl_names and "base" in c.impl_names for c in quick)
