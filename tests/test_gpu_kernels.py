"""Triton LoRA kernels on a CUDA GPU at real sizes (`pytest -m gpu` on the device machine; skipped elsewhere).

Same checks as test_kernels_lora.py, with bf16 dots on the tensor cores, poisoned outputs, a seeded random-shape
sweep, and torch.compile of a model whose layers use the fused op (fullgraph: no graph break).
"""

import copy
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import peft_fast as pf
from peft_fast.kernels import lora_linear as K
from peft_fast.ops import dispatch
from models import rel_err, tiny_llama

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def _check_gemm(m, k, n, r, dtype, p=0.0, bias=True):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    h = torch.randn(m, r, device="cuda", dtype=dtype)
    b = torch.randn(n, r, device="cuda", dtype=dtype)
    bias_t = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    out = K.gemm_lora(x, w.t(), bias_t, h, b.t(), 0.5, 0.0, 0, dtype, out=_poisoned((m, n), dtype))
    ref = x.double() @ w.double().T + 0.5 * h.double() @ b.double().T
    if bias:
        ref = ref + bias_t.double()
    assert not out.isnan().any(), (m, k, n, r)
    assert rel_err(out, ref) < TOL[dtype], (m, k, n, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,r", [(8192, 4096, 4096, 16), (16, 4096, 4096, 16), (1000, 4096, 14336, 64),
                                     (333, 2048, 5632, 8)])
def test_kernels_at_real_sizes(dtype, m, k, n, r):
    if dtype == torch.float32 and m * n * k > 2**36:
        pytest.skip("IEEE fp32 at this size is slow and adds nothing over the smaller fp32 cases")
    _check_gemm(m, k, n, r, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    a = torch.randn(r, k, device="cuda", dtype=torch.float32)
    h = K.shrink(x, a, 2.0, 0.0, 0, out=_poisoned((m, r), dtype))
    assert rel_err(h, 2.0 * x.double() @ a.to(dtype).double().T) < TOL[dtype]
    dh = torch.randn(m, r, device="cuda", dtype=dtype)
    assert rel_err(K.grad_a(dh, x, 0.0, 0), dh.double().T @ x.double()) < TOL[dtype]


def test_random_shape_sweep_never_wrong():
    rng = random.Random(0)
    for _ in range(12):  # each new shape class compiles kernels: a few cover the masks' edge cases
        m, k, n = rng.randint(1, 700), rng.randint(1, 600), rng.randint(1, 600)
        r = rng.choice([1, 2, 7, 16, 33, 64, 128])
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        _check_gemm(m, k, n, r, dtype, bias=rng.random() < 0.5)


def _layer(k, n, r, dropout, dtype):
    model = nn.Sequential(nn.Linear(k, n))
    model = pf.get_peft_model(model, pf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=dropout))
    layer = model.base_model.model[0].cuda().to(dtype)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,r", [(4096, 4096, 4096, 16), (777, 1024, 3000, 64)])
def test_layer_fwd_bwd_matches_torch_backend(dtype, m, k, n, r, force_backend):
    layer = _layer(k, n, r, 0.0, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    results = {}
    for backend in ("torch", "triton"):
        force_backend(backend)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(dy)
        results[backend] = (y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone(),
                            layer.lora_B["default"].weight.grad.clone())
        layer.zero_grad(set_to_none=True)
    for got, ref in zip(results["triton"], results["torch"]):
        assert rel_err(got, ref) < 3 * TOL[dtype]


def test_dropout_keep_rate_and_mask_consistency_on_gpu():
    m, k, p = 2048, 4096, 0.1
    ones = torch.ones(m, k, device="cuda")
    eye = torch.eye(k, device="cuda")[:64]  # first 64 columns of the mask
    mask = K.shrink(ones, eye, 1.0, p, 99) != 0
    keep = mask.float().mean().item()
    assert abs(keep - 0.9) < 5 * (0.09 / mask.numel()) ** 0.5
    dx = K.gemm_lora(torch.zeros(m, 8, device="cuda"), torch.zeros(8, k, device="cuda"), None,
                     torch.ones(m, 64, device="cuda"), eye[:, :k], 1.0, p, 99, torch.float32)
    assert torch.equal((dx[:, :64] != 0), mask)


def test_torch_compile_of_a_lora_model_has_no_graph_break(force_backend):
    force_backend("triton")
    base = tiny_llama().cuda().to(torch.bfloat16)
    model = pf.get_peft_model(base, pf.LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.1))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    compiled_layer = torch.compile(copy.deepcopy(layer).eval(), fullgraph=True)  # raises on a graph break
    x = torch.randn(2, 9, layer.in_features, device="cuda", dtype=torch.bfloat16)
    assert rel_err(compiled_layer(x), layer.eval()(x)) < 1e-2
    ids = torch.randint(0, base.config.vocab_size, (2, 16), device="cuda")
    model.train()
    compiled = torch.compile(model)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert rel_err(compiled(input_ids=ids).logits, model(input_ids=ids).logits) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(8192, 4096, 4096), (16, 4096, 4096), (333, 2048, 5632)])
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_4bit_dequant_gemm_at_real_sizes(dtype, m, k, n, quant_type, nested):
    from peft_fast import quantization as Q

    w = torch.randn(n, k, device="cuda") / k**0.5
    data, state = Q.quantize_4bit(w.to(dtype), blocksize=64, quant_type=quant_type, compress_statistics=nested)
    weight = K.Packed4bit(data.reshape(-1), state.code, Q.block_absmax(state), 64, n, k)
    w_deq = Q.dequantize_4bit(data, state).double()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    h = torch.randn(m, 16, device="cuda", dtype=dtype)
    b = torch.randn(n, 16, device="cuda", dtype=dtype)
    out = K.gemm_lora(x, weight, None, h, b.t(), 0.5, 0.0, 0, dtype, out=_poisoned((m, n), dtype))
    assert not out.isnan().any()
    assert rel_err(out, x.double() @ w_deq.T + 0.5 * h.double() @ b.double().T) < TOL[dtype]
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    dx = K.gemm_lora(dy, weight.t(), None, None, None, 0.0, 0.0, 0, dtype, out=_poisoned((m, k), dtype))
    assert rel_err(dx, dy.double() @ w_deq) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [False, True])
def test_cuda_qgemv_matches_reference(m, dtype, nested):
    _c = pytest.importorskip("peft_fast._C", reason="the CUDA extension is not built")
    from peft_fast import quantization as Q

    n, k, r = 4096, 4096 + 64, 16
    w = torch.randn(n, k, device="cuda") / k**0.5
    data, state = Q.quantize_4bit(w.to(dtype), blocksize=64, compress_statistics=nested)
    absmax = Q.block_absmax(state).contiguous()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    hs = torch.randn(m, r, device="cuda", dtype=dtype)
    lora_b = torch.randn(n, r, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    y = _c.qgemv_lora(x, data.reshape(-1), state.code, absmax, 64, n, k, bias, hs, lora_b)
    w_deq = Q.dequantize_4bit(data, state, torch.float32).double()
    ref = x.double() @ w_deq.T + bias.double() + hs.double() @ lora_b.double().T
    assert not y.isnan().any()
    assert rel_err(y, ref) < TOL[dtype]


def test_cuda_qgemv_bad_arguments_raise():
    """Every bad argument of peft_fast._C.qgemv_lora raises ValueError naming it; none crashes the interpreter
    (the calls run in a child process, so a crash fails this test and says which call it was)."""
    pytest.importorskip("peft_fast._C", reason="the CUDA extension is not built")
    child = os.path.join(os.path.dirname(__file__), "qgemv_bad_args_child.py")
    proc = subprocess.run([sys.executable, child], capture_output=True, text=True, timeout=300)
    outcomes = dict(line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line)
    assert "cases" in outcomes and "good" in outcomes, proc.stderr[-2000:]
    cases = outcomes.pop("cases").split("|")
    assert len(cases) == 26
    for name in cases:
        assert name in outcomes, f"the call '{name}' crashed the interpreter (exit {proc.returncode}): " \
                                 f"{proc.stderr[-1500:]}"
        kind, message = outcomes[name].split("\t", 1)
        assert kind == "ValueError" and message.startswith("qgemv_lora: "), (name, kind, message)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_extension_links_torchs_libstdcxx_not_a_private_copy():
    """A private libstdc++ inside _C.so (how the H200 build first came out) segfaults on the first C++ error
    message; the extension must leave the C++ runtime to the shared library torch itself uses."""
    ext = pytest.importorskip("peft_fast._C", reason="the CUDA extension is not built")
    if shutil.which("nm") is None:
        pytest.skip("nm not installed")
    defined = subprocess.run(["nm", "-D", "--defined-only", ext.__file__], capture_output=True, text=True).stdout
    private = [line.split()[-1] for line in defined.splitlines()
               if line.split()[-1] in ("__gxx_personality_v0", "__cxa_throw", "_ZNSo9_M_insertIlEERSoT_")]
    assert not private, f"{ext.__file__} defines C++ runtime symbols itself: {private}"


def test_cpp_lora_node_errors_raise_instead_of_crashing():
    """A shape error inside the C++ autograd node (an ATen exception thrown through _C) reaches Python."""
    ext = pytest.importorskip("peft_fast._C", reason="the CUDA extension is not built")
    code = ("import torch\nfrom peft_fast import _C\nx = torch.randn(4, 8, device='cuda')\n"
            "w = torch.randn(6, 9, device='cuda')\na = torch.randn(2, 8, device='cuda')\n"
            "b = torch.randn(6, 2, device='cuda')\ntry:\n    _C.lora_linear(x, w, None, a, b, 1.0, 0.0, False, torch.float32)\n"
            "except RuntimeError as e:\n    print('raised', str(e).splitlines()[0])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "raised" in proc.stdout, (ext.__file__, proc.returncode, proc.stderr[-1500:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_dequantize_4bit_bit_identical_on_gpu(dtype, force_backend):
    from peft_fast import ops
    from peft_fast import quantization as Q

    w = torch.randn(4096, 4099, device="cuda").to(dtype)  # odd element count
    data, state = Q.quantize_4bit(w, blocksize=64, compress_statistics=True)
    force_backend("triton")
    assert torch.equal(ops.dequantize_4bit(data, state), Q.dequantize_4bit(data, state))


@pytest.mark.parametrize("nested", [False, True])
def test_triton_quantize_4bit_bit_identical_on_gpu(nested, force_backend):
    from peft_fast import ops
    from peft_fast import quantization as Q

    w = torch.randn(4096, 4099, device="cuda", dtype=torch.bfloat16)
    force_backend("triton")
    packed, state = ops.quantize_4bit(w, 64, "nf4", nested)
    ref_packed, ref_state = Q.quantize_4bit(w, blocksize=64, compress_statistics=nested)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
