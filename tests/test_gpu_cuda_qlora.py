"""QLoRA training on the GPU as auto mode runs it (ops/cuda_qlora.py: from QLORA_NODE_MIN_ROWS rows one C++ node for the
whole layer, W dequantized by csrc/dequant4.cu; below it bitsandbytes' base output + the LoRA term as one C++ node):
against the torch path (PEFT's arithmetic) at real sizes with and without dropout, the dequantization bit for bit
against bitsandbytes', no device sync, and a tiny Llama's training losses against HF PEFT + bitsandbytes.
`pytest -m gpu` on the device machine."""

import copy

import pytest
import torch
from torch import nn

import peft_fast as pf
from peft_fast import ops
from peft_fast.ops import cuda_qlora, dispatch
from models import assert_steps_never_synchronize, quantize_linears, rel_err, tiny_llama

pytestmark = pytest.mark.gpu
pytest.importorskip("bitsandbytes")


def _layer(k, n, r, p):
    base = quantize_linears(nn.Sequential(nn.Linear(k, n, bias=False)), compute_dtype=torch.bfloat16,
                            compress_statistics=True, device="cuda")
    model = pf.get_peft_model(base, pf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=p))
    layer = model.base_model.model[0].cuda()
    nn.init.normal_(layer.lora_B["default"].weight, std=0.5 / r**0.5)  # the low-rank term: a clear share of y
    return layer


def _fwd_bwd(layer, x, dy, backend):
    torch.manual_seed(0)
    with ops.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(dy)
    out = (y.detach().float(), xi.grad, layer.lora_A["default"].weight.grad.clone(),
           layer.lora_B["default"].weight.grad.clone())
    layer.zero_grad(set_to_none=True)
    return out


@pytest.mark.skipif(cuda_qlora.CPP_LORA_ADD is None, reason="peft_fast._C not built")
# (an fp32 input with dropout is left out: the node drops its bf16 cast, PEFT under autocast the fp32 tensor, and
# torch's dropout kernel draws a different mask per dtype — seen on the H200, 2026-12-02)
@pytest.mark.parametrize("p,x_dtype", [(0.0, torch.bfloat16), (0.1, torch.bfloat16), (0.0, torch.float32)],
                         ids=["bf16-input", "bf16-input-dropout", "fp32-input"])
def test_auto_runs_the_node_and_matches_the_torch_path(p, x_dtype):
    layer = _layer(4096, 4096, 16, p)
    layer.train()
    x = torch.randn(2, 1024, 4096, device="cuda", dtype=x_dtype)
    terms = [layer._adapter_term("default")]
    assert dispatch.choose("quantized_linear_with_lora", x, layer.base_layer, terms) == "cuda"
    dy = torch.randn(2, 1024, 4096, device="cuda", dtype=torch.bfloat16 if x_dtype == torch.bfloat16 else x_dtype)
    calls = []
    real = cuda_qlora.CPP_QLORA_LINEAR
    cuda_qlora.CPP_QLORA_LINEAR = lambda *a: calls.append(a[-2]) or real(*a)
    try:
        with ops.use_cuda_kernels(p == 0):  # (dropout: the ATen route, torch's mask; test_gpu_lora_kernels.py checks
            got = _fwd_bwd(layer, x, dy, "auto")  # the fused kernels' own bits)
    finally:
        cuda_qlora.CPP_QLORA_LINEAR = real
    assert calls == [p == 0]  # the whole layer as one node (dequantization kernel on where the kernels are)
    want = _fwd_bwd(layer, x, dy, "torch")
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want):
        assert a.dtype == b.dtype, name
        assert rel_err(a, b) < 2e-2, name


@pytest.mark.skipif(cuda_qlora.CPP_LORA_ADD is None, reason="peft_fast._C not built")
def test_qlora_forward_and_backward_never_synchronize():
    layer = _layer(1024, 768, 16, 0.1)
    layer.train()
    x = torch.randn(2, 256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert_steps_never_synchronize(layer, x)


# 2×256 rows: the flat node; QDoRA: the torch path, its norms of the weight dequantized on the GPU
@pytest.mark.parametrize("seq,use_dora", [(32, False), (256, False), (32, True)],
                         ids=["bnb-base-output", "qlora-node", "qdora"])
def test_tiny_llama_qlora_training_tracks_peft_and_bitsandbytes(seq, use_dora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = quantize_linears(tiny_llama().to(torch.bfloat16), compute_dtype=torch.bfloat16, compress_statistics=True,
                            device="cuda").cuda()
    ids = [torch.randint(0, base.config.vocab_size, (2, seq), device="cuda") for _ in range(4)]
    losses = {}
    for lib in (peft, pf):
        torch.manual_seed(1)
        config = lib.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, use_dora=use_dora)
        model = lib.get_peft_model(copy.deepcopy(base), config)
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.data.normal_(0, 0.02, generator=torch.Generator(device="cuda").manual_seed(len(name)))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses[lib.__name__] = []
        for batch in ids * 2:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[lib.__name__].append(loss.item())
    ours, theirs = torch.tensor(losses["peft_fast"]), torch.tensor(losses["peft"])
    assert (ours - theirs).abs().max() < 2e-2 * theirs.abs().max(), (ours, theirs)
    assert ours[4] != ours[0]  # the same batch after four updates: the adapters were trained


QUANT4 = {"nf4-bf16": (dict(quant_type="nf4"), torch.bfloat16),
          "nf4-double-bf16": (dict(quant_type="nf4", compress_statistics=True), torch.bfloat16),
          "fp4-double-fp16": (dict(quant_type="fp4", compress_statistics=True), torch.float16)}


@pytest.mark.skipif(cuda_qlora.CPP_QLORA_LINEAR is None, reason="peft_fast._C not built")
@pytest.mark.parametrize("quant", list(QUANT4), ids=list(QUANT4))
@pytest.mark.parametrize("k, n", [(1024, 768), (1000, 776)], ids=["whole-blocks", "ragged"])
def test_qlora_node_dequantizes_bit_for_bit_as_bitsandbytes(quant, k, n, monkeypatch):
    """y = I·Wᵀ with no LoRA term is W: csrc/dequant4.cu's W, bit for bit bitsandbytes' dequantize_4bit, and the
    node's ATen route gives the same. (1000×776: the kernel's last thread block is partly empty and the last
    absmax2 block short.)"""
    import bitsandbytes.functional as bnbf

    kwargs, dtype = QUANT4[quant]
    base = quantize_linears(nn.Sequential(nn.Linear(k, n, bias=False)), compute_dtype=dtype, device="cuda",
                            **kwargs)
    layer = pf.get_peft_model(base, pf.LoraConfig(r=8, target_modules=["0"])).base_model.model[0].cuda()
    x = torch.eye(k, device="cuda", dtype=dtype)  # ≥ 512 rows: the node's size
    args = cuda_qlora.qlora_node_args(layer, x)
    assert args is not None and args[-2]  # the dequantization kernel
    weight = layer.base_layer.weight
    want = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    assert torch.equal(cuda_qlora.CPP_QLORA_LINEAR(*args).t(), want)
    aten = args[:-2] + (False, False)
    assert torch.equal(cuda_qlora.CPP_QLORA_LINEAR(*aten).t(), want)


@pytest.mark.skipif(cuda_qlora.CPP_QLORA_LINEAR is None, reason="peft_fast._C not built")
def test_qlora_node_raises_on_bad_arguments():
    layer = _layer(512, 256, 8, 0.0)
    x = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    args = cuda_qlora.qlora_node_args(layer, x)
    assert args is not None
    with pytest.raises(RuntimeError, match="absmax must hold"):
        cuda_qlora.CPP_QLORA_LINEAR(*args[:6], args[6][:-1], *args[7:])
    with pytest.raises(RuntimeError, match="x has 511 features"):
        cuda_qlora.CPP_QLORA_LINEAR(x[:, :511], *args[1:])


@pytest.mark.skipif(cuda_qlora.CPP_QLORA_LINEAR is None, reason="peft_fast._C not built")
@pytest.mark.parametrize("one_launch", [False, True], ids=["qgemv", "decode-kernel"])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("quant", list(QUANT4), ids=list(QUANT4))
def test_decode_runs_the_4bit_gemm_and_matches_dequantize_then_matmul(quant, rows, one_launch):
    """An inference call of ≤ QLORA_GEMV_MAX_ROWS rows takes the node's decode route: csrc/qgemv.cu's tensor-core
    GEMM over the packed weight (no dequantized copy: the dequantization kernel does not run), then the LoRA term, or
    with lora_kernels_set_decode_kernel_4bit (Hopper) csrc/lora_decode.cu doing both in one launch; against x·Wᵀ with
    W from bitsandbytes' dequantize_4bit plus the term, with a bias and K not a multiple of 128 (the kernels' step).
    The nn.Linear layers' decode switch (on by default) does not move 4-bit layers."""
    import bitsandbytes.functional as bnbf

    from peft_fast.ops.extension import _C
    if one_launch and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the decode kernel needs clusters (sm_90+)")

    kwargs, dtype = QUANT4[quant]
    k, n, r = 4096 + 32, 3000, 16
    base = quantize_linears(nn.Sequential(nn.Linear(k, n)), compute_dtype=dtype, device="cuda", **kwargs)
    layer = pf.get_peft_model(base, pf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])).base_model.model[0]
    layer = layer.cuda()
    nn.init.normal_(layer.lora_B["default"].weight, std=0.5 / r**0.5)
    layer.eval()
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    before = _C.lora_kernels_decode_kernel_4bit()
    assert before is False  # (the default: untimed)
    try:
        _C.lora_kernels_set_decode_kernel_4bit(one_launch)
        assert _C.lora_kernels_decode_kernel_4bit() is one_launch
        with torch.no_grad():
            assert cuda_qlora.qlora_node_args(layer, x) is not None
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                y = layer(x)
                torch.cuda.synchronize()
    finally:
        _C.lora_kernels_set_decode_kernel_4bit(before)
    names = " ".join(e.name for e in prof.events())
    gemm, other = ("lora_decode_kernel", "qgemv_lora_kernel") if one_launch else ("qgemv_lora_kernel", "lora_decode")
    assert gemm in names and other not in names and "dequant4" not in names, names[:2000]
    if one_launch:
        assert "lora_rows_kernel" not in names, names[:2000]  # (the term inside it)
    weight = layer.base_layer.weight
    w = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype).double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    xd = x.double()
    ref = xd @ w.T + layer.base_layer.bias.double() + 2.0 * (xd @ a.T) @ b.T
    assert y.dtype == dtype and y.shape == (rows, n)
    assert rel_err(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    lora_only = 2.0 * (xd @ a.T) @ b.T
    assert rel_err(y - lora_only.to(dtype), ref - lora_only) < 2e-2  # the term is a clear share: not dropped


@pytest.mark.skipif(cuda_qlora.CPP_QLORA_LINEAR is None, reason="peft_fast._C not built")
def test_decode_gemm_matches_the_dequantizing_route_under_generate_like_calls():
    """Batched decode rows (3-D x, 4 sequences × 1 token): the GEMM with the fused low-rank kernels, and with the ATen
    low-rank route, give what the node's dequantize-then-GEMM route gives."""
    layer = _layer(2048, 2048, 16, 0.0).eval()
    x = torch.randn(4, 1, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        args = cuda_qlora.qlora_node_args(layer, x)
        y = cuda_qlora.CPP_QLORA_LINEAR(*args)
        aten_term = cuda_qlora.CPP_QLORA_LINEAR(*args[:-2], True, False)  # the GEMM, the LoRA term from ATen ops
        dense = cuda_qlora.CPP_QLORA_LINEAR(*args[:-2], False, False)  # no kernels: ATen dequantization and term
    assert y.shape == (4, 1, 2048)
    assert rel_err(y, dense) < 1e-2 and rel_err(aten_term, dense) < 1e-2


def test_replace_lora_weights_loftq_matches_peft_on_cuda(tmp_path):
    """HF PEFT's replace_lora_weights_loftq runs only on CUDA: the same 4-bit model, the same safetensors file, the
    same rank-r corrections (B·A; A and B each only up to the SVD's signs)."""
    import peft as ref

    torch.manual_seed(0)
    full = tiny_llama()
    full.save_pretrained(tmp_path)
    models = []
    for lib in (ref, pf):
        quantized = quantize_linears(copy.deepcopy(full), compute_dtype=torch.float32, device="cuda").cuda()
        model = lib.get_peft_model(quantized, lib.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
        lib.replace_lora_weights_loftq(model, str(tmp_path))
        models.append(model)
    layers = [[(n, m) for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))] for model in models]
    assert [n for n, _ in layers[0]] == [n for n, _ in layers[1]] and len(layers[0]) == 4
    for (name, theirs), (_, ours) in zip(*layers):
        products = [m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float() for m in (theirs, ours)]
        assert rel_err(products[1], products[0]) < 1e-4, name
