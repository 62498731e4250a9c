"""The consumer-GPU QLoRA case: a Llama-7B-shaped model in NF4 (double quantization), LoRA r=16 on every linear,
gradient checkpointing and AdamW, sequence 2048 — what a user fine-tunes on one 16 or 24 GiB card.

Each implementation builds its own model on the device from the config (random weights, never downloaded), in
bf16, and quantizes its linears there (seconds on a GPU), then goes through its library's own
`prepare_model_for_kbit_training` and `get_peft_model`, as a QLoRA script does. Besides the step time and peak
memory, the runner tries one step under an allocator limit of each memory budget (`memory_budgets`, GiB less what
the CUDA context already takes on this machine) and reports whether it fits. The check: peft_fast's loss against
the torch path's on the same model (the same weights), within the dtype's tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .cases import ALL_LINEAR, LLAMA_TINY, Impl, LlamaShape, _library, _rel_err, backend

LLAMA_7B = LlamaShape(4096, 11008, 32, 32, 32, 32000)


@dataclass
class ConsumerQLoraCase:
    shape: LlamaShape = field(default_factory=lambda: LLAMA_7B)
    batch: int = 1
    seq: int = 2048
    r: int = 16
    memory_budgets: tuple = (16, 24)
    group: str = "qlora consumer"
    impl_names = ("peft", "peft_fast")
    max_repeats = 5  # a 7B step with checkpointing takes seconds
    builders: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        s = self.shape
        return f"qlora nf4 h{s.hidden} L{s.layers} {self.batch}x{self.seq} r{self.r} ckpt"

    @property
    def params(self) -> dict:
        return dict(hidden=self.shape.hidden, layers=self.shape.layers, batch=self.batch, seq=self.seq, r=self.r,
                    budgets_gib=list(self.memory_budgets))

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        from ..tuners.lora.bnb import is_bnb_available

        self.device, self.dtype = device, dtype
        self.bnb = is_bnb_available()
        g = torch.Generator().manual_seed(3)
        self.ids = [torch.randint(0, self.shape.vocab, (self.batch, self.seq), generator=g).to(device)
                    for _ in range(2)]
        self.n_inputs = 2

    def release(self) -> None:
        self.__dict__.pop("ids", None)

    def _model(self, lib):
        """The quantized base, built and quantized on the device, prepared for k-bit training by `lib`."""
        from transformers import LlamaForCausalLM

        from .quantized import quantize_linears

        torch.manual_seed(0)
        with torch.device(self.device):
            model = LlamaForCausalLM._from_config(self.shape.config(), dtype=self.dtype)
        # (bitsandbytes 0.50's CPU kernels dequantize double-quantized weights wrongly: single quantization there)
        model = quantize_linears(model, compute_dtype=self.dtype, compress_statistics=self.device.type == "cuda",
                                 device=self.device)
        model.requires_grad_(False)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)

    def build(self, name: str) -> Optional[Impl]:
        if name in self.builders:
            return self.builders[name](self, self.device, self.dtype)
        lib = _library(name)
        if lib is None or not self.bnb:
            return None
        config = lib.LoraConfig(r=self.r, lora_alpha=2 * self.r, lora_dropout=0.05, target_modules=ALL_LINEAR,
                                task_type="CAUSAL_LM")
        model = lib.get_peft_model(self._model(lib), config)
        g = torch.Generator().manual_seed(2)  # the same adapter weights for both libraries, large enough to matter
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    scale = 0.25 / self.r**0.5 if "lora_B" in param_name else 1 / param.shape[-1] ** 0.5
                    param.copy_(torch.randn(param.shape, generator=g) * scale)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def loss(i):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                return model(input_ids=self.ids[i], labels=self.ids[i], use_cache=False).loss

        def step(i):
            loss(i).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def check() -> float:
            """The loss of input set 0 on this path against the torch path's, the same model (no step taken)."""
            model.eval()
            try:
                with torch.no_grad():
                    got = loss(0)
                    with backend("torch"):
                        want = loss(0)
            finally:
                model.train()
            return _rel_err(got.float().reshape(1), want.float().reshape(1))

        return Impl(step=step, check=check if name == "peft_fast" else None, units=self.batch * self.seq,
                    extra={"model": model, "optimizer": optimizer, "memory_budgets": self.memory_budgets})


def consumer_cases(device: torch.device, quick: bool) -> list[ConsumerQLoraCase]:
    """Batch 1 and 4 of the 7B case on a GPU (batch 1 only under --quick); a tiny model on the CPU, where only the
    code path is exercised (no memory budgets)."""
    if device.type == "cuda":
        return [ConsumerQLoraCase(batch=b) for b in ((1,) if quick else (1, 4))]
    return [ConsumerQLoraCase(shape=LLAMA_TINY, batch=2, seq=32, memory_budgets=())]
