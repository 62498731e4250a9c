"""Probe (GPU): why regional compilation of a LoRA (or QLoRA) Llama recompiles or breaks its graphs. Prints dynamo's
recompile reasons and graph breaks, the graphs it made, and the tokens/s of eager vs compiled training steps.
With the project installed (gpu_check.sh's `compile` step; `--qlora`: the bench's QLoRA model case, NF4 with double
quantization, bitsandbytes installed):
    python3 scripts/probe_compile.py [--qlora]
Found with it (2026-12-02): a training forward that builds a KV cache (use_cache left True) recompiles every decoder
layer (guards on the cache's per-layer state) until dynamo's limit, then runs eager; the bench passes use_cache=False.
Open (bench/RESULTS.md, 2026-12-06): the compiled QLoRA rows were slower than eager ("bitsandbytes' layer breaks the
graph and dynamo hits its recompile limit"); on the CPU (torch 2.13, bitsandbytes 0.49.1 and 0.50.2) the same
model compiles into two graphs with no break, so the cause is on the CUDA side."""
import argparse
import copy
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import LlamaForCausalLM

import peft_fast as pf
from peft_fast.benchmark.cases import ALL_LINEAR, LLAMA_1B, compile_decoder_layers

parser = argparse.ArgumentParser()
parser.add_argument("--qlora", action="store_true", help="the base model's linears in NF4 (double quantization)")
args = parser.parse_args()
torch._logging.set_logs(recompiles=True, graph_breaks=True)

torch.manual_seed(0)
cpu = LlamaForCausalLM(LLAMA_1B.config()).to(torch.bfloat16)
if args.qlora:
    from peft_fast.benchmark.quantized import quantize_linears

    cpu = quantize_linears(cpu, compute_dtype=torch.bfloat16, compress_statistics=True, device="cuda")
ids = torch.randint(0, 32000, (2, 1024), device="cuda")
for compiled in (False, True):
    torch._dynamo.reset()
    counters.clear()
    model = pf.get_peft_model(copy.deepcopy(cpu).cuda(), pf.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                                       target_modules=ALL_LINEAR))
    model.train()
    if compiled:
        compile_decoder_layers(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for i in range(8):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    print(f"{'qlora' if args.qlora else 'lora'} compiled={compiled}: {5 * 2048 / (time.perf_counter() - t0):.0f} "
          f"tok/s, loss {loss.item():.4f}", flush=True)
    if compiled:
        print("dynamo stats:", dict(counters["stats"]))
        for reason, count in counters["graph_break"].items():
            print(f"graph break x{count}: {reason[:300]}")
    del model, opt
