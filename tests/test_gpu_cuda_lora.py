"""The cuda backend of linear_with_lora (what auto mode runs on a GPU) at real sizes: against the torch path in
bf16/fp16/fp32 with and without dropout (with dropout on the node's ATen route, which draws the same mask from torch's
generator), no device sync,
and torch.compile with no graph break and no recompiles across steps. `pytest -m gpu` on the device machine."""

import pytest
import torch
from torch import nn

import peft_fast as pf
from peft_fast import ops
from peft_fast.ops import dispatch
from models import assert_steps_never_synchronize, lora_fwd_bwd, lora_linear_layer, rel_err, tiny_llama

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("dtype,fp32_adapters", [(torch.bfloat16, True), (torch.bfloat16, False),
                                                 (torch.float16, False), (torch.float32, False)])
@pytest.mark.parametrize("m,k,n,r,p", [(8192, 4096, 4096, 16, 0.0), (4096, 4096, 4096, 16, 0.1),
                                       (777, 1024, 3000, 64, 0.05), (1, 4096, 4096, 16, 0.0)])
def test_matches_the_torch_path(dtype, fp32_adapters, m, k, n, r, p):
    if p > 0 and fp32_adapters:
        pytest.skip("the torch path drops an fp32 copy of x there: another dropout call, another mask to compare")
    layer = lora_linear_layer(k, n, r, p, dtype, fp32_adapters).train()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    # with dropout, the ATen route of the node: torch's dropout kernel draws the same mask for the same seed (the
    # fused kernels draw their own bits: tests/test_gpu_lora_kernels.py checks them against references with those)
    got = lora_fwd_bwd(layer, x, dy, "cuda", kernels=p == 0)
    ref = lora_fwd_bwd(layer, x, dy, "torch")
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, ref):
        assert a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 2 * TOL[dtype], (name, rel_err(a, b))
    # the adapter term is a clear share of y, so these numbers would fail if it were dropped or mis-scaled
    with torch.no_grad():
        base_only = layer.base_layer(x)
    assert rel_err(base_only, ref[0]) > 20 * TOL[dtype]


def test_inference_decode_sizes_match():
    layer = lora_linear_layer(4096, 4096, 16, 0.0, torch.bfloat16, fp32_adapters=True).eval()
    for m in (1, 16, 333):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            with ops.use_backend("cuda"):
                y = layer(x)
            with ops.use_backend("torch"):
                y_ref = layer(x)
        assert rel_err(y, y_ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_auto_mode_takes_the_flat_eager_path_with_the_same_numbers(p, bias, monkeypatch):
    """In auto mode a plain LoRA Linear on CUDA goes through cuda_lora.eager_layer_call (one flat function to the C++
    node); its forward and gradients equal the torch path's (dropout: the node's ATen route, torch's mask)."""
    from peft_fast.ops import cuda_lora

    # (with dropout: adapters in bf16, so that the torch path drops x itself, not an fp32 copy, and the node's ATen
    # route, whose mask is torch's: the same mask for the same seed)
    layer = lora_linear_layer(1024, 768, 16, p, torch.bfloat16, fp32_adapters=p == 0, bias=bias).train()
    taken = []
    real = cuda_lora.eager_node_args
    monkeypatch.setattr(cuda_lora, "eager_node_args", lambda *a: taken.append(real(*a)) or taken[-1])
    x = torch.randn(3, 100, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(3, 100, 768, device="cuda", dtype=torch.bfloat16)
    got = lora_fwd_bwd(layer, x, dy, "auto", kernels=p == 0)
    assert taken and all(args is not None for args in taken), "the flat path was not taken"
    ref = lora_fwd_bwd(layer, x, dy, "torch")
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, ref):
        assert torch.isfinite(a).all() and rel_err(a, b) < 2 * TOL[torch.bfloat16], (name, rel_err(a, b))


@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_forward_and_backward_never_synchronize(backend, p):
    layer = lora_linear_layer(1024, 768, 16, p, torch.bfloat16, fp32_adapters=True).train()
    x = torch.randn(2, 256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with ops.use_backend(backend):
        terms = [layer._adapter_term("default")]
        expected = "cuda" if backend == "auto" else backend
        assert dispatch.choose("linear_with_lora", x, layer.base_layer, terms) == expected
        assert_steps_never_synchronize(layer, x)


def test_torch_compile_no_graph_break_no_recompile_and_same_loss():
    torch.manual_seed(0)
    base = tiny_llama().cuda().to(torch.bfloat16)
    model = pf.get_peft_model(base, pf.LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 9, layer.in_features, device="cuda", dtype=torch.bfloat16)
    compiled_layer = torch.compile(layer, fullgraph=True)  # raises on a graph break
    assert rel_err(compiled_layer(x), layer(x)) < 1e-2
    ids = [torch.randint(0, base.config.vocab_size, (2, 16), device="cuda") for _ in range(3)]
    eager_losses = []
    for i in ids:
        loss = model(input_ids=i, labels=i, use_cache=False).loss  # training: no KV cache (per-layer state)
        loss.backward()
        eager_losses.append(loss.item())
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    losses = []
    for step, i in enumerate(ids):
        # steps 0 and 1 may compile (the first backward sees no .grad yet); step 2 must reuse their graphs
        torch._dynamo.config.error_on_recompile = step == 2
        try:
            loss = compiled(input_ids=i, labels=i, use_cache=False).loss
            loss.backward()
        finally:
            torch._dynamo.config.error_on_recompile = False
        losses.append(loss.item())
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, eager_losses)) < 1e-2, (losses, eager_losses)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys() and len(grads) > 10
    for name in grads:
        assert rel_err(grads[name], eager_grads[name]) < 3e-2, name
