"""kernels/lora_gemm_tma.py (one TMA GEMM with the LoRA term inside it, an experiment the probe times) against its
fp32 torch reference: in Triton's interpreter on the CPU at small odd shapes, and on a Hopper GPU at real sizes in
bf16 (`-m gpu`)."""

import os

import pytest
import torch

from peft_fast.kernels import lora_gemm_tma as G

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
SMALL = {"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2, "num_stages": 2, "num_warps": 4}


def _operands(m, n, k, r, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
    return {"x": rand(m, k), "w": rand(n, k, scale=k**-0.5), "w_t": rand(k, n, scale=k**-0.5), "h": rand(m, r),
            "b": rand(n, r, scale=r**-0.5), "a": rand(r, n, scale=r**-0.5), "bias": rand(n),
            "keep": torch.randint(0, 256, (m, n // 8), dtype=torch.uint8, generator=g, device=device)}


def _check(got, want, dtype):
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < tol, err


CASES = [  # (what, kwargs builder): the forward form, dx with dropout bits, and the plain GEMM
    ("forward", lambda o: dict(x=o["x"], y=o["w"], y_kmajor=True, h=o["h"], low=o["b"], bias=o["bias"])),
    ("dx with dropout", lambda o: dict(x=o["x"], y=o["w_t"], y_kmajor=False, h=o["h"], low=o["a"], low_rmajor=True,
                                       keep=o["keep"], p=0.25)),
    ("dx", lambda o: dict(x=o["x"], y=o["w_t"], y_kmajor=False, h=o["h"], low=o["a"], low_rmajor=True)),
    ("plain", lambda o: dict(x=o["x"], y=o["w"], y_kmajor=True)),
]


@pytest.mark.skipif(not INTERPRETER, reason="interpreter tests (CPU tensors); the gpu-marked test covers the GPU")
@pytest.mark.parametrize("what,build", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("m,n,k,r", [(40, 48, 40, 16), (33, 24, 56, 8)])
def test_lora_gemm_matches_reference_in_the_interpreter(what, build, m, n, k, r):
    args = build(_operands(m, n, k, r, torch.float32, "cpu"))
    _check(G.lora_gemm(**args, config=SMALL), G.reference(**args), torch.float32)


@pytest.mark.skipif(not INTERPRETER, reason="interpreter tests")
def test_lora_gemm_refuses_mismatched_operands():
    o = _operands(40, 48, 40, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="h and low come together"):
        G.lora_gemm(o["x"], o["w"], y_kmajor=True, h=o["h"], config=SMALL)
    with pytest.raises(ValueError, match="x is"):
        G.lora_gemm(o["x"], o["w_t"], y_kmajor=True, config=SMALL)


@pytest.mark.gpu
@pytest.mark.parametrize("what,build", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("m,n,k,r", [(8192, 4096, 4096, 16), (777, 3000, 1024, 64)])
def test_lora_gemm_matches_reference_on_hopper(what, build, m, n, k, r):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need a Hopper (sm_90+) GPU")
    args = build(_operands(m, n, k, r, torch.bfloat16, "cuda"))
    _check(G.lora_gemm(**args), G.reference(**args), torch.bfloat16)
