"""Child process of test_gpu_kernels.test_cuda_qgemv_bad_arguments_raise: calls peft_fast._C.qgemv_lora with one
bad argument at a time and prints `name<TAB>exception type<TAB>message` after each call. Run apart from pytest
because a call that crashes the interpreter must fail that test, not end the test session."""

import sys

import torch

from peft_fast import _C

N, K, R, BS = 256, 512, 8, 64
dev = "cuda"


def good():
    return dict(x=torch.randn(4, K, device=dev, dtype=torch.bfloat16),
                qweight=torch.randint(0, 255, (N * K // 2,), device=dev, dtype=torch.uint8),
                code=torch.linspace(-1, 1, 16, device=dev), absmax=torch.rand(N * K // BS, device=dev),
                blocksize=BS, n=N, k=K, bias=torch.randn(N, device=dev, dtype=torch.bfloat16),
                hs=torch.randn(4, R, device=dev, dtype=torch.bfloat16),
                lora_b=torch.randn(N, R, device=dev, dtype=torch.bfloat16))


def with_(**changes):
    args = good()
    for key, value in changes.items():
        args[key] = value(args) if callable(value) else value
    return args


CASES = {
    "rows 17": with_(x=lambda a: torch.randn(17, K, device=dev, dtype=torch.bfloat16), hs=None, lora_b=None),
    "rows 0": with_(x=lambda a: torch.randn(0, K, device=dev, dtype=torch.bfloat16), hs=None, lora_b=None),
    "x fp32": with_(x=lambda a: a["x"].float()),
    "x on cpu": with_(x=lambda a: a["x"].cpu()),
    "x 3-D": with_(x=lambda a: a["x"][None]),
    "x non-contiguous": with_(x=lambda a: torch.randn(K, 4, device=dev, dtype=torch.bfloat16).t()),
    "x misaligned": with_(x=lambda a: torch.randn(4 * K + 1, device=dev, dtype=torch.bfloat16)[1:].view(4, K)),
    "k mismatch": with_(k=K + 32),
    "k not a multiple of 32": with_(k=K - 8, x=lambda a: a["x"][:, : K - 8].contiguous()),
    "n zero": with_(n=0),
    "blocksize 48": with_(blocksize=48),
    "qweight wrong size": with_(qweight=lambda a: a["qweight"][:-16]),
    "qweight int8": with_(qweight=lambda a: a["qweight"].view(torch.int8)),
    "qweight on cpu": with_(qweight=lambda a: a["qweight"].cpu()),
    "code 15 values": with_(code=lambda a: a["code"][:15]),
    "code on cpu": with_(code=lambda a: a["code"].cpu()),
    "absmax fp16": with_(absmax=lambda a: a["absmax"].half()),
    "absmax too short": with_(absmax=lambda a: a["absmax"][:-1]),
    "hs without lora_b": with_(lora_b=None),
    "lora_b without hs": with_(hs=None),
    "hs wrong rows": with_(hs=lambda a: a["hs"][:3]),
    "rank 129": with_(hs=lambda a: torch.randn(4, 129, device=dev, dtype=torch.bfloat16),
                      lora_b=lambda a: torch.randn(N, 129, device=dev, dtype=torch.bfloat16)),
    "lora_b fp16": with_(lora_b=lambda a: a["lora_b"].half()),
    "lora_b transposed": with_(lora_b=lambda a: a["lora_b"].t()),
    "bias wrong size": with_(bias=lambda a: a["bias"][:-1]),
    "bias fp32": with_(bias=lambda a: a["bias"].float()),
}

if __name__ == "__main__":
    print("cases\t" + "|".join(CASES), flush=True)
    _C.qgemv_lora(**good())  # the good call works (else every "raise" below would prove nothing)
    torch.cuda.synchronize()
    print("good\tok\t", flush=True)
    for name, args in CASES.items():
        try:
            _C.qgemv_lora(**args)
            torch.cuda.synchronize()
            outcome = ("no error", "")
        except Exception as exc:  # noqa: BLE001 - the parent checks the type
            outcome = (type(exc).__name__, str(exc).replace("\n", " "))
        print(f"{name}\t{outcome[0]}\t{outcome[1]}", flush=True)
    sys.exit(0)
