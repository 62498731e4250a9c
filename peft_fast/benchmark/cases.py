"""Benchmark cases: what is timed, built the same way for the bare base, HF PEFT and peft_fast.

A case builds one implementation at a time (`build(name)` → `Impl`), so a model-level case never holds three
models at once and its peak memory is that implementation's alone. Every implementation but the bare base is
checked once against a reference before it is timed; a wrong result is reported as wrong, never as a speed-up.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .timing import saved_activation_bytes

IMPLS = ("base", "peft", "peft_fast")


def hf_peft():
    """The reference `peft` package when installed (benchmarks compare against it), else None."""
    try:
        import peft

        return peft
    except ImportError:
        return None


@dataclass
class Impl:
    """One implementation of a case: `step(i)` is the timed call on input set i."""

    step: Callable[[int], Any]
    check: Optional[Callable[[], float]] = None  # relative error against the case's reference
    saved_bytes: Optional[Callable[[], int]] = None  # activation bytes kept for backward by one forward
    units: Optional[float] = None  # work per step for a throughput column (tokens), if any
    extra: dict = field(default_factory=dict)


def backend(name: Optional[str]):
    """Force a peft_fast backend for the calls inside the block (None: leave the policy as it is)."""
    from ..ops import use_backend

    return contextlib.nullcontext() if name is None else use_backend(name)


def with_backend(impl: Impl, name: str) -> Impl:
    """The same implementation with backend `name` forced around every timed step and the check."""
    step, check = impl.step, impl.check

    def forced_step(i):
        with backend(name):
            return step(i)

    def forced_check():
        with backend(name):
            return check()

    impl.step = forced_step
    impl.check = None if check is None else forced_check
    return impl


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]


def _library(name: str):
    if name == "peft":
        return hf_peft()
    import peft_fast

    return peft_fast


# ------------------------------------------------------------------------------------------------ layer level
@dataclass
class LayerCase:
    """A LoRA linear layer W (N×K) + r, input M×K: forward, or forward+backward (dx, dA, dB)."""

    m: int
    k: int
    n: int
    r: int
    dropout: float = 0.0
    backward: bool = False
    group: str = "layer"
    builders: dict = field(default_factory=dict)  # name → callable(case, device, dtype) → Impl, overrides
    impl_names = ("base", "peft", "peft_fast", "peft_fast triton")

    @property
    def id(self) -> str:
        mode = "fwd+bwd" if self.backward else "fwd"
        return f"{self.group} {mode} M{self.m} K{self.k} N{self.n} r{self.r} p{self.dropout:g}"

    @property
    def params(self) -> dict:
        return dict(m=self.m, k=self.k, n=self.n, r=self.r, dropout=self.dropout, backward=self.backward)

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(0)
        self.base = nn.Linear(self.k, self.n, bias=False)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(self.n, self.k, generator=g) / self.k**0.5)
        self.base.requires_grad_(False)
        self.lora_a = torch.randn(self.r, self.k, generator=g) / self.k**0.5
        self.lora_b = torch.randn(self.n, self.r, generator=g) / self.r**0.5
        self.scale = 2.0  # lora_alpha = 2r
        x_bytes = self.m * self.k * dtype.itemsize
        # rotate input sets so that together they exceed the L2 cache (50 MB on an H100)
        self.n_inputs = 1 if device.type == "cpu" else max(2, min(8, -(-120_000_000 // max(x_bytes, 1))))
        self.xs = [torch.randn(self.m, self.k, generator=g).to(device, dtype) for _ in range(self.n_inputs)]
        self.dys = [torch.randn(self.m, self.n, generator=g).to(device, dtype) for _ in range(self.n_inputs)]
        if self.backward:
            for x in self.xs:
                x.requires_grad_(True)
        self.device, self.dtype = device, dtype
        self.reference = self._reference()

    def _reference_weight(self) -> torch.Tensor:
        """The base weight the implementations compute with, in fp32."""
        return self.base.weight.to(self.device, self.dtype).float()

    def _reference(self) -> dict[str, torch.Tensor]:
        """fp32 result of the LoRA formula (no dropout) on input set 0."""
        x = self.xs[0].detach().float().requires_grad_(True)
        w = self._reference_weight()
        a = self.lora_a.to(x.device).clone().requires_grad_(True)  # a copy: the case's tensors stay untouched
        b = self.lora_b.to(x.device).clone().requires_grad_(True)
        a_q, b_q = a.to(self.dtype).float(), b.to(self.dtype).float()
        y = x @ w.T + self.scale * (x @ a_q.T) @ b_q.T
        out = {"y": y.detach()}
        if self.backward:
            y.backward(self.dys[0].float())
            out.update(dx=x.grad, dA=a.grad, dB=b.grad)
        return out

    def release(self) -> None:
        for name in ("base", "xs", "dys", "reference"):
            self.__dict__.pop(name, None)

    def build(self, name: str) -> Optional[Impl]:
        if name in self.builders:
            return self.builders[name](self, self.device, self.dtype)
        if name == "base":
            layer = self.base.to(self.device, self.dtype)
            return self._impl(layer, lora=None)
        if name == "peft_fast triton":
            return with_backend(self.build("peft_fast"), "triton")
        lib = _library(name)
        if lib is None:
            return None
        model = nn.Sequential(copy.deepcopy(self.base))
        config = lib.LoraConfig(r=self.r, lora_alpha=2 * self.r, target_modules=["0"], lora_dropout=self.dropout)
        model = lib.get_peft_model(model, config).to(self.device, self.dtype)
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(self.lora_a)
            layer.lora_B["default"].weight.copy_(self.lora_b)
        return self._impl(layer, lora=layer)

    def _impl(self, layer: nn.Module, lora: Optional[nn.Module]) -> Impl:
        layer.train()
        xs, dys = self.xs, self.dys

        if self.backward:
            def step(i):
                layer(xs[i]).backward(dys[i])
        else:  # forward alone is timed as inference runs it: no autograd graph (dropout still on: train mode)
            def step(i):
                with torch.no_grad():
                    return layer(xs[i])

        def check() -> float:
            layer.eval()
            try:
                x = xs[0].detach().clone().requires_grad_(self.backward)
                y = layer(x)
                errs = [_rel_err(y, self.reference["y"])]
                if self.backward:
                    layer.zero_grad(set_to_none=True)
                    y.backward(dys[0])
                    errs.append(_rel_err(x.grad, self.reference["dx"]))
                    errs.append(_rel_err(lora.lora_A["default"].weight.grad, self.reference["dA"]))
                    errs.append(_rel_err(lora.lora_B["default"].weight.grad, self.reference["dB"]))
                    layer.zero_grad(set_to_none=True)
                return max(errs)
            finally:
                layer.train()

        def saved() -> int:
            x = xs[0].detach().requires_grad_(True)
            exclude = [x] + list(layer.parameters()) + list(layer.buffers())
            return saved_activation_bytes(lambda: layer(x), exclude)

        out_bytes = self.m * self.n * self.dtype.itemsize
        return Impl(step=step, check=None if lora is None else check,
                    saved_bytes=saved if self.backward else None, extra={"out_bytes": out_bytes})


@dataclass
class QLoraLayerCase(LayerCase):
    """A QLoRA layer: the LoRA layer over a bitsandbytes NF4 (double-quantized) Linear4bit computing in `dtype`.

    The bare base is the unquantized layer in `dtype` (what QLoRA is compared with); "peft_fast triton" forces
    the fused dequant-GEMM backend, which auto mode does not pick yet. Needs bitsandbytes.
    """

    group: str = "qlora layer"
    double_quant: bool = True
    # the forced fused dequant-GEMM row: auto never takes it (52x the bare layer, H100), and its autotuning and
    # 40 ms steps cost the quick suite its 3-minute budget, so `--quick` leaves it out
    triton_row: bool = True

    @property
    def impl_names(self) -> tuple[str, ...]:
        names = LayerCase.impl_names
        return names if self.triton_row else tuple(n for n in names if not n.endswith(" triton"))

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        super().prepare(device, dtype)
        from ..tuners.lora.bnb import is_bnb_available

        self.bnb = is_bnb_available()
        if self.bnb:
            self.quantized = self._quantized_linear()
            self.reference = self._reference()

    def _quantized_linear(self) -> nn.Module:
        from .quantized import quantize_linears

        base = nn.Sequential(copy.deepcopy(self.base).to("cpu", self.dtype))
        return quantize_linears(base, compute_dtype=self.dtype, compress_statistics=self.double_quant,
                                device=self.device)[0]

    def _reference_weight(self) -> torch.Tensor:
        quantized = getattr(self, "quantized", None)
        if quantized is None:
            return super()._reference_weight()
        from ..quantization import dequantize_4bit

        return dequantize_4bit(quantized.weight.data, quantized.weight.quant_state, torch.float32)

    def release(self) -> None:
        super().release()
        self.__dict__.pop("quantized", None)

    def build(self, name: str) -> Optional[Impl]:
        if name in self.builders or name == "base":
            return super().build(name)
        if not self.bnb:
            return None
        lib_name, forced = name.split(" ")[0], name.endswith("triton")
        lib = _library(lib_name)
        if lib is None:
            return None
        model = nn.Sequential(copy.deepcopy(self.quantized))
        config = lib.LoraConfig(r=self.r, lora_alpha=2 * self.r, target_modules=["0"], lora_dropout=self.dropout)
        model = lib.get_peft_model(model, config)
        layer = model.base_model.model[0]
        with torch.no_grad():
            for key, value in (("lora_A", self.lora_a), ("lora_B", self.lora_b)):
                module = getattr(layer, key)["default"]
                module.to(self.device, self.dtype)
                module.weight.copy_(value)
        impl = self._impl(layer, lora=layer)
        return with_backend(impl, "triton") if forced else impl


# ------------------------------------------------------------------------------------------------ model level
def compile_decoder_layers(model: nn.Module, mode: Optional[str] = None) -> int:
    """torch.compile each transformer decoder layer in place ("regional" compilation: the layers share one code
    object, so one compiled graph serves them all); returns how many were compiled. mode="reduce-overhead" also
    replays each layer's forward and backward as CUDA graphs (one launch per graph instead of one per kernel)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)


# compiled variants of an implementation ("peft_fast compile"): name suffix → torch.compile mode (CUDA only)
COMPILE_VARIANTS = {"compile": None, "compile+graphs": "reduce-overhead"}


@dataclass
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=4096, attn_implementation="sdpa",
        )


LLAMA_1B = LlamaShape(2048, 5632, 16, 16, 4, 32000)
LLAMA_TINY = LlamaShape(128, 352, 2, 4, 2, 512)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _ModelCase:
    """Shared set-up of the model-level cases: one base model on the CPU, copied to the device per impl."""

    shape: LlamaShape
    r: int
    builders: dict

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        self.device, self.dtype = device, dtype
        self.cpu_model = LlamaForCausalLM(self.shape.config()).to(dtype).eval()
        self.cpu_model.requires_grad_(False)
        self.lora_init = None
        self.reference = None
        self.ids = None

    def release(self) -> None:
        for name in ("cpu_model", "reference", "lora_init", "ids"):
            self.__dict__.pop(name, None)

    def _peft_model(self, name: str):
        lib = _library(name)
        if lib is None:
            return None
        model = copy.deepcopy(self.cpu_model).to(self.device)
        config = lib.LoraConfig(r=self.r, lora_alpha=2 * self.r, lora_dropout=self.dropout,
                                target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
        model = lib.get_peft_model(model, config)
        if self.lora_init is None:  # the same adapter weights for every library, large enough to matter
            g = torch.Generator().manual_seed(2)
            self.lora_init = {
                k: torch.randn(v.shape, generator=g) * (0.25 / self.r**0.5 if "lora_B" in k else 1 / v.shape[-1] ** 0.5)
                for k, v in model.state_dict().items() if "lora_" in k
            }
        model.load_state_dict({k: v.to(self.device) for k, v in self.lora_init.items()}, strict=False)
        return model

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _outputs(self, model, autocast: bool = True) -> dict:
        """What every implementation is checked on, in eval mode (no dropout): the logits on input set 0 and the
        gradients of that loss w.r.t. the adapter weights (concatenated by parameter name; empty when merged)."""
        was_training = model.training
        model.eval()
        model.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()  # (CUDA-graph variants: the outputs read below are this run's)
        with self._autocast() if autocast else contextlib.nullcontext():
            out = model(input_ids=self.ids[0], labels=self.ids[0], use_cache=False)
        trainable = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
        grads = None
        if trainable:
            out.loss.backward()
            grads = torch.cat([p.grad.float().flatten() for _, p in trainable])
            model.zero_grad(set_to_none=True)
        model.train(was_training)
        return {"logits": out.logits.detach().float(), "grads": grads}

    # Check against an fp32 run of the reference implementation, each error net of the one the reference itself
    # makes in `dtype`: two correct bf16 implementations round differently (peft_fast accumulates the base and LoRA
    # GEMMs in fp32, PEFT rounds each to bf16), which in the 16-layer model moved the logits by 3.9% against PEFT's
    # bf16 run on the H200 (2026-12-02), over the 3% tolerance. A missing or mis-scaled LoRA term still shows in
    # full. A 4-bit QLoRA base gets its fp32 truth from the dequantized weights (`_fp32_twin`): compiled QLoRA rounds
    # differently from PEFT's eager bf16 as well (3.9% on the logits, same H200 run).
    fp32_truth = True

    def _fp32_twin(self, name: str):
        """The reference implementation's model with the same weights and adapters, all in fp32."""
        return self._peft_model(name).float()

    def _reference(self) -> dict:
        """The outputs every implementation is checked against: HF PEFT's when it is installed (an independent
        implementation), else peft_fast's torch path. Refuses to check against adapters too small to tell a
        missing or mis-scaled LoRA term from rounding."""
        if self.reference is None:
            name = "peft" if hf_peft() is not None else "peft_fast"
            with backend("torch" if name == "peft_fast" else None):
                model = self._peft_model(name)
                reference = self._outputs(model)
                with model.disable_adapter(), torch.no_grad(), self._autocast():
                    plain = model(input_ids=self.ids[0], use_cache=False).logits.float()
                del model
                truth = None
                if self.fp32_truth and self.dtype != torch.float32:
                    truth = self._outputs(self._fp32_twin(name), autocast=False)
            effect = _rel_err(plain, reference["logits"])
            if effect < 5 * tolerance(self.dtype):
                raise RuntimeError(f"the adapters change the logits by {effect:.2e} only: too little to check")
            if truth is not None:  # the reference's own rounding error, which every implementation may have
                truth["own"] = self._errors(reference, truth)
                reference = truth
            self.reference = reference
        return self.reference

    @staticmethod
    def _errors(got: dict, reference: dict) -> tuple[float, Optional[float]]:
        """(logits, adapter grads) relative errors; grads None when either side has none, inf for other shapes."""
        logits = _rel_err(got["logits"], reference["logits"])
        if got["grads"] is None or reference["grads"] is None:
            return logits, None
        if got["grads"].shape != reference["grads"].shape:
            return logits, float("inf")
        return logits, _rel_err(got["grads"], reference["grads"])

    def _check(self, model) -> float:
        """Relative error against the reference: the larger of the logits' and (over GRAD_SLACK) the adapter
        gradients', each less the reference implementation's own (fp32 reference). Dropping the LoRA term,
        mis-scaling it or losing its gradients exceeds the tolerance."""
        reference, got = self._reference(), self._outputs(model)
        logits, grads = self._errors(got, reference)
        own_logits, own_grads = reference.get("own", (0.0, 0.0))
        err = max(0.0, logits - own_logits)
        self.check_detail = f"logits rel. err {logits:.3g}"
        if grads is not None:
            err = max(err, (grads - (own_grads or 0.0)) / GRAD_SLACK)
            self.check_detail += f", adapter grads {grads:.3g} (counted / {GRAD_SLACK})"
        if "own" in reference:
            self.check_detail += (f"; vs fp32, net of the reference's own bf16 error (logits {own_logits:.3g}"
                                  + (f", grads {own_grads:.3g})" if own_grads is not None else ")"))
        return err


GRAD_SLACK = 3.0  # gradients of a bf16 model may differ three times as much as its logits before they count as wrong


@dataclass
class ModelTrainCase(_ModelCase):
    """A training step (forward, backward, AdamW) of a Llama-shaped model with LoRA on all seven projections."""

    shape: LlamaShape
    batch: int
    seq: int
    r: int = 16
    dropout: float = 0.05
    group: str = "model"
    builders: dict = field(default_factory=dict)
    max_repeats = 10  # a step of the 1.1B model takes about a second
    # the forced-Triton path is timed in the layer suite; "peft_fast compile" compiles each decoder layer, "… +graphs"
    # replays them as CUDA graphs too (CUDA only)
    impl_names = ("base", "peft", "peft_fast", "peft_fast compile", "peft_fast compile+graphs")

    @property
    def id(self) -> str:
        s = self.shape
        return f"train h{s.hidden} L{s.layers} {self.batch}x{self.seq} r{self.r}"

    @property
    def params(self) -> dict:
        return dict(hidden=self.shape.hidden, layers=self.shape.layers, batch=self.batch, seq=self.seq, r=self.r)

    def prepare(self, device, dtype) -> None:
        super().prepare(device, dtype)
        g = torch.Generator().manual_seed(3)
        self.ids = [torch.randint(0, self.shape.vocab, (self.batch, self.seq), generator=g).to(device)
                    for _ in range(2)]
        self.n_inputs = 2

    def build(self, name: str) -> Optional[Impl]:
        if name in self.builders:
            return self.builders[name](self, self.device, self.dtype)
        tokens = self.batch * self.seq
        if name == "base":  # forward + backward to the inputs of a frozen model: the floor a LoRA step sits on
            model = copy.deepcopy(self.cpu_model).to(self.device)
            model.enable_input_require_grads()
            model.train()

            def base_step(i):
                with self._autocast():
                    loss = model(input_ids=self.ids[i], labels=self.ids[i], use_cache=False).loss
                loss.backward()

            return Impl(step=base_step, units=tokens, extra={"model": model})
        if name == "peft_fast triton":
            return with_backend(self.build("peft_fast"), "triton")
        self._reference()
        library, _, variant = name.partition(" ")
        if variant and variant not in COMPILE_VARIANTS:
            raise ValueError(f"unknown implementation {name!r}")
        model = self._peft_model(library)
        if model is None:
            return None
        model.train()
        if variant:
            compile_decoder_layers(model, COMPILE_VARIANTS[variant])
        graphs = COMPILE_VARIANTS.get(variant) == "reduce-overhead"
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(i):
            if graphs:  # a new training step: the graphs' previous outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with self._autocast():
                loss = model(input_ids=self.ids[i], labels=self.ids[i], use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # CUDA graphs keep their activations in a private pool that replays never allocate from: the peak of a
        # replayed step would leave it out, so the runner measures these over the steps that record the graphs
        return Impl(step=step, check=lambda: self._check(model), units=tokens,
                    extra={"model": model, "optimizer": optimizer, "peak_while_recording": graphs})


@dataclass
class QLoraTrainCase(ModelTrainCase):
    """The training step of ModelTrainCase with the base model's linears in NF4 (double quantization, computing in
    `dtype`), as QLoRA trains. The bare base stays the unquantized model. Needs bitsandbytes."""

    group: str = "qlora model"
    # the compiled rows: bitsandbytes' layer breaks the graph on CUDA and dynamo hits its recompile limit, so each
    # costs minutes of compiling for a row slower than eager; the quick suite leaves them out (3-minute budget)
    compile_rows: bool = True

    @property
    def id(self) -> str:
        return "qlora " + super().id

    @property
    def impl_names(self) -> tuple[str, ...]:
        names = ModelTrainCase.impl_names
        return names if self.compile_rows else tuple(n for n in names if "compile" not in n)

    def prepare(self, device, dtype) -> None:
        super().prepare(device, dtype)
        from ..tuners.lora.bnb import is_bnb_available
        from .quantized import quantize_linears

        self.bnb = is_bnb_available()
        self.unquantized = self.cpu_model
        if self.bnb:  # quantized on the device (its linears then live there; each impl copies the model anyway)
            self.cpu_model = quantize_linears(copy.deepcopy(self.unquantized), compute_dtype=dtype,
                                              compress_statistics=True, device=device)

    def release(self) -> None:
        super().release()
        self.__dict__.pop("unquantized", None)

    def _fp32_twin(self, name: str):
        """The NF4 base computes in bf16 / fp16 only: the fp32 truth is the same adapters over plain fp32 linears
        holding the dequantized NF4 weights (exactly the values the 4-bit layers compute with)."""
        from .quantized import dequantize_linears

        quantized, self.cpu_model = self.cpu_model, dequantize_linears(copy.deepcopy(self.cpu_model))
        try:
            return self._peft_model(name).float()
        finally:
            self.cpu_model = quantized

    def build(self, name: str) -> Optional[Impl]:
        if name == "base" and name not in self.builders:
            quantized, self.cpu_model = self.cpu_model, self.unquantized
            try:
                return super().build(name)
            finally:
                self.cpu_model = quantized
        if not self.bnb and name not in self.builders:
            return None
        return super().build(name)


@dataclass
class DecodeCase(_ModelCase):
    """Greedy decoding, time per generated token, with the adapter unmerged or merged into the weights."""

    shape: LlamaShape
    batch: int = 1
    prompt: int = 32
    new_tokens: int = 32
    r: int = 16
    dropout: float = 0.0
    group: str = "decode"
    builders: dict = field(default_factory=dict)
    max_repeats = 5
    interleave = True  # host-bound: every implementation timed in the same rounds (runner.run_case)

    @property
    def id(self) -> str:
        return f"decode h{self.shape.hidden} L{self.shape.layers} b{self.batch} r{self.r}"

    @property
    def params(self) -> dict:
        return dict(hidden=self.shape.hidden, layers=self.shape.layers, batch=self.batch, new_tokens=self.new_tokens)

    impl_names = ("base", "peft", "peft_fast", "peft merged", "peft_fast merged")

    def prepare(self, device, dtype) -> None:
        super().prepare(device, dtype)
        g = torch.Generator().manual_seed(4)
        self.ids = [torch.randint(0, self.shape.vocab, (self.batch, self.prompt), generator=g).to(device)]
        self.n_inputs = 1

    def _generate(self, model):
        def step(i):
            with torch.no_grad(), self._autocast():
                model.generate(input_ids=self.ids[0], attention_mask=torch.ones_like(self.ids[0]),
                               max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, do_sample=False,
                               pad_token_id=0)
        return step

    def build(self, name: str) -> Optional[Impl]:
        if name in self.builders:
            return self.builders[name](self, self.device, self.dtype)
        if name == "base":
            model = copy.deepcopy(self.cpu_model).to(self.device)
            return Impl(step=self._generate(model), units=self.batch * self.new_tokens, extra={"model": model})
        lib_name, merged = name.split(" ")[0], name.endswith("merged")
        self._reference()
        model = self._peft_model(lib_name)
        if model is None:
            return None
        model.eval()
        if merged:
            model = model.merge_and_unload()
        return Impl(step=self._generate(model), check=lambda: self._check(model), units=self.batch * self.new_tokens,
                    extra={"model": model})


# ------------------------------------------------------------------------------------------------ suites
def suites(device: torch.device, quick: bool) -> dict[str, list]:
    """The embedded suites, sized for the device: GPU shapes on CUDA, small shapes (minutes on 2 cores) on CPU."""
    if device.type == "cuda":
        layer = []
        big = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 4096, 4096, 64)]
        for m, k, n, r in big[:1] if quick else big:
            for p in (0.0, 0.1):
                for bwd in (False, True):
                    layer.append(LayerCase(m, k, n, r, p, bwd))
        layer += [LayerCase(16, 4096, 4096, 16, group="layer decode"), LayerCase(1, 4096, 4096, 16, group="layer decode")]
        qlora = [QLoraLayerCase(8192, 4096, 4096, 16, 0.0, True, triton_row=not quick),
                 QLoraLayerCase(16, 4096, 4096, 16, triton_row=not quick),
                 QLoraLayerCase(1, 4096, 4096, 16, triton_row=not quick)]
        shape, batch, seq = (LLAMA_1B, 4, 2048) if not quick else (LLAMA_1B, 2, 1024)
        model = [ModelTrainCase(shape, batch, seq)]
        qlora.append(QLoraTrainCase(shape, batch, seq, compile_rows=not quick))
        decode = [DecodeCase(LLAMA_1B, new_tokens=16 if quick else 64)]
    else:
        layer = [LayerCase(256, 256, 256, 16, p, bwd) for p in (0.0, 0.1) for bwd in (False, True)]
        layer += [LayerCase(1, 256, 256, 16, group="layer decode")]
        if quick:
            layer = [layer[0], layer[3], layer[4]]
        # bitsandbytes 0.50's CPU kernels dequantize double-quantized fp32 weights wrongly: single quantization here
        qlora = [QLoraLayerCase(256, 256, 256, 16, 0.0, True, double_quant=False)]
        model = [ModelTrainCase(LLAMA_TINY, 2, 32 if quick else 64)]
        qlora.append(QLoraTrainCase(LLAMA_TINY, 2, 32, compile_rows=not quick))
        decode = [DecodeCase(LLAMA_TINY, prompt=8, new_tokens=4 if quick else 8)]
    from .consumer import consumer_cases

    consumer = consumer_cases(device, quick)
    return {"layer": layer, "qlora": qlora, "model": model, "decode": decode, "consumer": consumer,
            # (the 7B case takes minutes: in "all" only for a full GPU run; its CPU size is only a code-path check)
            "all": layer + qlora + model + decode + (consumer if device.type == "cuda" and not quick else [])}
