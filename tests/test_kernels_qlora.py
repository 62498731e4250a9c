"""The 4-bit dequant-GEMM (QLoRA) Triton path in the interpreter, against dequantize-then-matmul.

References use peft_fast's own dequantization (bit-exact with bitsandbytes' reference semantics, see
test_quantization.py) rather than bitsandbytes' CPU kernels, which read wrong absmaxes on some shapes.
"""

import os

import pytest
import torch
from torch import nn

import peft_fast as pf
from peft_fast import quantization as Q
from peft_fast.kernels import lora_linear as K
from peft_fast.ops import dispatch
from models import quantize_linears, rel_err

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests (CPU tensors); test_gpu_kernels.py covers the GPU")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _packed(n, k, quant_type="nf4", blocksize=64, nested=False, dtype=torch.float32, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    data, state = Q.quantize_4bit(w.to(dtype), blocksize=blocksize, quant_type=quant_type,
                                  compress_statistics=nested)
    view = K.Packed4bit(data.reshape(-1), state.code, Q.block_absmax(state), blocksize, n, k)
    return view, Q.dequantize_4bit(data, state)


@pytest.mark.parametrize("quant_type,blocksize,nested", [("nf4", 64, False), ("fp4", 128, True), ("nf4", 256, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(29, 70), (40, 33)])
def test_dequant_gemm_forward_and_input_grad_shapes(quant_type, blocksize, nested, dtype, n, k):
    weight, w = _packed(n, k, quant_type, blocksize, nested, dtype)
    m, r = 11, 8
    x = torch.randn(m, k, dtype=dtype)
    h, b = torch.randn(m, r, dtype=dtype), torch.randn(n, r)
    out = K.gemm_lora(x, weight, None, h, b.t(), 0.5, 0.0, 0, dtype, out=torch.full((m, n), float("nan"), dtype=dtype))
    ref = x.float() @ w.float().T + 0.5 * h.float() @ b.to(dtype).float().T
    assert not out.isnan().any() and rel_err(out, ref) < TOL[dtype]
    dy = torch.randn(m, n, dtype=dtype)
    dx = K.gemm_lora(dy, weight.t(), None, None, None, 0.0, 0.0, 0, dtype)
    assert rel_err(dx, dy.float() @ w.float()) < TOL[dtype]
    with pytest.raises(ValueError, match="columns"):
        K.gemm_lora(torch.randn(m, k + 1, dtype=dtype), weight, None, None, None, 0.0, 0.0, 0, dtype)


def _qlora_layer(dropout, compute_dtype=torch.float32, nested=True, seed=0):
    torch.manual_seed(seed)
    model = quantize_linears(nn.Sequential(nn.Linear(64, 48)), bits=4, compute_dtype=compute_dtype,
                             compress_statistics=nested)
    model = pf.get_peft_model(model, pf.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], lora_dropout=dropout))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    return layer


def _reference(layer, x, mask=None, p=0.0):
    """x·deq(W)ᵀ + b + s·B A drop(x) in fp32 autograd, with the given dropout mask."""
    base = layer.get_base_layer()
    w = Q.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    xd = x if mask is None else x * mask / (1 - p)
    return x @ w.T + base.bias.float() + layer.scaling["default"] * (xd @ a.T) @ b.T


def test_layer_forward_backward_through_the_triton_path(force_backend):
    force_backend("triton")
    layer = _qlora_layer(0.0)
    terms = [layer._adapter_term("default")]
    x = torch.randn(2, 5, 64)
    assert dispatch.choose("quantized_linear_with_lora", x, layer.base_layer, terms) == "triton"
    xt = x.clone().requires_grad_(True)
    y = layer(xt)
    dy = torch.randn_like(y)
    y.backward(dy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    y_ref = _reference(layer, xr)
    y_ref.backward(dy)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(xt.grad, xr.grad) < 1e-5
    for name, param in layer.named_parameters():
        if name in grads:
            assert rel_err(grads[name], param.grad) < 1e-5, name
    with torch.no_grad():  # inference: one launch, the shrink inside the dequant GEMM
        assert rel_err(layer(x), y_ref) < 1e-5


def test_dropout_mask_is_the_regenerated_one(force_backend):
    force_backend("triton")
    p = 0.25
    layer = _qlora_layer(p)
    layer.train()
    x = torch.randn(9, 64, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    mask = (K.shrink(torch.ones(9, 64), torch.eye(64), 1.0, p, seed) != 0).float()
    xr = x.detach().clone().requires_grad_(True)
    y_ref = _reference(layer, xr, mask, p)
    assert rel_err(y, y_ref) < 1e-5
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert rel_err(x.grad, xr.grad) < 1e-5


def test_auto_mode_keeps_bitsandbytes_and_8bit_stays_on_torch(force_backend):
    layer = _qlora_layer(0.0)
    x = torch.randn(3, 64)
    terms = [layer._adapter_term("default")]
    force_backend("auto")
    assert dispatch.choose("quantized_linear_with_lora", x, layer.base_layer, terms) == "torch"
    force_backend("triton")
    torch.manual_seed(0)
    model8 = quantize_linears(nn.Sequential(nn.Linear(64, 48)), bits=8)
    model8 = pf.get_peft_model(model8, pf.LoraConfig(r=4, target_modules=["0"]))
    layer8 = model8.base_model.model[0]
    assert dispatch.choose("quantized_linear_with_lora", x, layer8.base_layer, terms) == "torch"


@pytest.mark.parametrize("quant_type,blocksize,nested", [("nf4", 64, False), ("fp4", 128, True), ("nf4", 256, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(29, 70), (5, 7)])  # odd element count: the last byte is half padding
def test_triton_dequantize_is_bit_identical_to_the_reference(quant_type, blocksize, nested, dtype, shape, force_backend):
    from peft_fast import ops

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    data, state = Q.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    force_backend("triton")
    assert dispatch.choose("dequantize_4bit", data, state) == "triton"
    out = ops.dequantize_4bit(data, state)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, Q.dequantize_4bit(data, state))
    assert torch.equal(ops.dequantize_4bit(data, state, torch.float32), Q.dequantize_4bit(data, state, torch.float32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape,dtype", [((29, 70), torch.float32), ((5, 7), torch.bfloat16), ((300, 33), torch.float16)])
def test_triton_quantize_is_bit_identical_to_the_reference(quant_type, blocksize, nested, shape, dtype, force_backend):
    from peft_fast import ops

    w = (torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 0.2).to(dtype)
    w.view(-1)[:2] = 0.0
    force_backend("triton")
    assert dispatch.choose("quantize_4bit", w, blocksize, quant_type, nested) == "triton"
    packed, state = ops.quantize_4bit(w, blocksize, quant_type, nested)
    ref_packed, ref_state = Q.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    assert packed.shape == ref_packed.shape and torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)
    if nested:
        assert torch.equal(state.offset, ref_state.offset) and torch.equal(state.state2.absmax, ref_state.state2.absmax)
    assert torch.equal(Q.dequantize_4bit(packed, state), Q.dequantize_4bit(ref_packed, ref_state))


def test_qlora_custom_op_passes_torch_library_opcheck():
    w = torch.randn(12, 64) * 0.1
    data, state = Q.quantize_4bit(w, blocksize=64, compress_statistics=True)
    x = torch.randn(5, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    args = (x, data.reshape(-1), state.code, Q.block_absmax(state), 12, 64, 64, None, a, b, 0.5, 0.0,
            torch.tensor(0, dtype=torch.int64))
    result = torch.library.opcheck(torch.ops.peft_fast.qlora_linear_fwd.default, args)
    assert set(result.values()) == {"SUCCESS"}, result
