"""Where the time of a fused LoRA linear goes on a GPU: each kernel alone (do_bench medians), the Python
overhead per call, and the autotuner's picks. Prints one table; used while tuning kernels/lora_linear.py."""

import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from peft_fast.kernels import lora_linear as K
from peft_fast.ops import triton_lora


def bench(fn):
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    rows = []
    for m, k, n, r in [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (16, 4096, 4096, 16)]:
        x = torch.randn(m, k, device="cuda", dtype=dt)
        w = torch.randn(n, k, device="cuda", dtype=dt) / k**0.5
        a = torch.randn(r, k, device="cuda", dtype=dt) / k**0.5
        b = torch.randn(n, r, device="cuda", dtype=dt)
        dy = torch.randn(m, n, device="cuda", dtype=dt)
        hs = K.shrink(x, a, 2.0, 0.0, 0)
        t = {
            "cublas x@Wt": bench(lambda: F.linear(x, w)),
            "cublas dy@W": bench(lambda: dy @ w),
            "shrink p0": bench(lambda: K.shrink(x, a, 2.0, 0.0, 0)),
            "shrink p.1": bench(lambda: K.shrink(x, a, 2.0, 0.1, 5)),
            "gemm plain": bench(lambda: K.gemm_lora(x, w.t(), None, None, None, 0, 0, 0, dt)),
            "gemm+lora": bench(lambda: K.gemm_lora(x, w.t(), None, hs, b.t(), 1.0, 0, 0, dt)),
            "dx gemm+lora p.1": bench(lambda: K.gemm_lora(dy, w, None, hs, a, 2.0, 0.1, 5, dt)),
            "grad_a p.1": bench(lambda: K.grad_a(hs, x, 0.1, 5)),
            "cublas dy@B": bench(lambda: dy @ b),
            "cublas dyT@h": bench(lambda: dy.t() @ hs),
            "x copy": bench(lambda: x.clone()),
        }
        layer = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dt)
        term = triton_lora.LoraTerm(torch.nn.Linear(k, r, bias=False).cuda().to(dt),
                                    torch.nn.Linear(r, n, bias=False).cuda().to(dt), 2.0, torch.nn.Identity())
        with torch.no_grad():
            for _ in range(20):
                triton_lora.linear_with_lora(x, layer, [term])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                triton_lora.linear_with_lora(x[:16], layer, [term]) if m > 16 else triton_lora.linear_with_lora(x, layer, [term])
            cpu = (time.perf_counter() - t0) / 200 * 1e3
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                K.shrink(x, a, 2.0, 0.0, 0)
            cpu_launch = (time.perf_counter() - t0) / 200 * 1e3
            torch.cuda.synchronize()
        t["py call (no grad) ms, enqueue only"] = cpu
        t["shrink enqueue ms"] = cpu_launch
        rows.append(((m, k, n, r), t))
    for shape, t in rows:
        print(f"--- M,K,N,r = {shape}")
        for name, v in t.items():
            print(f"  {name:40s} {v * 1e3:9.1f} us")
    for kern in (K._gemm_lora_kernel, K._shrink_kernel, K._grad_a_kernel):
        print(kern.fn.__name__)
        for key, cfg in kern.cache.items():
            print("   ", key[:6], cfg)


if __name__ == "__main__":
    main()
