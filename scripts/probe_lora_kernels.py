"""Probe (GPU): the cuda backend's C++ node with its low-rank half on peft_fast's fused kernels (csrc/lora_kernels.h)
against the same node on ATen ops (the route before them), the bare layer and HF PEFT, in one process.

  host    µs per call at tiny sizes (enqueue cost: the GPU keeps up), fwd+bwd and fwd without grad
  split   where one LoRA linear's host time goes: the layer in auto mode (the flat eager path) and forced (the
          general path), the C++ node called directly, the Python paths alone (node stubbed), CPU ops of a fwd+bwd
  layer   per fwd+bwd at real sizes, dropout 0 and 0.1: wall µs (CUDA events, median) and GPU kernel µs
  qlayer  the same for the QLoRA layer (NF4 + double quantization): HF PEFT + bitsandbytes against the whole-layer node
  pieces  the kernels alone (forward; backward rows + reduce, on the forward's bf16 adapter copies as the node runs
          it, and on the fp32 adapters) against one pass over x (x.clone)
  merged  dropout 0: the fused kernels against a merged-weight design (W' = W + s·B·A remade each direction)
  shapes  the rows kernel alone under each forced block shape (block_rows × column_splits) at the bench's sizes
  qgemv   decode over a 4-bit weight (NF4, double quantization): csrc/qgemv.cu alone, the whole-layer node's decode
          route (GEMM + LoRA term; and in one launch, lora_decode.cu), bitsandbytes' gemm_4bit, dequantize + mm,
          the bf16 layer, the bytes' floor
  preround  the training forward with fp32 adapters: the rows kernel rounding them as it reads them (and writing
          the copies backward reads) against one kernel rounding both first (lora_kernels_set_preround_rows),
          kernels alone and the node's fwd+bwd, at the 1B / 7B steps' 2048-row shapes and the bench layer's
  twopass the rows kernels as one launch against two (phase 1 alone, then phase 2 alone from its saved result, in
          other row blocks with split columns): kernels alone and the node's fwd+bwd (lora_kernels_set_two_pass_rows)
  reduce  the reduce kernel (dA, dB) at 64- against 128-column tiles (lora_kernels_set_reduce_cols) and in its compact
          layout (lora_kernels_set_reduce_compact): alone (do_bench µs and the bandwidth of its x and dy reads) and in
          the node's fwd+bwd
  decode  few rows: the rows kernel's 16-row blocks with split columns each walking all of K against clusters of up
          to 8 blocks splitting K (lora_kernels_set_rows_cluster), and the one-launch decode kernel
          (lora_kernels_set_decode_kernel) against cuBLAS + the rows kernel: kernels alone, the decode layer (no_grad,
          wall and GPU µs) and the node's fwd+bwd at a few hundred rows
  decodek the decode kernel's tables of decode alone (the rows kernel at cluster 8)
  ranks   r32 and r64: the layer's fwd+bwd on the ATen route, the fused default route and the one-GEMM route (reading
          h at 128×256 and 128×128 tiles; producing it) registered at that rank
  tma     kernels/lora_gemm_tma.py (one TMA GEMM with the LoRA term inside, several tile configs) against cuBLAS and
          the default route, forward and dx (with and without dropout bits), at the bench layer's and the models' shapes
  dequant the 4-bit dequantization kernel (csrc/dequant4.cu, inside the QLoRA node) against bitsandbytes'
          dequantize_4bit at the 7B step's weight shapes (NF4, double quantization): GPU µs and TB/s
  once    each fused kernel launched once at M8192 K=N=4096 and M2048 K=N=2048, r16, p 0 and 0.1 (for ncu:
          scripts/gpu_check.sh ncu)
  oncedecode  the decode kernel and cuBLAS + the rows kernel launched once at M1 and M16 (NCU_ONCE=oncedecode)
  model   the bench's 1B Llama LoRA step (r16 all-linear, 2×1024, bf16 autocast, dropout 0.05, AdamW): tok/s, GPU ms
          (with a row of the fp32 adapters rounded first: that default's A/B)
  consumer  the bench's 7B-shaped QLoRA step (batch 1, checkpointing): HF PEFT + bitsandbytes, peft_fast, and peft_fast
          with the fp32 adapters rounded first: wall ms, GPU ms
Run on the device with the project built (scripts/gpu_check.sh kprobe):  python3 scripts/probe_lora_kernels.py [parts]
"""

import copy
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peft_fast  # noqa: E402
from peft_fast import ops  # noqa: E402
from peft_fast.benchmark.timing import kernel_time_ms  # noqa: E402
from peft_fast.ops.extension import _C  # noqa: E402
from probe_lora_paths import DT, host_us, layer_models, wall_us  # noqa: E402


def _pf(layer, kernels):
    def f(x):
        with ops.use_backend("cuda"), ops.use_cuda_kernels(kernels):
            return layer(x)
    return f


def designs(layers):
    d = {"bare F.linear": lambda x: F.linear(x, layers["bare"].weight)}
    if "peft" in layers:
        d["HF PEFT"] = layers["peft"]
    d["pf node, ATen route"] = _pf(layers["pf"], False)
    d["pf node, fused kernels"] = _pf(layers["pf"], True)
    return d


def host_table():
    print("\n=== host: µs per call at tiny sizes (M64 K256 N256 r16), enqueue only", flush=True)
    for p in (0.0, 0.1):
        layers = layer_models(256, 256, 16, p)
        for m in layers.values():
            m.train()
        x = torch.randn(64, 256, device="cuda", dtype=DT, requires_grad=True)
        xs = x.detach()
        dy = torch.randn(64, 256, device="cuda", dtype=DT)
        for name, f in designs(layers).items():
            both = host_us(lambda: f(x).backward(dy))
            with torch.no_grad():
                fwd = host_us(lambda: f(xs))
            print(f"  p={p:<4} {name:28s} fwd+bwd {both:8.1f}   fwd no_grad {fwd:8.1f}", flush=True)


def split_table(rounds: int = 5):
    """Host µs per call of each way to run one LoRA linear, in `rounds` interleaved rounds (the lent hosts are noisy:
    a single pass once showed a 170 µs gap that did not reproduce); median and min of the rounds."""
    from torch.profiler import ProfilerActivity, profile

    from peft_fast.ops import cuda_lora

    print("\n=== split: host µs per call (M16 K256 N256 r16 bf16, fp32 adapters, kernels on), enqueue only; "
          f"median / min of {rounds} interleaved rounds. pf auto = the flat eager path (cuda_lora.eager_layer_call), "
          "pf forced = use_backend('cuda'): the general path (layer checks, dispatch, supports)", flush=True)
    for p in (0.0, 0.1):
        layers = layer_models(256, 256, 16, p, with_peft=False)
        pf = layers["pf"].train()
        x = torch.randn(16, 256, device="cuda", dtype=DT, requires_grad=True)
        dy = torch.randn(16, 256, device="cuda", dtype=DT)
        t = pf._adapter_term("default")
        w, a, b = pf.base_layer.weight, t.lora_A.weight, t.lora_B.weight
        params = [x, a, b]

        def clear():
            for q in params:
                q.grad = None

        def node():
            return _C.lora_linear(x, w, None, a, b, t.scaling, p, False, DT, True)

        def forced(f):
            def run():
                with ops.use_backend("cuda"):
                    return f()
            return run

        def no_grad(f):
            def run():
                with torch.no_grad():
                    return f()
            return run

        designs = {
            "bare F.linear fwd no_grad": no_grad(lambda: F.linear(x, w)),
            "C++ node fwd no_grad": no_grad(node),
            "pf auto fwd no_grad": no_grad(lambda: pf(x)),
            "pf forced fwd no_grad": no_grad(forced(lambda: pf(x))),
            "bare fwd+bwd": lambda: (clear(), F.linear(x, w).backward(dy)),
            "C++ node fwd+bwd": lambda: (clear(), node().backward(dy)),
            "pf auto fwd+bwd": lambda: (clear(), pf(x).backward(dy)),
            "pf forced fwd+bwd": forced(lambda: (clear(), pf(x).backward(dy))),
        }
        samples = {name: [] for name in designs}
        with ops.use_cuda_kernels(True):
            for _ in range(rounds):
                for name, f in designs.items():
                    samples[name].append(host_us(f, n=200, warm=20))
            # Python alone, stub in place for the whole loop (the stub swap itself is not timed)
            real, cuda_lora.CPP_LORA_LINEAR = cuda_lora.CPP_LORA_LINEAR, (lambda x_, *args: x_)
            try:
                with torch.no_grad():
                    python_only = {"pf auto, node stubbed (Python only)": [host_us(lambda: pf(x)) for _ in range(3)],
                                   "pf forced, node stubbed (Python only)": [host_us(forced(lambda: pf(x)))
                                                                             for _ in range(3)]}
            finally:
                cuda_lora.CPP_LORA_LINEAR = real
            for name, values in {**samples, **python_only}.items():
                print(f"  p={p:<4} {name:42s} {statistics.median(values):8.1f} / {min(values):8.1f}", flush=True)
            if p > 0:
                for _ in range(20):
                    clear(), pf(x).backward(dy)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(50):
                        clear(), pf(x).backward(dy)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)


def kernel_breakdown(step, reps: int = 5) -> list[tuple[str, float, float]]:
    """(kernel name, GPU µs per step, launches per step) of each CUDA kernel or memset `step()` runs, over `reps`
    profiled steps, largest first: where a layer's GPU time goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / reps, e.count / reps) for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA]
    return sorted(rows, key=lambda row: -row[1])


def print_fwd_bwd_table(impls, xs, dy, breakdown=()):
    """Wall µs (median) and GPU kernel µs of one fwd+bwd of each implementation, alternating the two inputs xs, with
    their ratios to impls' "bare F.linear"; for the implementations named in `breakdown`, GPU µs by kernel."""
    res, steps = {}, {}
    for name, f in impls.items():
        i = [0]

        def step(f=f):
            i[0] ^= 1
            f(xs[i[0]]).backward(dy)
        res[name] = (wall_us(step, n=30, warm=5), kernel_time_ms(step, torch.device("cuda")) * 1e3)
        steps[name] = step
    bw, bg = res["bare F.linear"]
    for name, (wall, gpu) in res.items():
        print(f"  {name:28s} {wall:9.1f} ({wall / bw:5.2f}x)   GPU {gpu:9.1f} ({gpu / bg:5.2f}x)", flush=True)
    for name in breakdown:
        print(f"    GPU µs a step by kernel, {name}: " + "; ".join(
            f"{key[:60]} {us:.1f}" + (f" ×{count:g}" if count != 1 else "")
            for key, us, count in kernel_breakdown(steps[name])), flush=True)


def route_layer_tables(shapes, ps, routes, choose, breakdown=(), applies=lambda setting, p: True):
    """The layer's fwd+bwd (wall µs, GPU kernel µs) of the bare layer and of peft_fast's node under each of `routes`
    ({name: setting}; `choose(setting)` switches the node before each call; only where `applies(setting, p)`), fp32
    adapters, per shape and dropout; the routes named in `breakdown` also by kernel."""
    for m, k, n, r in shapes:
        for p in ps:
            layers = layer_models(k, n, r, p, with_peft=False)
            bare = layers["bare"]
            impls = {"bare F.linear": lambda x, bare=bare: F.linear(x, bare.weight)}
            for name, setting in routes.items():
                if not applies(setting, p):
                    continue

                def run(x, layer=layers["pf"].train(), setting=setting):
                    choose(setting)
                    return layer(x)
                impls[name] = run
            xs = [torch.randn(m, k, device="cuda", dtype=DT, requires_grad=True) for _ in range(2)]
            dy = torch.randn(m, n, device="cuda", dtype=DT)
            print(f"\n=== layer M{m} K{k} N{n} r{r} p{p} fwd+bwd, fp32 adapters: wall µs (median), GPU kernel µs",
                  flush=True)
            shown = [name for name in breakdown if name in impls]
            print_fwd_bwd_table(impls, xs, dy, breakdown=["bare F.linear", *shown] if shown else ())


def reregister_tma(ids, cfg, max_splits: int):
    """Hand the node again kernels that lora_gemm_tma.register_for_node compiled at tile config `cfg` (its returned
    ids, by (rank block, kn, dx, bias or keep bits, producing adapter dtype or None)): the ones reading h and the
    producing ones, each in the key register_for_node gave it, with up to `max_splits` producers a row block."""
    major = torch.cuda.get_device_capability()[0]
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    for (block, layout, dx, flag, adapter), kernel in ids.items():
        _C.lora_kernels_register_tma(dx, DT == torch.bfloat16, layout, flag and not dx, flag and dx, block, kernel,
                                     programs, cfg["BM"], cfg["BN"], major, adapter is not None,
                                     adapter == torch.float32, cfg["BK"], max_splits)


def layer_table():
    cases = [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (8192, 4096, 14336, 16), (4096, 2048, 2048, 16),
             (2048, 2048, 8192, 16)]
    for m, k, n, r in cases:
        for p in (0.0, 0.1):
            layers = layer_models(k, n, r, p)
            for mod in layers.values():
                mod.train()
            xs = [torch.randn(m, k, device="cuda", dtype=DT, requires_grad=True) for _ in range(2)]
            dy = torch.randn(m, n, device="cuda", dtype=DT)
            print(f"\n=== layer M{m} K{k} N{n} r{r} p{p} bf16 fwd+bwd: wall µs (median), GPU kernel µs", flush=True)
            print_fwd_bwd_table(designs(layers), xs, dy)
            del layers, xs
            torch.cuda.empty_cache()
    print("\n=== decode M16 K4096 N4096 r16, fwd no_grad: wall µs, GPU µs", flush=True)
    layers = layer_models(4096, 4096, 16, 0.0)
    x = torch.randn(16, 4096, device="cuda", dtype=DT)
    for name, f in designs(layers).items():
        with torch.no_grad():
            wall = wall_us(lambda: f(x), n=100, warm=10)
            gpu = kernel_time_ms(lambda: f(x), torch.device("cuda")) * 1e3
        print(f"  {name:28s} {wall:9.1f}   GPU {gpu:8.1f}", flush=True)


def qlayer_table():
    """The QLoRA layer (NF4, double quantization, bf16 compute) fwd+bwd as the bench times it: the bare bf16 layer, HF
    PEFT + bitsandbytes, and the whole-layer node with its low-rank half on the fused kernels. (A merged-weight
    route, W' = deq(W) + s·B·A made in the dequantization pass, measured no better: bench/RESULTS.md.)"""
    import peft
    from torch import nn

    from peft_fast.benchmark.quantized import quantize_linears

    for m, k, n, r in [(8192, 4096, 4096, 16), (2048, 4096, 11008, 16), (2048, 11008, 4096, 16)]:
        for p in (0.0, 0.1):
            torch.manual_seed(0)
            bare = nn.Linear(k, n, bias=False).cuda().to(DT).requires_grad_(False)
            impls = {"bare F.linear": lambda x: F.linear(x, bare.weight)}
            for name, lib in (("HF PEFT + bnb", peft), ("pf", peft_fast)):
                q = quantize_linears(nn.Sequential(copy.deepcopy(bare)), compute_dtype=DT, compress_statistics=True,
                                     device="cuda")
                model = lib.get_peft_model(q, lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p,
                                                             target_modules=["0"]))
                layer = model.base_model.model[0].train()
                if name == "pf":  # (kernels off would also turn the dequantization kernel off: not a row worth timing)
                    impls["pf node, fused kernels"] = _pf(layer, True)
                else:
                    impls[name] = layer
            xs = [torch.randn(m, k, device="cuda", dtype=DT, requires_grad=True) for _ in range(2)]
            dy = torch.randn(m, n, device="cuda", dtype=DT)
            print(f"\n=== QLoRA layer M{m} K{k} N{n} r{r} p{p} fwd+bwd: wall µs (median), GPU kernel µs", flush=True)
            print_fwd_bwd_table(impls, xs, dy)
            del impls, xs
            torch.cuda.empty_cache()


def bench_us(fn) -> float:
    """do_bench's median time of fn(), in µs."""
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median") * 1e3


def _kernel_operands(m, k, n, r):
    """x (M×K) and dy (M×N) in the compute dtype, fp32 adapters A (r×K) and B (N×r) at the kernels' scales."""
    x = torch.randn(m, k, device="cuda", dtype=DT)
    a = torch.randn(r, k, device="cuda") / k**0.5
    b = torch.randn(n, r, device="cuda") / r**0.5
    return x, a, b, torch.randn(m, n, device="cuda", dtype=DT)


def pieces_table():
    import triton.testing

    print("\n=== kernels alone (do_bench median µs), bf16 x, fp32 adapters", flush=True)
    for m, k, n, r in [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (8192, 4096, 4096, 128),
                       (2048, 2048, 2048, 16), (16, 4096, 4096, 16)]:
        x, a, b, dy = _kernel_operands(m, k, n, r)
        row = []
        for p in (0.0, 0.1):
            # backward as the node runs it: on the forward's bf16 copies of the adapters, fp32 gradients
            y, hs, mask, ac, bc = _C.lora_kernels_forward(x, a, b, 2.0, p, copies=True)
            fwd = triton.testing.do_bench(lambda: _C.lora_kernels_forward(x, a, b, 2.0, p), return_mode="median")
            bwd = triton.testing.do_bench(
                lambda: _C.lora_kernels_backward(dy, x, ac, bc, hs, mask, 2.0, p, fp32_grads=True),
                return_mode="median")
            bwd32 = triton.testing.do_bench(lambda: _C.lora_kernels_backward(dy, x, a, b, hs, mask, 2.0, p),
                                            return_mode="median")
            red = triton.testing.do_bench(
                lambda: _C.lora_kernels_backward(dy, x, ac, bc, hs, mask, 2.0, p, need_x=False, fp32_grads=True),
                return_mode="median")
            row.append(f"p{p}: fwd {fwd * 1e3:7.1f} bwd {bwd * 1e3:7.1f} (fp32 adapters {bwd32 * 1e3:7.1f}; "
                       f"reduce+gs {red * 1e3:7.1f})")
        clone = triton.testing.do_bench(lambda: x.clone(), return_mode="median")
        mm = triton.testing.do_bench(lambda: torch.mm(x, x.new_empty(n, k).t()), return_mode="median")
        print(f"  M{m} K{k} N{n} r{r}: {' | '.join(row)} | x.clone {clone * 1e3:6.1f} | base GEMM {mm * 1e3:7.1f}",
              flush=True)


def merged_table():
    """Dropout 0: the fused kernels as the node runs them against a merged-weight design built from the same pieces
    (W' = W + s·B·A by one cuBLAS addmm, remade in forward and in backward; one GEMM each way on W'; hs by the rows
    kernel's shrink alone, gs + dA + dB by the backward kernels without dx): is it worth a route of its own?"""
    us = bench_us
    print("\n=== merged-weight design vs the fused kernels, p 0, bf16, fp32 adapters (do_bench median µs, "
          "fwd / bwd / both)", flush=True)
    s = 2.0
    for m, k, n, r in [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (2048, 2048, 2048, 16),
                       (2048, 2048, 5632, 16), (2048, 5632, 2048, 16)]:
        x = torch.randn(m, k, device="cuda", dtype=DT)
        w = torch.randn(n, k, device="cuda", dtype=DT) / k**0.5
        a = torch.randn(r, k, device="cuda") / k**0.5
        b = torch.randn(n, r, device="cuda") / r**0.5
        dy = torch.randn(m, n, device="cuda", dtype=DT)
        _, hs, mask, ac, bc = _C.lora_kernels_forward(x, a, b, s, 0.0, copies=True)

        def fused_fwd():
            y = _C.lora_kernels_forward(x, a, b, s, 0.0, copies=True)[0]
            y.addmm_(x, w.t())

        def fused_bwd():
            dx = _C.lora_kernels_backward(dy, x, ac, bc, hs, mask, s, 0.0, fp32_grads=True)[0]
            dx.addmm_(dy, w)

        def merged_fwd():
            wm = torch.addmm(w, bc, ac, alpha=s)  # (a merge kernel would read the fp32 adapters itself)
            torch.mm(x, wm.t())
            _C.lora_kernels_forward(x, a, b, s, 0.0, shrink_only=True)

        def merged_bwd():
            wm = torch.addmm(w, bc, ac, alpha=s)
            torch.mm(dy, wm)
            _C.lora_kernels_backward(dy, x, a, b, hs, mask, s, 0.0, need_x=False)

        cells = {
            "base": (us(lambda: torch.mm(x, w.t())), us(lambda: torch.mm(dy, w))),
            "fused": (us(fused_fwd), us(fused_bwd)),
            "merged": (us(merged_fwd), us(merged_bwd)),
        }
        both = {name: f + b_ for name, (f, b_) in cells.items()}
        print(f"  M{m} K{k} N{n} r{r}: " + "  ".join(
            f"{name} {f:.0f}/{b_:.0f}/{both[name]:.0f} ({both[name] / both['base']:.2f}x)"
            for name, (f, b_) in cells.items()), flush=True)


def shapes_table():
    import triton.testing

    print("\n=== rows kernel alone by forced shape (do_bench median µs; fwd = forward kernel, bwd = backward rows "
          "kernel only), bf16 x, fp32 adapters, p 0.1; auto = the launcher's rule", flush=True)
    # the bench's layer sizes, then the 1B model step's and the 7B consumer step's projections at 2048 rows
    for m, k, n, r in [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (8192, 4096, 14336, 16),
                       (4096, 2048, 2048, 16), (2048, 2048, 8192, 16), (16, 4096, 4096, 16),
                       (2048, 2048, 2048, 16), (2048, 2048, 5632, 16), (2048, 5632, 2048, 16),
                       (2048, 4096, 4096, 16), (2048, 4096, 11008, 16), (2048, 11008, 4096, 16)]:
        x, a, b, dy = _kernel_operands(m, k, n, r)
        _, hs, mask = _C.lora_kernels_forward(x, a, b, 2.0, 0.1)
        a16, b16 = a.to(DT), b.to(DT)  # the same call with bf16 adapters: what reading fp32 ones costs
        f16 = triton.testing.do_bench(lambda: _C.lora_kernels_forward(x, a16, b16, 2.0, 0.1), return_mode="median")
        floor = triton.testing.do_bench(lambda: torch.add(x[:, :1], 0).expand(m, n).clone(), return_mode="median")
        cells = [f"bf16-adapters {f16 * 1e3:.0f}", f"write-y {floor * 1e3:.0f}"]
        for bm in (0, 16, 32, 64):
            for splits in (0, 1, 2, 4):
                if bm == 0 and splits != 0:
                    continue
                shape = {"block_rows": bm, "column_splits": splits}
                fwd = triton.testing.do_bench(lambda: _C.lora_kernels_forward(x, a, b, 2.0, 0.1, **shape),
                                              return_mode="median")
                bwd = triton.testing.do_bench(
                    lambda: _C.lora_kernels_backward(dy, x, a, b, hs, mask, 2.0, 0.1, need_a=False, need_b=False,
                                                     **shape), return_mode="median")
                name = "auto" if bm == 0 else f"bm{bm}/y{splits or 'a'}"
                cells.append(f"{name} {fwd * 1e3:.0f}/{bwd * 1e3:.0f}")
        print(f"  M{m} K{k} N{n} r{r}: " + "  ".join(cells), flush=True)


def qgemv_table():
    import bitsandbytes.functional as bnbf

    from peft_fast.ops.cuda_qlora import CPP_QLORA_LINEAR

    us = bench_us

    def one_launch_us(fn):  # the node's decode route on lora_decode.cu (Hopper), the switch restored after
        if torch.cuda.get_device_capability()[0] < 9:
            return float("nan")
        before = _C.lora_kernels_decode_kernel_4bit()
        try:
            _C.lora_kernels_set_decode_kernel_4bit(True)
            return us(fn)
        finally:
            _C.lora_kernels_set_decode_kernel_4bit(before)

    print("\n=== decode over NF4 + double quantization, bf16 (do_bench median µs; floor = packed bytes at 3.35 TB/s)",
          flush=True)
    for k, n in [(4096, 4096), (4096, 11008), (11008, 4096)]:
        w = torch.randn(n, k, device="cuda", dtype=DT) / k**0.5
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset  # fp32, for qgemv_lora
        a = torch.randn(16, k, device="cuda") / k**0.5
        b = torch.randn(n, 16, device="cuda") / 4
        flat = packed.reshape(-1)
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=DT)
            node = (x, None, a, b, packed, state.code, state.absmax, state.state2.absmax, state.state2.code,
                    state.offset, n, k, 64, state.state2.blocksize, 2.0, 0.0, DT, True, True)
            with torch.no_grad():
                cells = {
                    "qgemv": us(lambda: _C.qgemv_lora(x, flat, state.code, absmax, 64, n, k, None, None, None)),
                    "node decode": us(lambda: CPP_QLORA_LINEAR(*node)),
                    "node decode, one launch": one_launch_us(lambda: CPP_QLORA_LINEAR(*node)),
                    # (bitsandbytes' own decode op: gemm_4bit in the version this probe was written against)
                    "bnb gemm_4bit": us(lambda: torch.ops.bitsandbytes.gemm_4bit.default(
                        x, packed, state.shape, state.state2.absmax, 64, "nf4", absmax_8bit=state.absmax,
                        absmax_code=state.state2.code, absmax_offset=state.offset))
                    if hasattr(torch.ops.bitsandbytes, "gemm_4bit") else float("nan"),
                    "dequant+mm": us(lambda: x @ bnbf.dequantize_4bit(packed, state).t()),
                    "bf16 F.linear": us(lambda: F.linear(x, w)),
                }
            floor = n * k / 2 / 3.35e12 * 1e6
            print(f"  M{m} K{k} N{n}: " + "  ".join(f"{name} {v:.1f}" for name, v in cells.items()) +
                  f"  floor {floor:.1f}", flush=True)


def preround_table():
    """fp32 adapters in a training forward: rounded inside the rows kernel (every row block reads them in fp32) or
    rounded first by one small kernel (every row block then reads half the bytes). The forward kernels alone (do_bench
    median µs, the copies included) and the layer's fwd+bwd (wall, GPU kernel time) through the node."""
    import triton.testing

    before = _C.lora_kernels_preround_rows()
    print("\n=== fp32 adapters rounded in the rows kernel vs first (bf16 x, p 0 | p 0.1): forward kernels µs",
          flush=True)
    try:
        for m, k, n, r in [(2048, 2048, 2048, 16), (2048, 2048, 5632, 16), (2048, 5632, 2048, 16),
                           (2048, 4096, 4096, 16), (2048, 4096, 11008, 16), (2048, 11008, 4096, 16),
                           (8192, 4096, 4096, 16), (8192, 4096, 4096, 64)]:
            x = torch.randn(m, k, device="cuda", dtype=DT)
            a = torch.randn(r, k, device="cuda") / k**0.5
            b = torch.randn(n, r, device="cuda") / r**0.5
            row = []
            for p in (0.0, 0.1):
                times = []
                # (bf16 adapters halve what every row block reads: 64-row blocks, which read them half as often,
                # may now beat the rule's 32)
                for rows, bm in ((1 << 62, 0), (0, 0), (0, 64)):
                    _C.lora_kernels_set_preround_rows(rows)
                    times.append(triton.testing.do_bench(
                        lambda: _C.lora_kernels_forward(x, a, b, 2.0, p, block_rows=bm, copies=True),
                        return_mode="median") * 1e3)
                row.append(f"in kernel {times[0]:6.1f} first {times[1]:6.1f} first bm64 {times[2]:6.1f}")
            print(f"  M{m} K{k} N{n} r{r}: {' | '.join(row)}", flush=True)
        route_layer_tables([(2048, 4096, 4096, 16), (2048, 4096, 11008, 16), (8192, 4096, 4096, 16)], (0.0,),
                           {"pf, in kernel": 1 << 62, "pf, rounded first": 0}, _C.lora_kernels_set_preround_rows)
    finally:
        _C.lora_kernels_set_preround_rows(before)


def reduce_table():
    """The reduce kernel at 64- and 128-column tiles and in its compact 64-column layout (three blocks a Hopper
    multiprocessor): the backward without dx (the rows kernel making gs, then the reduce: dA and dB), and dB alone
    (the reduce kernel alone, over dy: its bandwidth), on the forward's bf16 adapter copies as the node runs it
    (do_bench median µs); then the layer's fwd+bwd through the node at the bench layer's size and the 7B step's
    (lora_kernels_set_reduce_cols, lora_kernels_set_reduce_compact)."""
    import triton.testing

    before = _C.lora_kernels_reduce_cols(), _C.lora_kernels_reduce_compact()

    def tiles(setting):  # 64 | 128 columns, or "compact" (64 columns in the compact layout)
        _C.lora_kernels_set_reduce_cols(64 if setting == "compact" else setting)
        _C.lora_kernels_set_reduce_compact(setting == "compact")

    print("\n=== backward without dx (gs rows kernel + reduce) | dB alone (reduce over dy, TB/s); bf16, fp32 grads",
          flush=True)
    try:
        for m, k, n, r in [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (2048, 4096, 11008, 16),
                           (8192, 4096, 4096, 64)]:
            x, a, b, dy = _kernel_operands(m, k, n, r)
            cells = []
            for p in (0.0, 0.1):
                _, hs, mask, ac, bc = _C.lora_kernels_forward(x, a, b, 2.0, p, copies=True)
                for setting in (64, 128, "compact"):
                    tiles(setting)
                    both, db = (triton.testing.do_bench(lambda need_a=need_a: _C.lora_kernels_backward(
                        dy, x, ac, bc, hs, mask, 2.0, p, need_x=False, need_a=need_a, fp32_grads=True),
                        return_mode="median") * 1e3 for need_a in (True, False))
                    name = setting if setting == "compact" else f"{setting} cols"
                    cells.append(f"p{p:g} {name} {both:.1f} | {db:.1f} ({m * n * 2 / db / 1e6:.2f} TB/s)")
            print(f"  M{m} K{k} N{n} r{r}: " + "   ".join(cells), flush=True)
        route_layer_tables([(8192, 4096, 4096, 16), (2048, 4096, 11008, 16)], (0.0, 0.1),
                           {"pf, reduce 64 columns": 64, "pf, reduce 128 columns": 128,
                            "pf, reduce compact": "compact"},
                           tiles, breakdown=("pf, reduce 64 columns", "pf, reduce compact"))
    finally:
        _C.lora_kernels_set_reduce_cols(before[0])
        _C.lora_kernels_set_reduce_compact(before[1])


def ranks_table():
    """Ranks above 16 (auto mode's size rule sends M·(K+N)·r > FUSED_MAX_WORK to the ATen route, and the one-GEMM
    route is registered at rank ≤ 16 only): the layer's fwd+bwd through the node on the ATen route, on the fused
    kernels' default route (rows kernel + cuBLAS), and on the one-GEMM route registered at that rank: reading h at the
    default 128×256 tiles and at 128×128 with 4 stages (ptxas sm_90a: at rank block 64 the 128×256 dx kernels spill
    80 bytes, 476 with keep bits; the 128×128 ones nothing), and producing h without dropout; fp32 adapters."""
    from peft_fast.kernels import lora_gemm_tma as G
    from peft_fast.ops import dispatch

    before = (dispatch.CUDA_KERNELS, _C.lora_kernels_tma_rows(), _C.lora_kernels_tma_produce_rows())
    try:
        shapes = [(8192, 4096, 4096, 32), (8192, 4096, 4096, 64), (2048, 4096, 11008, 64)]
        ranks = sorted({r for *_, r in shapes})
        narrow = {**G.DEFAULT_CONFIG, "BN": 128, "num_stages": 4}
        tiles = {}  # the kernels' ids by tile width (registered last: the default width, with the producing ones)
        if torch.cuda.get_device_capability()[0] >= 9:
            tiles["128x128"] = G.register_for_node(_C, torch.device("cuda"), DT, ranks=ranks, config=narrow)
            tiles["128x256"] = G.register_for_node(_C, torch.device("cuda"), DT, ranks=ranks,
                                                   produce_adapters=(torch.float32,))

        def choose(setting):
            kernels, width, produce = setting
            dispatch.CUDA_KERNELS = kernels
            _C.lora_kernels_set_tma_rows(0 if width else 1 << 62)
            _C.lora_kernels_set_tma_produce_rows(0 if produce else 1 << 62)
            if width:
                reregister_tma(tiles[width], narrow if width == "128x128" else G.DEFAULT_CONFIG, G.MAX_SPLITS)
        route_layer_tables(shapes, (0.0, 0.1),
                           {"pf, ATen route": ("off", None, False), "pf, fused default route": ("on", None, False),
                            "pf, one GEMM reading h": ("on", "128x256", False),
                            "pf, one GEMM reading h, 128x128": ("on", "128x128", False),
                            "pf, one GEMM producing h": ("on", "128x256", True)},
                           choose, breakdown=("pf, ATen route", "pf, one GEMM reading h",
                                              "pf, one GEMM reading h, 128x128", "pf, one GEMM producing h"),
                           applies=lambda setting, p: p == 0.0 or not setting[2])
    except Exception as err:  # noqa: BLE001 - an experiment's failure is a result to print
        print(f"  the ranks part failed: {type(err).__name__}: {err}", flush=True)
    finally:
        dispatch.CUDA_KERNELS = before[0]
        _C.lora_kernels_set_tma_rows(before[1])
        _C.lora_kernels_set_tma_produce_rows(before[2])


def decode_table(rows: bool = True):
    """Few rows. The rows kernel where its 16-row blocks split their columns (decode, up to ~1000 rows on an H100):
    every block walking all of phase 1's K against clusters of up to 8 blocks splitting it
    (lora_kernels_set_rows_cluster): the kernels alone (do_bench median µs: the forward with an addend, as decode adds
    onto cuBLAS's output; the backward rows kernel making gs and dx). The one-launch decode kernel against cuBLAS's
    GEMM then the rows kernel, and with its spread loads (lora_kernels_set_decode_spread_loads). The decode layer
    through the module under each (no_grad: wall µs with a sync a call, as the bench times it, and GPU µs), and the
    node's fwd+bwd at a few hundred rows. rows=False (part decodek): the decode kernel's tables alone, the rows kernel
    at cluster 8."""
    us = bench_us
    before = _C.lora_kernels_rows_cluster(), _C.lora_kernels_decode_kernel(), _C.lora_kernels_decode_spread_loads()
    settings = (1, 4, 8) if rows else (8,)
    if rows:
        print("\n=== rows kernel, clusters splitting phase 1's K (1: none), fp32 adapters, bf16: forward | backward "
              "µs", flush=True)
    try:
        shapes = [(1, 4096, 4096, 16), (16, 4096, 4096, 16), (16, 4096, 11008, 16), (16, 11008, 4096, 16),
                  (16, 2048, 2048, 16), (16, 4096, 4096, 64), (256, 4096, 4096, 16), (1000, 4096, 4096, 16)]
        for m, k, n, r in shapes if rows else []:
            x, a, b, dy = _kernel_operands(m, k, n, r)
            addend = torch.randn(m, n, device="cuda", dtype=DT)
            _, hs, _ = _C.lora_kernels_forward(x, a, b, 2.0, 0.0)
            cells = []
            for blocks in settings:
                _C.lora_kernels_set_rows_cluster(blocks)
                fwd = us(lambda: _C.lora_kernels_forward(x, a, b, 2.0, 0.0, None, addend))
                bwd = us(lambda: _C.lora_kernels_backward(dy, x, a, b, hs, None, 2.0, 0.0, need_a=False,
                                                          need_b=False))
                cells.append(f"{blocks}: {fwd:6.1f} | {bwd:6.1f}")
            print(f"  M{m} K{k} N{n} r{r}: " + "   ".join(cells), flush=True)
        print("\n=== decode kernel against cuBLAS + the rows kernel (cluster 8), fp32 adapters, bf16: do_bench µs",
              flush=True)
        for m, k, n, r in [(1, 4096, 4096, 16), (16, 4096, 4096, 16), (16, 4096, 11008, 16), (16, 11008, 4096, 16),
                           (1, 2048, 2048, 16), (1, 2048, 8192, 16), (16, 4096, 4096, 64)]:
            x, a, b, _ = _kernel_operands(m, k, n, r)
            w = torch.randn(n, k, device="cuda", dtype=DT) / k**0.5
            cells = {"F.linear": us(lambda: F.linear(x, w))}
            _C.lora_kernels_set_rows_cluster(8)
            cells["cuBLAS + rows"] = us(lambda: _C.lora_kernels_forward(x, a, b, 2.0, 0.0, None, F.linear(x, w)))
            cells["decode kernel"] = us(lambda: _C.lora_kernels_decode(x, w, None, a, b, 2.0))
            _C.lora_kernels_set_decode_spread_loads(True)
            cells["spread loads"] = us(lambda: _C.lora_kernels_decode(x, w, None, a, b, 2.0))
            _C.lora_kernels_set_decode_spread_loads(before[2])
            floor = n * k * 2 / 3.35e12 * 1e6
            print(f"  M{m} K{k} N{n} r{r}: " + "  ".join(f"{name} {v:.1f}" for name, v in cells.items()) +
                  f"  (W's bytes at 3.35 TB/s: {floor:.1f})", flush=True)
        for m in (1, 16):
            print(f"\n=== decode M{m} K4096 N4096 r16, fwd no_grad: wall µs (median, a sync a call), GPU µs",
                  flush=True)
            layers = layer_models(4096, 4096, 16, 0.0, with_peft=False)
            pf, bare = layers["pf"].eval(), layers["bare"]
            x = torch.randn(m, 4096, device="cuda", dtype=DT)
            impls = {"bare F.linear": lambda: F.linear(x, bare.weight)}
            for blocks in settings:
                def call(blocks=blocks):
                    _C.lora_kernels_set_decode_kernel(False)
                    _C.lora_kernels_set_rows_cluster(blocks)
                    return pf(x)
                impls[f"pf, cluster {blocks}"] = call

            def one_launch(spread=False):
                _C.lora_kernels_set_decode_kernel(True)
                _C.lora_kernels_set_decode_spread_loads(spread)
                return pf(x)
            impls["pf, decode kernel"] = one_launch
            impls["pf, decode kernel, spread loads"] = lambda: one_launch(True)
            with torch.no_grad():
                for _ in range(3):  # interleaved rounds: a host's drift spreads over every row
                    cells = []
                    for name, f in impls.items():
                        wall = wall_us(f, n=200, warm=20)
                        gpu = kernel_time_ms(f, torch.device("cuda")) * 1e3
                        cells.append(f"{name} {wall:.1f} (GPU {gpu:.1f})")
                    print("  " + "   ".join(cells), flush=True)
        if rows:
            route_layer_tables([(256, 4096, 4096, 16), (1000, 4096, 4096, 16)], (0.0, 0.1),
                               {f"pf, cluster {blocks}": blocks for blocks in settings},
                               _C.lora_kernels_set_rows_cluster, breakdown=("pf, cluster 1", "pf, cluster 8"))
    finally:
        _C.lora_kernels_set_rows_cluster(before[0])
        _C.lora_kernels_set_decode_kernel(before[1])
        _C.lora_kernels_set_decode_spread_loads(before[2])


def two_pass_table():
    """The rows kernels as one launch against two (phase 1 alone, then phase 2 alone in pass-2 row blocks with split
    columns; lora_kernels_set_two_pass_rows): forward and backward kernels as the node runs them (do_bench median µs;
    fp32 adapters, the forward writing their copies, the backward reading them), then the layer's fwd+bwd through the
    node (wall, GPU kernel time) at the bench layer's size and the 7B step's."""
    import triton.testing

    before = _C.lora_kernels_two_pass_rows()
    variants = ((1 << 62, 64, 0, "one pass"), (0, 32, 0, "two, bm32"), (0, 64, 0, "two, bm64"),
                (0, 64, 2, "two, bm64 y2"), (0, 32, 0, "two, bm32/p1 bm64"))
    print("\n=== rows kernels, one launch vs two (bf16 x, fp32 adapters): fwd / bwd (rows + reduce) µs, p 0 | p 0.1",
          flush=True)
    try:
        for m, k, n, r in [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (8192, 4096, 14336, 16),
                           (2048, 4096, 4096, 16), (2048, 4096, 11008, 16), (2048, 11008, 4096, 16),
                           (2048, 2048, 2048, 16)]:
            x, a, b, dy = _kernel_operands(m, k, n, r)
            cells = []
            for rows, pass2, splits, name in variants:
                _C.lora_kernels_set_two_pass_rows(rows, pass2)
                bm1 = 64 if name.endswith("p1 bm64") else 0
                row = []
                for p in (0.0, 0.1):
                    _, hs, mask, ac, bc = _C.lora_kernels_forward(x, a, b, 2.0, p, copies=True)
                    fwd = triton.testing.do_bench(
                        lambda: _C.lora_kernels_forward(x, a, b, 2.0, p, copies=True, block_rows=bm1,
                                                        column_splits=splits), return_mode="median")
                    bwd = triton.testing.do_bench(
                        lambda: _C.lora_kernels_backward(dy, x, ac, bc, hs, mask, 2.0, p, fp32_grads=True,
                                                         block_rows=bm1, column_splits=splits), return_mode="median")
                    row.append(f"{fwd * 1e3:.0f}/{bwd * 1e3:.0f}")
                cells.append(f"{name} {' | '.join(row)}")
            print(f"  M{m} K{k} N{n} r{r}: " + "   ".join(cells), flush=True)
        route_layer_tables([(8192, 4096, 4096, 16), (2048, 4096, 11008, 16)], (0.0, 0.1),
                           {f"pf, {name}": (rows, pass2) for rows, pass2, _, name in variants[:3]},
                           lambda setting: _C.lora_kernels_set_two_pass_rows(*setting))
    finally:
        _C.lora_kernels_set_two_pass_rows(*before)


def tma_table():
    """kernels/lora_gemm_tma.py, bf16: first the node's one-GEMM route against its default route (the rows kernel
    writes the term, cuBLAS adds its GEMM onto it with beta = 1), layer fwd+bwd wall and GPU µs; then the host cost of
    one launch from Python and from C++, and both launches' GPU time at 8192×4096→4096; last, per shape, cuBLAS, the
    default forward and the TMA GEMM alone and with the term (forward, dx, dx with keep bits) under each tile config
    (do_bench median µs)."""
    import triton.testing

    from peft_fast.kernels import lora_gemm_tma as G

    def us(fn):
        try:
            return triton.testing.do_bench(fn, return_mode="median") * 1e3
        except Exception as err:  # noqa: BLE001 - a config that does not compile or fit: say so, go on
            return f"{type(err).__name__}"

    # the node's one-GEMM route against its default route, layer fwd+bwd (fp32 adapters, as PEFT's default); a
    # failure is printed and the rest of the part still runs
    before = _C.lora_kernels_tma_rows(), _C.lora_kernels_tma_produce_rows(), _C.lora_kernels_preround_rows()
    try:
        ids = G.register_for_node(_C, torch.device("cuda"), DT, ranks=(16,), produce_adapters=(torch.float32, DT))
        keep_dx = ids[16, False, True, True, None], G.KEEP_CONFIG["BM"], G.KEEP_CONFIG["BN"]
        # the same dx with keep bits at 128×128 tiles, 4 stages (KEEP_CONFIG before 2026-12-07 14:45 UTC: no spill,
        # but slower than 128×256 with its 96 spilled bytes)
        major, minor = torch.cuda.get_device_capability()
        programs = torch.cuda.get_device_properties(0).multi_processor_count
        narrow = G.compile_for_cpp(dtype=DT, capability=10 * major + minor, y_kmajor=False, low_rmajor=True,
                                   has_lora=True, has_bias=False, has_keep=True, rank_block=16, num_programs=programs,
                                   config={**G.DEFAULT_CONFIG, "BN": 128, "num_stages": 4})
        keep_narrow = G.load_for_cpp(_C, narrow), narrow["BM"], narrow["BN"]
        # the producing kernels (fp32 adapters) with one producer a row block, as before the split (registered last
        # by the default, with up to G.MAX_SPLITS)
        one = G.register_for_node(_C, torch.device("cuda"), DT, ranks=(16,), plain=False,
                                  produce_adapters=(torch.float32,), max_splits=1)
        split = G.register_for_node(_C, torch.device("cuda"), DT, ranks=(16,), plain=False,
                                    produce_adapters=(torch.float32,))
        # the same with the other tiles asking for h as they start (EARLY_H), not after their K loop
        early = G.register_for_node(_C, torch.device("cuda"), DT, ranks=(16,), plain=False,
                                    produce_adapters=(torch.float32,), config={**G.DEFAULT_CONFIG, "EARLY_H": True})

        def choose(setting):
            """setting: rows (the route's row threshold), dx_keep (the dx-with-dropout kernel (id, BM, BN), id -1:
            that dx on the default route), produce (producing kernels on), one (one producer a row block), early
            (EARLY_H producing kernels), rounded (fp32 adapters rounded first: the producing GEMMs then read bf16
            copies)"""
            _C.lora_kernels_set_tma_rows(setting["rows"])
            _C.lora_kernels_set_tma_produce_rows(0 if setting.get("produce") else 1 << 62)
            _C.lora_kernels_set_preround_rows(0 if setting.get("rounded") else before[2])
            if setting.get("one"):
                reregister_tma(one, G.DEFAULT_CONFIG, 1)
            else:
                reregister_tma(early if setting.get("early") else split, G.DEFAULT_CONFIG, G.MAX_SPLITS)
            kernel, bm, bn = setting["dx_keep"]
            _C.lora_kernels_register_tma(True, DT == torch.bfloat16, False, False, True, 16, kernel, programs, bm, bn,
                                         major)
        off = (-1, 0, 0)
        p0, p01 = (0.0,), (0.1,)  # (producing kernels run without dropout only; dx kernels with bits with it only)
        route_layer_tables([(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (4096, 4096, 4096, 16),
                            (2048, 4096, 11008, 16), (2048, 2048, 2048, 16)], (0.0, 0.1),
                           {"pf, default route": dict(rows=1 << 62, dx_keep=keep_dx),
                            "pf, producing (split)": dict(rows=0, dx_keep=off, produce=True, ps=p0),
                            "pf, producing, one a row block": dict(rows=0, dx_keep=off, produce=True, one=True, ps=p0),
                            "pf, producing, h early": dict(rows=0, dx_keep=off, produce=True, early=True, ps=p0),
                            "pf, producing, rounded 1st": dict(rows=0, dx_keep=off, produce=True, rounded=True, ps=p0),
                            "pf, one GEMM reading h": dict(rows=0, dx_keep=off),
                            "pf, dx with dropout (128x256)": dict(rows=0, dx_keep=keep_dx, ps=p01),
                            "pf, dx with dropout, 128x128": dict(rows=0, dx_keep=keep_narrow, ps=p01)}, choose,
                           breakdown=("pf, producing (split)", "pf, producing, h early",
                                      "pf, dx with dropout (128x256)"),
                           applies=lambda setting, p: p in setting.get("ps", (p,)))
    except Exception as err:  # noqa: BLE001 - an experiment's failure is a result to print
        print(f"  the one-GEMM route failed: {type(err).__name__}: {err}", flush=True)
    finally:
        _C.lora_kernels_set_tma_rows(before[0])
        _C.lora_kernels_set_tma_produce_rows(before[1])
        _C.lora_kernels_set_preround_rows(before[2])
    try:
        # what launching it from Python costs the host (the C++ node would launch it instead): tiny sizes, enqueue only
        xs = torch.randn(64, 256, device="cuda", dtype=DT)
        ws = torch.randn(256, 256, device="cuda", dtype=DT)
        hs = torch.randn(64, 16, device="cuda", dtype=DT)
        bs = torch.randn(256, 16, device="cuda", dtype=DT)
        small = {"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 8, "num_stages": 3, "num_warps": 4}
        cpp = G.CppLoraGemm(_C, torch.device("cuda"), DT, y_kmajor=True, has_lora=True, config=small)
        out = torch.empty(64, 256, device="cuda", dtype=DT)
        print("  host µs a call: " + "  ".join(f"{name} {host_us(fn):.1f}" for name, fn in (
            ("torch.mm", lambda: torch.mm(xs, ws.t())),
            ("lora_gemm (Python launch)", lambda: G.lora_gemm(xs, ws, y_kmajor=True, h=hs, low=bs, config=small)),
            ("lora_gemm (C++ launch, via pybind)", lambda: cpp(xs, ws, out, h=hs, low=bs)))), flush=True)
        # the C++-launched form (descriptors made on the device) at the bench layer's size, against the Python launch
        m, k, n = 8192, 4096, 4096
        x = torch.randn(m, k, device="cuda", dtype=DT)
        w = torch.randn(n, k, device="cuda", dtype=DT) / k**0.5
        h = torch.randn(m, 16, device="cuda", dtype=DT)
        b = torch.randn(n, 16, device="cuda", dtype=DT) / 4
        y = torch.empty(m, n, device="cuda", dtype=DT)
        cpp = G.CppLoraGemm(_C, torch.device("cuda"), DT, y_kmajor=True, has_lora=True)
        same = torch.equal(cpp(x, w, torch.empty_like(y), h=h, low=b), G.lora_gemm(x, w, y_kmajor=True, h=h, low=b))
        print(f"  M{m} K{k} N{n} fwd +term, default config: Python launch "
              f"{triton.testing.do_bench(lambda: G.lora_gemm(x, w, y_kmajor=True, h=h, low=b, out=y)) * 1e3:.1f} µs, "
              f"C++ launch {triton.testing.do_bench(lambda: cpp(x, w, y, h=h, low=b)) * 1e3:.1f} µs, "
              f"same bits: {same}", flush=True)
    except Exception as err:  # noqa: BLE001 - printed, and the sweep below still runs
        print(f"  the launches failed: {type(err).__name__}: {err}", flush=True)
    # (BM, BN, BK, GROUP_M, stages, warps, flatten, warp-specialized)
    # (the others of 2026-12-07 09:32 UTC, 128×128 warp-specialized, 128×256 warp-specialized, 256×128 s3, 128×128 s5,
    # gained nothing: bench/RESULTS.md)
    # (128×128 s4 lost everywhere, 2026-12-07 13:09 UTC)
    configs = [(128, 256, 64, 8, 3, 8, False, False)]
    print("\n=== one TMA GEMM with the LoRA term inside (bf16, r16, do_bench median µs)", flush=True)
    for m, k, n in [(8192, 4096, 4096), (8192, 4096, 14336), (2048, 4096, 4096), (2048, 2048, 2048)]:
        r = 16
        x = torch.randn(m, k, device="cuda", dtype=DT)
        w = torch.randn(n, k, device="cuda", dtype=DT) / k**0.5
        a = (torch.randn(r, k, device="cuda") / k**0.5).to(DT)
        b = (torch.randn(n, r, device="cuda") / r**0.5).to(DT)
        dy = torch.randn(m, n, device="cuda", dtype=DT)
        hs = _C.lora_kernels_forward(x, a, b, 2.0, 0.0, shrink_only=True)[1]
        gs = torch.randn(m, r, device="cuda", dtype=DT)
        keep = torch.randint(0, 256, (m, k // 8), device="cuda", dtype=torch.uint8)
        y = torch.empty(m, n, device="cuda", dtype=DT)
        dx = torch.empty(m, k, device="cuda", dtype=DT)
        a32, b32, h_out = a.float(), b.float(), torch.empty(m, r, device="cuda", dtype=DT)

        def default_fwd():
            term = _C.lora_kernels_forward(x, a, b, 2.0, 0.0)[0]
            return term.addmm_(x, w.t())
        rows = {"cuBLAS x Wt": us(lambda: torch.mm(x, w.t(), out=y)), "default fwd": us(default_fwd),
                "cuBLAS dy W": us(lambda: torch.mm(dy, w, out=dx)),
                "shrink alone": us(lambda: _C.lora_kernels_forward(x, a, b, 2.0, 0.0, shrink_only=True))}
        print(f"  M{m} K{k} N{n}: " + "  ".join(f"{key} {val:.1f}" for key, val in rows.items()), flush=True)
        # the route's forward runs the shrink alone: its row blocks, fp32 adapters too, and cuBLAS's x·Aᵀ (the
        # memory floor: x's bytes at the HBM bandwidth, ~22 µs at 8192×4096 bf16 on an H100)
        shrink = {f"bm{bm}{' fp32 adapters' if fp32 else ''}": us(
            lambda bm=bm, aa=aa, bb=bb: _C.lora_kernels_forward(x, aa, bb, 2.0, 0.0, block_rows=bm, shrink_only=True))
            for fp32, aa, bb in ((False, a, b), (True, a32, b32)) for bm in (16, 32, 64)}
        for bm in (16, 32, 64):  # with dropout: Philox, the bits written
            shrink[f"bm{bm} fp32 adapters p0.1"] = us(
                lambda bm=bm: _C.lora_kernels_forward(x, a32, b32, 2.0, 0.1, block_rows=bm, shrink_only=True))
        shrink["cuBLAS x At"] = us(lambda: torch.mm(x, a.t()))
        print("    shrink alone: " + "  ".join(f"{key} {val:.1f}" if isinstance(val, float) else f"{key} {val}"
                                             for key, val in shrink.items()), flush=True)
        for bm, bn, bk, group, stages, warps, flatten, ws in configs:
            cfg = {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group, "num_stages": stages, "num_warps": warps,
                   "FLATTEN": flatten, "WARP_SPECIALIZE": ws}
            cells = {
                "fwd plain": us(lambda: G.lora_gemm(x, w, y_kmajor=True, out=y, config=cfg)),
                "fwd +term": us(lambda: G.lora_gemm(x, w, y_kmajor=True, h=hs, low=b, out=y, config=cfg)),
                "dx plain": us(lambda: G.lora_gemm(dy, w, y_kmajor=False, out=dx, config=cfg)),
                "dx +term": us(lambda: G.lora_gemm(dy, w, y_kmajor=False, h=gs, low=a, low_rmajor=True, out=dx,
                                                   config=cfg)),
                "dx +term p0.1": us(lambda: G.lora_gemm(dy, w, y_kmajor=False, h=gs, low=a, low_rmajor=True, keep=keep,
                                                        p=0.1, out=dx, config=cfg)),
                # h made inside from fp32 adapters (the producing kernels: no shrink before them)
                "fwd producing h": us(lambda: G.lora_gemm(x, w, y_kmajor=True, h=h_out, low=b32, src=a32,
                                                          src_rmajor=True, h_scale=2.0, out=y, config=cfg)),
                "dx producing gs": us(lambda: G.lora_gemm(dy, w, y_kmajor=False, h=h_out, low=a32, low_rmajor=True,
                                                          src=b32, h_scale=2.0, out=dx, config=cfg)),
                # the other tiles asking for h as they start (EARLY_H)
                "fwd producing h, early": us(lambda: G.lora_gemm(x, w, y_kmajor=True, h=h_out, low=b32, src=a32,
                                                                 src_rmajor=True, h_scale=2.0, out=y,
                                                                 config={**cfg, "EARLY_H": True})),
                "dx producing gs, early": us(lambda: G.lora_gemm(dy, w, y_kmajor=False, h=h_out, low=a32,
                                                                 low_rmajor=True, src=b32, h_scale=2.0, out=dx,
                                                                 config={**cfg, "EARLY_H": True})),
                # one producer a row block (before the split over column blocks)
                "fwd producing h, 1 producer": us(lambda: G.lora_gemm(x, w, y_kmajor=True, h=h_out, low=b32, src=a32,
                                                                      src_rmajor=True, h_scale=2.0, out=y, config=cfg,
                                                                      max_splits=1)),
                "dx producing gs, 1 producer": us(lambda: G.lora_gemm(dy, w, y_kmajor=False, h=h_out, low=a32,
                                                                      low_rmajor=True, src=b32, h_scale=2.0, out=dx,
                                                                      config=cfg, max_splits=1)),
                # the same from adapters rounded to bf16 first (what rounding them once a step would buy)
                "fwd producing h, bf16 adapters": us(lambda: G.lora_gemm(x, w, y_kmajor=True, h=h_out, low=b, src=a,
                                                                         src_rmajor=True, h_scale=2.0, out=y,
                                                                         config=cfg)),
                "dx producing gs, bf16 adapters": us(lambda: G.lora_gemm(dy, w, y_kmajor=False, h=h_out, low=a,
                                                                         low_rmajor=True, src=b, h_scale=2.0, out=dx,
                                                                         config=cfg)),
            }
            name = f"{bm}x{bn}x{bk} g{group} s{stages} w{warps}" + (" flat" if flatten else "") + (" ws" if ws else "")
            text = "  ".join(f"{key} {val:.1f}" if isinstance(val, float) else f"{key} {val}"
                             for key, val in cells.items())
            print(f"    {name}: {text}", flush=True)
        got = G.lora_gemm(x, w, y_kmajor=True, h=hs, low=b)
        err = ((got.float() - G.reference(x, w, y_kmajor=True, h=hs, low=b).float()).norm() / got.float().norm())
        produced = dict(low=b32, src=a32, src_rmajor=True, h_scale=2.0)
        got = G.lora_gemm(x, w, y_kmajor=True, **produced)
        err2 = ((got.float() - G.reference(x, w, y_kmajor=True, **produced).float()).norm() / got.float().norm())
        print(f"    (forward with the term against the fp32 reference: relative error {err.item():.2e}; producing h "
              f"{err2.item():.2e})", flush=True)


def dequant_table(reps: int = 20):
    """Dequantization alone: the QLoRA node's kernel (profiled inside an inference call of the node at 512 rows, the
    rows where the node dequantizes) and bitsandbytes' dequantize_4bit, each µs a call and the bandwidth of its
    bytes (4 bits + absmax codes read, 16 bits written)."""
    from torch import nn

    import bitsandbytes.functional as bnbf
    from peft_fast.benchmark.quantized import quantize_linears
    from peft_fast.ops import cuda_qlora

    def per_call_us(fn, kernel):
        return sum(us for key, us, _ in kernel_breakdown(fn, reps) if kernel in key)

    print("\n=== 4-bit dequantization (NF4, double quantization, bf16 out): GPU µs a call (TB/s)", flush=True)
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        torch.manual_seed(0)
        q = quantize_linears(nn.Sequential(nn.Linear(k, n, bias=False).to(DT)), compute_dtype=DT,
                             compress_statistics=True, device="cuda")
        layer = peft_fast.get_peft_model(q, peft_fast.LoraConfig(r=16, target_modules=["0"])).base_model.model[0]
        x = torch.randn(512, k, device="cuda", dtype=DT)
        args = cuda_qlora.qlora_node_args(layer, x)
        assert args is not None and args[-2], "the node's dequantization kernel does not take this weight"
        weight = layer.base_layer.weight
        gbytes = n * k * 2.5 / 1e9
        with torch.no_grad():
            ours = per_call_us(lambda: cuda_qlora.CPP_QLORA_LINEAR(*args), "dequant4")
            theirs = per_call_us(lambda: bnbf.dequantize_4bit(weight.data, weight.quant_state), "Dequantize")
        print(f"  W {n}x{k}: peft_fast {ours:7.1f} ({gbytes / ours * 1e3:.2f})   bitsandbytes {theirs:7.1f} "
              f"({gbytes / theirs * 1e3:.2f})", flush=True)


def once():
    # the bench's layer size, then a 1B model projection at the bench's 2×1024 tokens
    for m, k, n, r in [(8192, 4096, 4096, 16), (2048, 2048, 2048, 16)]:
        x, a, b, dy = _kernel_operands(m, k, n, r)
        for p in (0.0, 0.1):
            _, hs, mask, ac, bc = _C.lora_kernels_forward(x, a, b, 2.0, p, copies=True)
            _C.lora_kernels_backward(dy, x, ac, bc, hs, mask, 2.0, p, fp32_grads=True)
        torch.cuda.synchronize()
        print(f"launched at M{m} K{k} N{n} r{r}: rows fwd, rows bwd, reduce at p 0 then p 0.1", flush=True)


def once_decode():
    """Decode at M1 and M16, K=N=4096 r16, each route launched once (for ncu): the decode kernel, then F.linear and
    the rows kernel at cluster 8 adding the term."""
    before = _C.lora_kernels_rows_cluster()
    try:
        _C.lora_kernels_set_rows_cluster(8)
        for m in (1, 16):
            x, a, b, _ = _kernel_operands(m, 4096, 4096, 16)
            w = torch.randn(4096, 4096, device="cuda", dtype=DT) / 64
            _C.lora_kernels_decode(x, w, None, a, b, 2.0)
            _C.lora_kernels_forward(x, a, b, 2.0, 0.0, None, F.linear(x, w))
            torch.cuda.synchronize()
            print(f"launched at M{m}: decode kernel, then F.linear + rows kernel (cluster 8)", flush=True)
    finally:
        _C.lora_kernels_set_rows_cluster(before)


def model_table():
    import peft
    from transformers import LlamaForCausalLM

    from peft_fast.benchmark.cases import ALL_LINEAR, LLAMA_1B

    print("\n=== model: 1B Llama LoRA r16 all-linear, batch 2 x 1024, bf16 autocast, dropout 0.05, AdamW", flush=True)
    torch.manual_seed(0)
    cpu = LlamaForCausalLM(LLAMA_1B.config()).to(DT)
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")

    def run(name, lib=None, kernels=True, rounds=3, preround=None, two_pass=None):
        before, before2 = _C.lora_kernels_preround_rows(), _C.lora_kernels_two_pass_rows()
        if preround is not None:  # fp32 adapters rounded first from this many rows (lora_kernels_set_preround_rows)
            _C.lora_kernels_set_preround_rows(preround)
        if two_pass is not None:  # the rows kernels as two launches from this many rows
            _C.lora_kernels_set_two_pass_rows(two_pass)
        model = copy.deepcopy(cpu).cuda()
        if lib is None:
            model.requires_grad_(False)
            model.enable_input_require_grads()
        else:
            model = lib.get_peft_model(model, lib.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                              target_modules=ALL_LINEAR, task_type="CAUSAL_LM"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if lib is not None else None

        def step():
            with ops.use_cuda_kernels(kernels), torch.autocast("cuda", dtype=DT):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        walls = [wall_us(step, n=8, warm=3) for _ in range(rounds)]
        gpu = kernel_time_ms(step, torch.device("cuda"))
        us = statistics.median(walls)
        print(f"  {name:28s} {2048 / us * 1e6:9.0f} tok/s  wall {us / 1e3:7.1f} ms (rounds "
              f"{', '.join(f'{w / 1e3:.1f}' for w in walls)})  GPU kernels {gpu:7.1f} ms  "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _C.lora_kernels_set_preround_rows(before)
        _C.lora_kernels_set_two_pass_rows(*before2)

    run("base (frozen, fwd+bwd)")
    run("HF PEFT", peft)
    run("pf node, ATen route", peft_fast, kernels=False)
    run("pf node, fused kernels", peft_fast, kernels=True)
    run("pf fused, adapters rounded 1st", peft_fast, kernels=True, preround=0)  # (the default's A/B)
    run("pf fused, two-pass rows kernels", peft_fast, kernels=True, two_pass=0)


def consumer_table(rounds: int = 3):
    """The 7B-shaped QLoRA step of the consumer bench case (NF4 + double quantization, r16 on every linear, gradient
    checkpointing, AdamW, 1×2048), each implementation built on the GPU in turn: wall ms (CUDA events, median of the
    rounds' medians) and GPU kernel ms of one step."""
    import gc

    from peft_fast.benchmark.consumer import ConsumerQLoraCase

    case = ConsumerQLoraCase()
    case.prepare(torch.device("cuda"), DT)
    print("\n=== consumer: 7B-shaped QLoRA step (NF4 double quantization, r16 all linears, checkpointing, 1x2048)",
          flush=True)
    before = _C.lora_kernels_preround_rows()
    try:
        for name, lib, preround in (("HF PEFT + bitsandbytes", "peft", None), ("peft_fast", "peft_fast", None),
                                    ("peft_fast, adapters rounded 1st", "peft_fast", 0)):
            _C.lora_kernels_set_preround_rows(before if preround is None else preround)
            impl = case.build(lib)
            if impl is None:
                print(f"  {name:32s} not available (bitsandbytes missing?)", flush=True)
                continue

            def step(impl=impl):
                impl.step(0)

            walls = [wall_us(step, n=3, warm=1) for _ in range(rounds)]
            gpu = kernel_time_ms(step, torch.device("cuda"))
            print(f"  {name:32s} wall {statistics.median(walls) / 1e3:7.1f} ms (rounds "
                  f"{', '.join(f'{w / 1e3:.1f}' for w in walls)})  GPU kernels {gpu:7.1f} ms  "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
            del impl, step
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    finally:
        _C.lora_kernels_set_preround_rows(before)


if __name__ == "__main__":
    parts = sys.argv[1:] or ["pieces", "host", "layer", "model"]
    print(torch.__version__, torch.cuda.get_device_name(), "kernels built:", hasattr(_C, "lora_kernels_forward"),
          flush=True)
    for part in parts:
        {"host": host_table, "split": split_table, "layer": layer_table, "qlayer": qlayer_table,
         "pieces": pieces_table, "shapes": shapes_table, "merged": merged_table, "qgemv": qgemv_table,
         "dequant": dequant_table, "preround": preround_table, "twopass": two_pass_table, "tma": tma_table,
         "reduce": reduce_table, "decode": decode_table, "ranks": ranks_table,
         "decodek": lambda: decode_table(rows=False),
         "once": once, "oncedecode": once_decode, "model": model_table, "consumer": consumer_table}[part]()
