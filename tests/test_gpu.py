"""On a CUDA GPU (`pytest -m gpu` on the device machine): the same LoRA models match HF PEFT there too."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import inputs_for, output_tensor, randomize_adapters, rel_err, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("builder,name,cfg", [
    (tiny_llama, "llama", dict(r=8, target_modules="all-linear", lora_dropout=0.0)),
    (tiny_llama, "llama", dict(r=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
    (tiny_gpt2, "gpt2", dict(r=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
def test_cuda_forward_backward_match_peft(builder, name, cfg, dtype, backend, force_backend):
    force_backend(backend)
    torch.manual_seed(0)
    base = builder().to("cuda", dtype)
    ref_model = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(**cfg))
    pf_model = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(**cfg))
    randomize_adapters(ref_model)
    pf_model.load_state_dict(ref_model.state_dict())
    x = {k: v.cuda() for k, v in inputs_for(name, batch=4, seq=16).items()}
    outs = []
    for model in (ref_model, pf_model):
        model.eval()  # no base-model dropout, so both see the same function
        y = output_tensor(model(**x))
        y.float().square().mean().backward()
        outs.append((y, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (y_ref, g_ref), (y_pf, g_pf) = outs
    # bf16: the fused paths compute the low-rank term in bf16, HF PEFT in its fp32 adapters' dtype
    tol = 1e-5 if dtype == torch.float32 else (1e-2 if backend == "torch" else 2e-2)
    assert rel_err(y_pf, y_ref) < tol
    assert g_ref.keys() == g_pf.keys()
    for key in g_ref:
        assert rel_err(g_pf[key], g_ref[key]) < tol * 10, key
    with torch.no_grad():
        pf_model.base_model.merge_adapter()
        assert rel_err(output_tensor(pf_model(**x)), y_ref) < (1e-4 if dtype == torch.float32 else 3e-2)


def test_dora_ephemeral_gpu_offload_matches_peft_and_keeps_the_magnitude_on_the_cpu():
    """LoraRuntimeConfig(ephemeral_gpu_offload=True) on a model kept on the CPU: DoRA's weight norm is computed on
    the GPU and its magnitude put back on the CPU, as PEFT does; the magnitudes match PEFT's (same seed) and the
    CPU-computed ones to fp32 rounding."""
    torch.manual_seed(0)
    base = tiny_llama()
    cfg = dict(r=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights="gaussian")
    models = []
    for lib, runtime in ((pf, True), (pf, False), (ref, True)):
        torch.manual_seed(1)
        config = lib.LoraConfig(**cfg, runtime_config=lib.LoraRuntimeConfig(ephemeral_gpu_offload=runtime))
        models.append(lib.get_peft_model(copy.deepcopy(base), config))
    ours, on_cpu, theirs = ({k: v for k, v in m.state_dict().items() if "magnitude" in k} for m in models)
    assert ours and list(ours) == list(theirs)
    for key, value in ours.items():
        assert value.device.type == "cpu" and theirs[key].device.type == "cpu", key
        assert rel_err(value, theirs[key]) < 1e-5 and rel_err(value, on_cpu[key]) < 1e-5, key
