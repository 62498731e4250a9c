"""Probe (GPU): where a LoRA linear's fwd+bwd time goes, host and device, for the candidate designs.

Prints three tables:
  host   µs per call at tiny sizes (GPU work negligible, so wall time = host enqueue cost): torch.mm, one Triton
         launch, the current custom-op path, an autograd.Function over cuBLAS, one over the Triton kernels.
  layer  wall µs per fwd+bwd (CUDA events, median) at real sizes, per design, and the low-rank pieces alone.
  model  tokens/s of the 1B-Llama LoRA training step (bench model case, dropout 0) per design.
Run on the device with the project installed (pip install --no-build-isolation --no-deps -e .):
    python3 scripts/probe_lora_paths.py [host layer model]
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import peft_fast
from peft_fast import ops
from peft_fast.kernels import lora_linear as K
from peft_fast.ops import triton_lora

DT = torch.bfloat16


class CublasLora(torch.autograd.Function):
    """y = x Wᵀ + s·(x Aᵀ) Bᵀ (+ bias) with cuBLAS only; saves x, hs = s·x Aᵀ; no dropout."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, s):
        dt = x.dtype
        a_c, b_c = a.to(dt), b.to(dt)
        hs = torch.mm(x, a_c.t()).mul_(s)
        out = torch.mm(hs, b_c.t()) if bias is None else torch.addmm(bias, hs, b_c.t())
        out.addmm_(x, w.t())
        ctx.save_for_backward(x, w, a_c, b_c, hs)
        ctx.s, ctx.a_dtype, ctx.b_dtype, ctx.has_bias = s, a.dtype, b.dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w, a_c, b_c, hs = ctx.saved_tensors
        gs = torch.mm(dy, b_c).mul_(ctx.s)
        grad_b = torch.mm(dy.t(), hs).to(ctx.b_dtype)
        grad_a = torch.mm(gs.t(), x).to(ctx.a_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(gs, a_c).addmm_(dy, w)
        grad_bias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


class TritonLora(torch.autograd.Function):
    """The current Triton kernels (shrink, low-rank term + cuBLAS beta=1, grad_a) without the custom op."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, s):
        dt = x.dtype
        a_c, b_c = a.to(dt), b.to(dt)
        hs = K.shrink(x, a_c, s, 0.0, 0)
        out = K.lowrank(hs, b_c.t(), bias, 1.0, 0.0, 0, dt).addmm_(x, w.t())
        ctx.save_for_backward(x, w, a_c, b_c, hs)
        ctx.s, ctx.a_dtype, ctx.b_dtype = s, a.dtype, b.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w, a_c, b_c, hs = ctx.saved_tensors
        dhs = torch.mm(dy, b_c)
        grad_b = torch.mm(dy.t(), hs).to(ctx.b_dtype)
        grad_a = (K.grad_a(dhs, x, 0.0, 0) * ctx.s).to(ctx.a_dtype)
        grad_x = K.lowrank(dhs, a_c, None, ctx.s, 0.0, 0, x.dtype).addmm_(dy, w)
        return grad_x, None, None, grad_a, grad_b, None


_ORIG = ops.linear_with_lora


def patched(fn):
    def linear_with_lora(x, base, terms):
        if len(terms) != 1 or terms[0].dropout_p > 0 or type(base) is not nn.Linear:
            return _ORIG(x, base, terms)
        t = terms[0]
        dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        with torch.autocast("cuda", enabled=False):
            out = fn.apply(x2, base.weight.to(dt), None if base.bias is None else base.bias.to(dt),
                           t.lora_A.weight, t.lora_B.weight, t.scaling)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return linear_with_lora


def wall_us(fn, n=50, warm=10):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3)
    return statistics.median(ts)


def host_us(fn, n=300, warm=30):
    """Enqueue cost: many calls back to back, no sync inside (tiny sizes, so the GPU keeps up)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def layer_models(k, n, r, p, with_peft=True):
    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False).cuda().to(DT)
    base.requires_grad_(False)
    out = {"bare": base}
    libs = [("pf", peft_fast)]
    if with_peft:
        import peft
        libs.append(("peft", peft))
    for name, lib in libs:
        m = nn.Sequential(nn.Linear(k, n, bias=False)).cuda().to(DT)
        m[0].weight.data.copy_(base.weight)
        m = lib.get_peft_model(m, lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"],
                                                  init_lora_weights=False))
        out[name] = m.base_model.model[0]
    return out


def designs(layers):
    pf = layers["pf"]
    t = pf._adapter_term("default")
    w = pf.base_layer.weight
    d = {
        "bare F.linear": lambda x: F.linear(x, layers["bare"].weight),
        "HF PEFT": layers.get("peft"),
        "pf torch path": lambda x: _with("torch", pf, x),
        "pf triton (custom op)": lambda x: _with("triton", pf, x),
        "pf cuda path (auto)": lambda x: _with("cuda", pf, x),
        "pf cuda, Python node": lambda x: _python_node(pf, x),
        "Function cuBLAS": lambda x: CublasLora.apply(x, w, None, t.lora_A.weight, t.lora_B.weight, t.scaling),
        "Function Triton": lambda x: TritonLora.apply(x, w, None, t.lora_A.weight, t.lora_B.weight, t.scaling),
    }
    return {k: v for k, v in d.items() if v is not None}


def _python_node(layer, x):
    """The cuda path with FusedLoraLinear in Python instead of peft_fast._C's C++ node."""
    from peft_fast.ops import cuda_lora

    saved, cuda_lora.CPP_LORA_LINEAR = cuda_lora.CPP_LORA_LINEAR, None
    try:
        return _with("cuda", layer, x)
    finally:
        cuda_lora.CPP_LORA_LINEAR = saved


def _with(backend, layer, x):
    with ops.use_backend(backend):
        return layer(x)


def host_table():
    print("\n=== host: µs per call at tiny sizes (M64 K256 N256 r16), enqueue only")
    layers = layer_models(256, 256, 16, 0.0)
    x = torch.randn(64, 256, device="cuda", dtype=DT, requires_grad=True)
    dy = torch.randn(64, 256, device="cuda", dtype=DT)
    a = torch.randn(16, 256, device="cuda", dtype=DT)
    xs = x.detach()
    rows = {
        "torch.mm": lambda: torch.mm(xs, a.t()),
        "Triton shrink launch": lambda: K.shrink(xs, a, 2.0, 0.0, 0),
        "Triton lowrank launch": lambda: K.lowrank(xs[:, :16], a, None, 1.0, 0.0, 0, DT),
        "Triton shrink p.1 new seed": lambda: K.shrink(xs, a, 2.0, 0.1, int(torch.randint(0, 2**31 - 1, ()))),
    }
    for name, f in designs(layers).items():
        rows[f"{name} fwd+bwd"] = (lambda f: lambda: f(x).backward(dy))(f)
        rows[f"{name} fwd no_grad"] = (lambda f: lambda: _nograd(f, xs))(f)
    from peft_fast.ops import cuda_lora

    print(f"  (peft_fast._C's C++ node: {'built' if cuda_lora.CPP_LORA_LINEAR else 'NOT built'})")
    for name, f in rows.items():
        print(f"  {name:40s} {host_us(f):8.1f}")
    step = rows["pf cuda path (auto) fwd+bwd"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            step()
    print("\n  pf cuda path (auto) fwd+bwd, host time per op (torch.profiler, 50 steps):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))


def _nograd(f, x):
    with torch.no_grad():
        return f(x)


def layer_table():
    for m, k, n, r in [(8192, 4096, 4096, 16), (4096, 2048, 2048, 16), (8192, 4096, 14336, 16)]:
        print(f"\n=== layer M{m} K{k} N{n} r{r} bf16, wall µs per fwd+bwd (x requires grad), median")
        layers = layer_models(k, n, r, 0.0)
        xs = [torch.randn(m, k, device="cuda", dtype=DT, requires_grad=True) for _ in range(2)]
        dy = torch.randn(m, n, device="cuda", dtype=DT)
        res = {}
        for name, f in designs(layers).items():
            i = [0]

            def step(f=f):
                i[0] ^= 1
                f(xs[i[0]]).backward(dy)
            res[name] = wall_us(step)
        b = res["bare F.linear"]
        for name, v in res.items():
            print(f"  {name:40s} {v:8.1f}  {v / b:5.2f}x")
        x = xs[0].detach()
        a = torch.randn(r, k, device="cuda", dtype=DT)
        bw = torch.randn(n, r, device="cuda", dtype=DT)
        hs = torch.randn(m, r, device="cuda", dtype=DT)
        pieces = {
            "cuBLAS x@At": lambda: torch.mm(x, a.t()),
            "Triton shrink": lambda: K.shrink(x, a, 2.0, 0.0, 0),
            "Triton shrink p.1": lambda: K.shrink(x, a, 2.0, 0.1, 7),
            "cuBLAS hs@Bt": lambda: torch.mm(hs, bw.t()),
            "Triton lowrank": lambda: K.lowrank(hs, bw.t(), None, 1.0, 0.0, 0, DT),
            "cuBLAS dy@B": lambda: torch.mm(dy, bw),
            "cuBLAS dyT@hs": lambda: torch.mm(dy.t(), hs),
            "cuBLAS gT@x": lambda: torch.mm(hs.t(), x),
            "Triton grad_a": lambda: K.grad_a(hs, x, 0.0, 0),
            "Triton grad_a p.1": lambda: K.grad_a(hs, x, 0.1, 7),
            "cuBLAS g@A (dx term)": lambda: torch.mm(hs, a),
            "Triton lowrank dx p.1": lambda: K.lowrank(hs, a, None, 1.0, 0.1, 7, DT),
            "x.clone (one pass)": lambda: x.clone(),
        }
        for name, f in pieces.items():
            print(f"  piece {name:34s} {wall_us(f, n=30):8.1f}")
        del layers, xs
        torch.cuda.empty_cache()


def model_table():
    from transformers import LlamaForCausalLM

    from peft_fast.benchmark.cases import ALL_LINEAR, LLAMA_1B
    import peft

    print("\n=== model: 1B Llama LoRA r16 all-linear, batch 2 x 1024, bf16 autocast, dropout 0; tok/s")
    torch.manual_seed(0)
    cpu = LlamaForCausalLM(LLAMA_1B.config()).to(DT)
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")

    def run(name, lib=None, patch=None, backend="auto"):
        import copy
        model = copy.deepcopy(cpu).cuda()
        if lib is None:
            model.requires_grad_(False)
            model.enable_input_require_grads()
        else:
            model = lib.get_peft_model(model, lib.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                              target_modules=ALL_LINEAR, task_type="CAUSAL_LM"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if lib is not None else None
        policy = ops.use_backend(backend)
        policy.__enter__()
        if patch is not None:
            ops.linear_with_lora = patch

        def step():
            with torch.autocast("cuda", dtype=DT):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        try:
            us = wall_us(step, n=10, warm=3)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
        finally:
            ops.linear_with_lora = _ORIG
            policy.__exit__(None, None, None)
        print(f"  {name:32s} {2048 / us * 1e6:9.0f} tok/s  wall {us / 1e3:7.1f} ms  GPU kernels {gpu:7.1f} ms",
              flush=True)
        del model, opt
        torch.cuda.empty_cache()

    run("base (frozen, fwd+bwd)")
    run("HF PEFT", peft)
    run("pf torch path", peft_fast, backend="torch")
    run("pf triton (custom op)", peft_fast, backend="triton")
    run("pf cuda path (auto)", peft_fast, backend="cuda")
    run("pf + Function cuBLAS", peft_fast, patch=patched(CublasLora))
    run("pf + Function Triton", peft_fast, patch=patched(TritonLora))


if __name__ == "__main__":
    parts = sys.argv[1:] or ["host", "layer", "model"]
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for part in parts:
        {"host": host_table, "layer": layer_table, "model": model_table}[part]()
