"""The ops layer: dispatch rules and the torch reference against the LoRA formula of DESIGN.md §2."""

import os
import warnings

import pytest
import torch
from torch import nn

from peft_fast import ops
from peft_fast.ops import dispatch
from models import rel_err


def _term(k, n, r, p=0.0, scaling=0.5, bias=False):
    a, b = nn.Linear(k, r, bias=False), nn.Linear(r, n, bias=bias)
    nn.init.normal_(b.weight)
    return ops.LoraTerm(a, b, scaling, nn.Dropout(p) if p else nn.Identity())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_matches_formula_with_several_terms(dtype):
    x = torch.randn(5, 3, 13, dtype=dtype)
    base = torch.randn(5, 3, 11, dtype=dtype)
    terms = [_term(13, 11, 4, bias=True), _term(13, 11, 1, scaling=2.0)]
    out = ops.lora_linear(x, base, terms)
    assert out.dtype == dtype
    xf = x.float()
    expected = base.float()
    for t in terms:
        bias = t.lora_B.bias if t.lora_B.bias is not None else 0
        expected = expected + t.scaling * (xf @ t.lora_A.weight.T @ t.lora_B.weight.T + bias)
    assert rel_err(out.float(), expected) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_dropout_in_training_uses_one_mask_and_rescales():
    torch.manual_seed(0)
    x = torch.randn(4000, 8)
    term = _term(8, 8, 8, p=0.25, scaling=1.0)
    with torch.no_grad():
        term.lora_A.weight.copy_(torch.eye(8))
        term.lora_B.weight.copy_(torch.eye(8))
    delta = ops.lora_linear(x, torch.zeros(4000, 8), [term])
    kept = delta != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    assert torch.allclose(delta[kept], x[kept] / 0.75)
    term.dropout.eval()
    assert torch.equal(ops.lora_linear(x, torch.zeros(4000, 8), [term]), x)


def test_mixed_batch_rows_get_their_own_adapter():
    """Every row of a group gets its adapter (an op that served only each group's first row passed when groups had
    one row), rows of no group keep the base output."""
    x, base = torch.randn(6, 6), torch.randn(6, 5)
    t1, t2 = _term(6, 5, 2), _term(6, 5, 3)
    out = ops.lora_linear_mixed_batch(x, base.clone(), [([0, 2, 5], t1), ([3, 4], t2)])
    for rows, term in (([0, 2, 5], t1), ([3, 4], t2)):
        for i in rows:
            assert torch.allclose(out[i], ops.lora_linear(x[i:i + 1], base[i:i + 1], [term])[0]), i
    assert torch.equal(out[1], base[1])


def test_use_backend_forces_restores_and_refuses_nonsense():
    assert dispatch.forced_backend() is None  # the suite runs with PEFT_FAST_BACKEND unset
    with ops.use_backend("torch"):
        assert dispatch.choose("lora_linear", None, None, []) == "torch"
        with ops.use_backend("triton"):  # innermost wins; an op without a triton implementation stays on torch
            assert dispatch.forced_backend() == "triton"
            assert dispatch.choose("lora_embedding", None, None, [], None) == "torch"
        assert dispatch.forced_backend() == "torch"
        with pytest.raises(RuntimeError, match="boom"):
            with ops.use_backend("cuda"):
                raise RuntimeError("boom")
        assert dispatch.forced_backend() == "torch"  # restored although the block raised
    assert dispatch.forced_backend() is None
    with pytest.raises(ValueError, match="PEFT_FAST_BACKEND"):
        with ops.use_backend("nonsense"):
            pass
    assert dispatch.forced_backend() is None


def test_environment_variable_is_read_once_at_import(tmp_path):
    """PEFT_FAST_BACKEND sets the process default when peft_fast is imported; a wrong value fails the first
    dispatch with a message naming the variable (importing peft_fast still works)."""
    import subprocess
    import sys

    code = ("import os, peft_fast.ops as o; print(o.forced_backend()); os.environ['PEFT_FAST_BACKEND'] = 'torch'; "
            "print(o.forced_backend())")
    env = dict(os.environ, PEFT_FAST_BACKEND="triton")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["triton", "triton"]
    env["PEFT_FAST_BACKEND"] = "fastest"
    out = subprocess.run([sys.executable, "-c", "import peft_fast.ops as o; o.forced_backend()"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "PEFT_FAST_BACKEND='fastest'" in out.stderr


@pytest.mark.parametrize("m,k,n,r,fused", [
    (8192, 4096, 4096, 16, True),   # measured (H100, 2026-12-06): kernels 1.37x the bare layer, ATen route 1.65x
    (8192, 4096, 14336, 16, True),  # 1.20x vs 1.22x
    (2048, 2048, 8192, 16, True),   # 1.71x vs 2.51x; the 1B Llama step's largest projection
    (16, 4096, 4096, 16, True),     # decode: 180 vs 303 µs
    (2048, 2048, 8192, 8, True),    # ranks below 16 cost the kernels what rank 16 does (padded)
    (8192, 4096, 4096, 64, False),  # GPU time 1.59x vs 1.26x: the ATen route where the GPU bounds the step
    (4096, 2048, 2048, 64, False),  # rank 64 at 4096 rows: past the size rule
    (2048, 2048, 2048, 64, True),   # within it
])
def test_fused_kernels_follow_the_measured_size_rule(m, k, n, r, fused):
    assert dispatch.CUDA_KERNELS == "auto"  # the suite runs with PEFT_FAST_CUDA_KERNELS unset
    assert dispatch.fused_kernels(m, k, n, r) is fused
    with ops.use_cuda_kernels("on"):
        assert dispatch.fused_kernels(m, k, n, r)
    with ops.use_cuda_kernels(False):
        assert not dispatch.fused_kernels(m, k, n, r)


def test_use_cuda_kernels_restores_the_mode_and_refuses_nonsense():
    with pytest.raises(RuntimeError, match="boom"):
        with ops.use_cuda_kernels("off"):
            assert dispatch.CUDA_KERNELS == "off"
            raise RuntimeError("boom")
    assert dispatch.CUDA_KERNELS == "auto"
    for value, mode in (("1", "on"), ("0", "off"), ("TRUE", "on"), (True, "on"), (" Auto ", "auto")):
        with ops.use_cuda_kernels(value):
            assert dispatch.CUDA_KERNELS == mode
    with pytest.raises(ValueError, match="PEFT_FAST_CUDA_KERNELS"):
        with ops.use_cuda_kernels("fast"):
            pass
    assert dispatch.CUDA_KERNELS == "auto"


def test_the_cuda_path_hands_the_rule_s_decision_to_the_node(force_backend, monkeypatch):
    """The C++ node gets `kernels` from dispatch.fused_kernels, for the call's own M, K, N and total rank."""
    from peft_fast.ops import cuda_lora
    import peft_fast as pf

    seen = []

    def node(x, weight, bias, a, b, scale, p, kn, dtype, kernels):
        seen.append(kernels)
        return torch.zeros(*x.shape[:-1], weight.shape[0], dtype=dtype)

    monkeypatch.setattr(cuda_lora, "CPP_LORA_LINEAR", node)
    monkeypatch.setattr(dispatch, "FUSED_MAX_WORK", 64 * (24 + 40) * 32)  # 64 rows of this layer, no more
    layer = pf.get_peft_model(nn.Sequential(nn.Linear(24, 40)), pf.LoraConfig(r=32, target_modules=["0"]))
    force_backend("cuda")
    layer(torch.randn(4, 16, 24))
    layer(torch.randn(5, 16, 24))
    with ops.use_cuda_kernels("off"):
        layer(torch.randn(2, 16, 24))
    assert seen == [True, False, False]


def test_cuda_kernels_variable_is_read_once_and_a_typo_only_warns():
    import subprocess
    import sys

    code = "import os, peft_fast.ops.dispatch as d; os.environ['PEFT_FAST_CUDA_KERNELS'] = '1'; print(d.CUDA_KERNELS)"
    env = dict(os.environ, PEFT_FAST_CUDA_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["off"]
    env["PEFT_FAST_CUDA_KERNELS"] = "yes please"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["auto"] and "PEFT_FAST_CUDA_KERNELS" in out.stderr


def test_use_backend_is_per_thread():
    import threading

    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with ops.use_backend(name):
            barrier.wait()  # both threads are inside their blocks at once
            seen[name] = dispatch.forced_backend()
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("torch", "cuda")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"torch": "torch", "cuda": "cuda"}
    assert dispatch.forced_backend() is None


def test_dispatch_follows_the_rule_table_and_falls_back_with_one_warning(force_backend, monkeypatch):
    calls = []
    dispatch.register("_probe_op", "torch")(lambda v: calls.append("torch") or "torch")
    dispatch.register("_probe_op", "triton", supports=lambda v: None if v > 0 else "needs v > 0")(
        lambda v: calls.append("triton") or "triton"
    )
    try:
        assert dispatch.call("_probe_op", 1) == "torch"  # not in the rule table: auto keeps torch
        monkeypatch.setitem(dispatch.AUTO_RULES, "_probe_op", (("triton", lambda v: None if v < 5 else
                                                                dispatch.Skip("too large")),))
        assert dispatch.call("_probe_op", 1) == "triton"
        assert dispatch.call("_probe_op", 7) == "torch"  # the rule's condition says no
        with pytest.warns(UserWarning, match="needs v > 0"):
            assert dispatch.call("_probe_op", 0) == "torch"
        force_backend("triton")
        assert dispatch.call("_probe_op", 7) == "triton"  # forced: the rule table does not apply
        force_backend("torch")
        assert dispatch.call("_probe_op", 1) == "torch"
    finally:
        dispatch._REGISTRY.pop("_probe_op")


def test_out_of_memory_in_a_backend_propagates_and_disables_nothing(monkeypatch):
    """A backend call that runs out of GPU memory is not a kernel that cannot run here: no retry on torch (which
    might just fit and then take the backend off the op for good), the error reaches the caller."""
    calls = []

    def oom(v):
        calls.append("triton")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    dispatch.register("_probe_op", "torch")(lambda v: calls.append("torch") or v)
    dispatch.register("_probe_op", "triton")(oom)
    monkeypatch.setitem(dispatch.AUTO_RULES, "_probe_op", (("triton", None),))
    monkeypatch.setattr(dispatch, "_FAILED", set())
    try:
        with pytest.raises(torch.OutOfMemoryError):
            dispatch.call("_probe_op", 1)
        assert calls == ["triton"] and dispatch._FAILED == set()
    finally:
        dispatch._REGISTRY.pop("_probe_op")


def test_a_kernel_failing_at_run_time_falls_back_to_torch_once_with_one_warning(force_backend, monkeypatch):
    """Auto mode: a backend that raises (a GPU it cannot run on) is retried on torch and then left alone for the
    op, with one warning; a call that torch refuses too is the caller's error and disables nothing."""
    calls = []

    def broken(v):
        calls.append("triton")
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED on this GPU\nsecond line")

    def reference(v):
        calls.append("torch")
        if v < 0:
            raise ValueError("v must be >= 0")
        return v * 2

    dispatch.register("_probe_op", "torch")(reference)
    dispatch.register("_probe_op", "triton")(broken)
    monkeypatch.setitem(dispatch.AUTO_RULES, "_probe_op", (("triton", None),))
    monkeypatch.setattr(dispatch, "_FAILED", set())
    monkeypatch.setattr(dispatch, "_warned", set())
    try:
        with pytest.raises(ValueError, match="v must be"):  # torch refuses too: its error, nothing disabled
            dispatch.call("_probe_op", -1)
        assert dispatch._FAILED == set() and calls == ["triton", "torch"]
        with pytest.warns(UserWarning, match="_probe_op runs on torch instead of triton: it failed here "
                                             r"\(RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED on this GPU\)") as seen:
            assert dispatch.call("_probe_op", 3) == 6
        assert len(seen) == 1 and "second line" not in str(seen[0].message)
        calls.clear()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning, and the broken backend is not tried again
            assert dispatch.call("_probe_op", 4) == 8
        assert calls == ["torch"] and dispatch.choose("_probe_op", 4) == "torch"
        force_backend("triton")  # forced: the kernel's own error reaches the developer
        with pytest.raises(RuntimeError, match="CUBLAS_STATUS_NOT_SUPPORTED"):
            dispatch.call("_probe_op", 4)
    finally:
        dispatch._REGISTRY.pop("_probe_op")


def test_a_gpu_below_sm80_gets_one_warning_and_no_fused_kernels(monkeypatch):
    """On a T4 (7.5) the fused kernels are off (the C++ side refuses such GPUs too), with one warning naming the GPU;
    an A100-class GPU (8.0) takes them."""
    monkeypatch.setattr(dispatch, "_CAPABLE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5) if index == 0 else (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4" if index == 0 else "A100")
    with pytest.warns(UserWarning, match=r"need compute capability 8.0.*Tesla T4 has 7.5"):
        assert dispatch.kernels_run_on(torch.device("cuda", 0)) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked once per device: no second warning
        assert dispatch.kernels_run_on(torch.device("cuda", 0)) is False
        assert dispatch.kernels_run_on(torch.device("cuda", 1)) is True


def test_one_gemm_rows_setting_and_its_noop_when_off_or_on_the_cpu(monkeypatch):
    """PEFT_FAST_ONE_GEMM_ROWS: unset or empty → the default, "off" → off (None), a count → that count, a bad value
    warns and keeps the default; ops/one_gemm.ensure registers nothing while off, nor for a CPU tensor when on."""
    from peft_fast.ops import one_gemm

    assert dispatch._rows_setting(None, 1024) == 1024 and dispatch._rows_setting(" ", 1024) == 1024
    assert dispatch._rows_setting("off", 1024) is None and dispatch._rows_setting(" OFF ") is None
    assert dispatch._rows_setting("2048", 1024) == 2048 and dispatch._rows_setting("0") == 0
    for bad in ("-1", "many"):
        with pytest.warns(UserWarning, match="PEFT_FAST_ONE_GEMM_ROWS"):
            assert dispatch._rows_setting(bad, 1024) == 1024
    x = torch.randn(4, 8)
    monkeypatch.setattr(dispatch, "ONE_GEMM_MIN_ROWS", None)
    one_gemm.ensure(x, 16, False, torch.bfloat16)
    monkeypatch.setattr(dispatch, "ONE_GEMM_MIN_ROWS", 0)
    one_gemm.ensure(x, 16, False, torch.bfloat16)
    assert not one_gemm._done and not one_gemm._failed


def _read_at_import(variable: str, attribute: str, values) -> dict:
    """dispatch.<attribute> as a fresh `import peft_fast` reads it with the environment variable set to each of
    `values` (None: unset): {value: (the printed attribute, the child's stderr)}."""
    import subprocess
    import sys

    code = f"from peft_fast.ops import dispatch; print(dispatch.{attribute})"
    seen = {}
    for value in values:
        env = {k: v for k, v in os.environ.items() if k != variable}
        if value is not None:
            env[variable] = value
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        seen[value] = (run.stdout.strip().splitlines()[-1], run.stderr)
    return seen


def test_one_gemm_route_registers_ranks_up_to_its_max_and_producers_at_16_at_most(monkeypatch):
    """ops/one_gemm.ensure on a Hopper GPU (faked: nothing compiles here): rank ≤ ONE_GEMM_MAX_RANK registers the
    kernels reading h, and the producing ones too only at rank ≤ 16 (above, they spill registers); a rank above the
    max registers nothing, and the node keeps its default route. PEFT_FAST_ONE_GEMM_MAX_RANK: unset → 16, off → 0,
    above 64 → 64."""
    from types import SimpleNamespace

    from peft_fast.kernels import lora_gemm_tma
    from peft_fast.ops import one_gemm

    calls = []
    fake_c = SimpleNamespace(lora_kernels_register_tma=None, lora_kernels_set_tma_rows=lambda rows: None,
                             lora_kernels_set_tma_produce_rows=lambda rows: None)
    monkeypatch.setattr(one_gemm, "_C", fake_c)
    monkeypatch.setattr(one_gemm, "_done", set())
    monkeypatch.setattr(one_gemm, "_failed", False)
    monkeypatch.setattr(dispatch, "ONE_GEMM_MIN_ROWS", 1024)
    monkeypatch.setattr(dispatch, "ONE_GEMM_PRODUCE_MIN_ROWS", 4096)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(lora_gemm_tma, "device_shared_limit", lambda device: lora_gemm_tma.HOPPER_SHARED_BYTES)
    monkeypatch.setattr(lora_gemm_tma, "register_for_node",
                        lambda ext, device, dtype, ranks, kn, plain, produce_adapters: calls.append(
                            (ranks, plain, produce_adapters)))
    x = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), get_device=lambda: 0)

    def registered(rank, max_rank):
        calls.clear()
        monkeypatch.setattr(dispatch, "ONE_GEMM_MAX_RANK", max_rank)
        one_gemm.ensure(x, rank, False, torch.bfloat16)
        return calls[:]

    assert registered(16, 16) == [((16,), True, (torch.float32,))]
    assert registered(64, 16) == []
    assert registered(40, 64) == [((40,), True, ())]
    assert registered(17, 0) == []
    assert not one_gemm._failed
    seen = _read_at_import("PEFT_FAST_ONE_GEMM_MAX_RANK", "ONE_GEMM_MAX_RANK", (None, "32", "off", "128"))
    assert {value: printed for value, (printed, _) in seen.items()} == {None: "16", "32": "32", "off": "0", "128": "64"}


def test_one_gemm_produce_rows_setting():
    """PEFT_FAST_ONE_GEMM_PRODUCE (read once at import): unset → 4096 rows (the measured rule), a count → that count,
    "off" → off (None), a bad value → a warning and the default."""
    seen = _read_at_import("PEFT_FAST_ONE_GEMM_PRODUCE", "ONE_GEMM_PRODUCE_MIN_ROWS", (None, "8192", "off", "many"))
    assert "PEFT_FAST_ONE_GEMM_PRODUCE='many' is not a non-negative integer" in seen["many"][1]
    assert {value: printed for value, (printed, _) in seen.items()} == {None: "4096", "8192": "8192", "off": "None",
                                                                        "many": "4096"}


def test_decode_kernel_switch_setting(monkeypatch):
    """PEFT_FAST_DECODE_KERNEL: unset or empty → None (the extension's default stays), on/1/true → True, off/0/false →
    False, anything else → a warning and None."""
    for value, want in ((None, None), ("", None), (" ON ", True), ("1", True), ("true", True), ("off", False),
                        ("0", False), ("False", False)):
        if value is None:
            monkeypatch.delenv("PEFT_FAST_DECODE_KERNEL", raising=False)
        else:
            monkeypatch.setenv("PEFT_FAST_DECODE_KERNEL", value)
        assert dispatch._switch_setting("PEFT_FAST_DECODE_KERNEL") is want, value
    monkeypatch.setenv("PEFT_FAST_DECODE_KERNEL", "maybe")
    with pytest.warns(UserWarning, match="PEFT_FAST_DECODE_KERNEL='maybe' is not on or off"):
        assert dispatch._switch_setting("PEFT_FAST_DECODE_KERNEL") is None
