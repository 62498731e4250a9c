"""Probe (GPU): why regional compilation of a LoRA Llama recompiles. Prints dynamo's recompile reasons and the
tokens/s of eager vs compiled training steps. With the project installed:
    TORCH_LOGS=recompiles python3 scripts/probe_compile.py
Found with it (2026-12-02): a training forward that builds a KV cache (use_cache left True) recompiles every decoder
layer (guards on the cache's per-layer state) until dynamo's limit, then runs eager; the bench passes use_cache=False."""
import copy
import time

import torch
from transformers import LlamaForCausalLM

import peft_fast as pf
from peft_fast.benchmark.cases import ALL_LINEAR, LLAMA_1B, compile_decoder_layers

torch.manual_seed(0)
cpu = LlamaForCausalLM(LLAMA_1B.config()).to(torch.bfloat16)
ids = torch.randint(0, 32000, (2, 1024), device="cuda")
for compiled in (False, True):
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
    print(f"compiled={compiled}: {5 * 2048 / (time.perf_counter() - t0):.0f} tok/s, loss {loss.item():.4f}", flush=True)
    del model, opt
