"""Tiny models built from configs with random weights (no hub downloads), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(num_labels=None):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    if num_labels:
        cfg.num_labels = num_labels
        return LlamaForSequenceClassification(cfg)
    return LlamaForCausalLM(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def tiny_bert(task="seq_cls"):
    from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification, BertModel

    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=2 if task == "qa" else 3,
    )
    return {
        "seq_cls": BertForSequenceClassification,
        "token_cls": BertForTokenClassification,
        "qa": BertForQuestionAnswering,
        "feature": BertModel,
    }[task](cfg)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=True)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 7, bias=False)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.lin1(self.relu(self.lin0(x))))


class EmbConv(nn.Module):
    """Embedding → Conv1d → Conv2d → Linear, for the non-Linear LoRA layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.conv1d = nn.Conv1d(12, 10, 3, padding=1)
        self.conv2d = nn.Conv2d(1, 4, 3, padding=1)
        self.lin = nn.Linear(40, 5)

    def forward(self, x):
        h = self.emb(x).transpose(1, 2)  # B, 12, L
        h = self.conv1d(h)  # B, 10, L
        h = self.conv2d(h.unsqueeze(1))  # B, 4, 10, L
        return self.lin(h.mean(-1).flatten(1))


def inputs_for(name: str, batch: int = 3, seq: int = 7, generator_seed: int = 1):
    g = torch.Generator().manual_seed(generator_seed)
    if name in ("mlp",):
        return {"x": torch.randn(batch, 10, generator=g)}
    if name == "embconv":
        return {"x": torch.randint(0, 30, (batch, seq), generator=g)}
    ids = torch.randint(1, 64, (batch, seq), generator=g)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, 64, (batch, 5), generator=g)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "start_logits"):
        return torch.cat([out.start_logits, out.end_logits], -1)
    return out.last_hidden_state


def randomize_adapters(model: nn.Module, seed: int = 123, scale: float = 0.2) -> None:
    """Fill every adapter tensor (lora_*, modules_to_save copies) with fresh random values, never zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                if "lora_magnitude_vector" in name:
                    p.copy_(p * (1 + 0.1 * torch.randn(p.shape, generator=g)).to(p.device))
                else:
                    p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.device))


def train_a_little(model: nn.Module) -> None:
    """A deterministic stand-in for training: every adapter factor moves."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)


def save_trained_and_converted(model: nn.Module, folder) -> str:
    """PEFT's documented round for adapters that change the base weight (PiSSA, OLoRA, CorDA, LoRA-GA): the initial
    adapter saved with init_lora_weights=True, a little training (train_a_little), then the trained adapter saved
    converted against the initial one (path_initial_model_for_weight_conversion). Returns the converted folder."""
    import os

    config = model.peft_config["default"]
    init, initial = config.init_lora_weights, os.path.join(folder, "initial")
    config.init_lora_weights = True
    model.save_pretrained(initial)
    config.init_lora_weights = init
    train_a_little(model)
    out = os.path.join(folder, "converted")
    model.save_pretrained(out, path_initial_model_for_weight_conversion=initial)
    return out


def no_grad_outputs(layer: nn.Module, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer(x), layer(x) under CPU bf16 autocast), without grad, with peft_fast `backend` forced."""
    from peft_fast import ops

    with torch.no_grad(), ops.use_backend(backend):
        y = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return y, layer(x)


def lora_linear_layer(k: int, n: int, r: int, p: float, dtype: torch.dtype, fp32_adapters: bool = False,
                      bias: bool = False, device: str = "cuda") -> nn.Module:
    """peft_fast's LoRA layer over nn.Linear(k, n) (alpha = 2r, dropout p), adapters fp32 (PEFT's default) or in
    `dtype`; B drawn so that the low-rank term is a clear share of the output (B = 0 would hide a wrong term)."""
    import peft_fast as pf

    base = nn.Sequential(nn.Linear(k, n, bias=bias)).to(device).to(dtype)
    model = pf.get_peft_model(base, pf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=p),
                              autocast_adapter_dtype=fp32_adapters)
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.5 / r**0.5)
    return layer


def lora_fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, backend: str, kernels="auto",
                 seed: int = 0) -> tuple:
    """(y, dx, dA, dB) of one forward + backward of `layer` after torch.manual_seed(seed), with `backend` forced and
    the cuda backend's fused kernels in mode `kernels` (dispatch.use_cuda_kernels); the grads are cleared after."""
    from peft_fast import ops

    torch.manual_seed(seed)
    with ops.use_backend(backend), ops.use_cuda_kernels(kernels):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(dy)
    out = (y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone(),
           layer.lora_B["default"].weight.grad.clone())
    layer.zero_grad(set_to_none=True)
    return out


def assert_steps_never_synchronize(layer: nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    """Run `steps` forward + backward passes of `layer` on `x` (CUDA) after a warm-up; any device→host sync in them
    raises (torch.cuda.set_sync_debug_mode("error"))."""
    layer(x).sum().backward()  # warm-up (Triton compiles, cuBLAS handles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            layer(x).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


from peft_fast.benchmark.quantized import quantize_linears  # noqa: E402,F401  (tests and benchmarks share it)
