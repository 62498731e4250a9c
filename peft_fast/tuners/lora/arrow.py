"""Arrow: per-token routing over a library of LoRA adapters (arXiv 2405.11157), and GenKnowSub (ACL 2025 short 54).

`create_arrow_model` loads task-specific adapters (named task_0, task_1 …) and optionally general-knowledge ones
(gks_0 …) into one PeftModel, then adds the router adapter "arrow_router" (a LoraConfig with `arrow_config`) and makes
it the active one. In each Linear LoRA layer the router (`ArrowRouter`, in the layer's `lora_arrow`) then adds

    Σ_e c_e(x) · s_e · B_e A_e x,   c(x) = softmax over the top_k experts of |x · p_e| / temperature

where p_e, the expert's prototype, is the top right singular vector of its ΔW = B_e A_e (power iteration on
A_eᵀ(B_eᵀB_e)A_e, never forming ΔW). The router's own lora_A / lora_B are not used. With GenKnowSub, before the first
routed forward, the mean A and mean B of the general adapters are subtracted from every task adapter (in place).
Adding or deleting a task adapter later refreshes the router (prototypes rebuilt; a new adapter gets GenKnowSub).
Routing is per token, so the router cannot be merged into the weights.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from .config import ArrowConfig

TASK_ADAPTER_PREFIX = "task_"
GKS_ADAPTER_PREFIX = "gks_"
ROUTER_ADAPTER_NAME = "arrow_router"
POWER_ITERATIONS = 15


def _is_general_adapter(name: str) -> bool:
    return name.startswith(GKS_ADAPTER_PREFIX) and name[len(GKS_ADAPTER_PREFIX):].isdigit()


class ArrowRouter(nn.Module):
    """The routing state of one Linear layer: the task adapters it routes over, their prototypes (rebuilt lazily
    after a change) and whether GenKnowSub has been applied. Holds no parameters: nothing of it is saved."""

    def __init__(self, in_features: int, arrow_config: ArrowConfig):
        super().__init__()
        self.in_features = in_features
        self.top_k = arrow_config.top_k
        self.temperature = arrow_config.router_temperature
        self.rng_seed = arrow_config.rng_seed
        self.use_gks = arrow_config.use_gks
        self.task_adapter_names = list(arrow_config.task_adapter_names or [])
        self.gks_adapter_names = list(arrow_config.gks_adapter_names or [])
        self.gks_done = False
        self.pending_gks = []  # task adapters added after GenKnowSub ran: they get it on the next forward
        self.register_buffer("prototypes", None, persistent=False)  # experts × in; moves with the model, not saved

    @torch.no_grad()
    def refresh(self, lora_A: nn.ModuleDict, lora_B: nn.ModuleDict, routers) -> None:
        """Follow the layer's adapters after one was added or deleted: every adapter with A and B that is neither a
        router (`routers`: the layer's) nor a general one is a task expert; new ones are queued for GenKnowSub, and
        the prototypes are rebuilt."""
        names = [name for name in lora_A if name in lora_B and name not in routers and name != ROUTER_ADAPTER_NAME
                 and not _is_general_adapter(name)]
        if sorted(names) == sorted(self.task_adapter_names):
            return
        if self.gks_done:
            self.pending_gks += [name for name in names if name not in self.task_adapter_names]
        self.pending_gks = [name for name in self.pending_gks if name in names]
        self.task_adapter_names = names
        self.prototypes = None

    def _top_right_singular_vector(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The top right singular vector of B·A (fp32, up to sign): power iteration on v ↦ Aᵀ(BᵀB)(A v) from a
        random start (rng_seed's generator where set), POWER_ITERATIONS steps."""
        A, B = A.float(), B.float()
        gram = B.T @ B  # r × r
        generator = None
        if self.rng_seed is not None:
            generator = torch.Generator(device=A.device.type)
            generator.manual_seed(int(self.rng_seed))
        v = torch.randn(A.shape[1], dtype=A.dtype, device=A.device, generator=generator)
        v = v / (v.norm() + 1e-8)
        for _ in range(POWER_ITERATIONS):
            v = A.T @ (gram @ (A @ v))
            v = v / (v.norm() + 1e-8)
        return v

    @torch.no_grad()
    def _prepare(self, lora_A: nn.ModuleDict, lora_B: nn.ModuleDict) -> None:
        """GenKnowSub where due, then the prototypes where missing (both before the first routed forward)."""
        if self.use_gks and (not self.gks_done or self.pending_gks):
            missing = [name for name in self.gks_adapter_names if name not in lora_A]
            if missing or not self.gks_adapter_names:
                raise ValueError(f"GenKnowSub needs the general adapters {self.gks_adapter_names} in this layer; "
                                 f"missing {missing or self.gks_adapter_names}")
            mean_A = torch.stack([lora_A[name].weight for name in self.gks_adapter_names]).mean(0)
            mean_B = torch.stack([lora_B[name].weight for name in self.gks_adapter_names]).mean(0)
            for name in (self.pending_gks if self.gks_done else self.task_adapter_names):
                lora_A[name].weight.data.sub_(mean_A)
                lora_B[name].weight.data.sub_(mean_B)
            self.gks_done, self.pending_gks = True, []
        if self.prototypes is None:
            if not self.task_adapter_names:
                raise ValueError("The Arrow router of this layer has no task adapters to route over.")
            if self.top_k > len(self.task_adapter_names):
                raise ValueError(f"Arrow's top_k ({self.top_k}) is larger than the number of task adapters "
                                 f"({len(self.task_adapter_names)}).")
            first = lora_A[self.task_adapter_names[0]].weight
            vectors = [self._top_right_singular_vector(lora_A[name].weight, lora_B[name].weight)
                       for name in self.task_adapter_names]
            self.prototypes = torch.stack(vectors).to(device=first.device, dtype=first.dtype)  # experts × in

    def forward(self, x: torch.Tensor, lora_A: nn.ModuleDict, lora_B: nn.ModuleDict, dropout: nn.Module,
                scaling: dict, cast_input: bool = True) -> torch.Tensor:
        """The routed LoRA term for `x` (… × in_features), to add to the base output."""
        self._prepare(lora_A, lora_B)
        names = self.task_adapter_names
        dtype = lora_A[names[0]].weight.dtype
        if cast_input and x.dtype != dtype:
            x = x.to(dtype)
        tokens = x.reshape(-1, x.shape[-1])
        # coefficients: |token · prototype| over the top_k experts, softmax at the temperature (0 elsewhere)
        similarity = (tokens @ self.prototypes.T).abs()
        top, index = similarity.topk(self.top_k, dim=1)
        scores = torch.full_like(similarity, float("-inf")).scatter(1, index, top)
        coefficients = torch.softmax(scores / self.temperature, dim=1)  # tokens × experts
        A = torch.stack([lora_A[name].weight for name in names])  # experts × r × in
        B = torch.stack([lora_B[name].weight for name in names])  # experts × out × r
        scales = torch.tensor([scaling[name] for name in names], device=tokens.device, dtype=tokens.dtype)
        low = torch.einsum("ti,eri->ter", tokens, A)
        expert_out = torch.einsum("ter,eor->teo", low, B) * scales[None, :, None]
        delta = torch.einsum("te,teo->to", coefficients, expert_out)
        return dropout(delta).reshape(*x.shape[:-1], delta.shape[-1])


def _adapter_layers(model: nn.Module, name: str):
    """(module name, LoRA layer) of every layer holding adapter `name`'s A and B."""
    from .layer import LoraLayer

    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            yield module_name, module


def check_loaded_lora_compatibility_arrow(model: nn.Module, adapter_names: list[str]) -> tuple[list[str], int]:
    """The target module names (last name component, sorted) and the rank the adapters `adapter_names` share; a
    ValueError naming the first that differs in rank, weight shapes or targets."""
    reference = None
    for name in adapter_names:
        modules, rank, shapes = set(), None, None
        for module_name, layer in _adapter_layers(model, name):
            modules.add(module_name.split(".")[-1])
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            rank, shapes = A.shape[0], (tuple(A.shape), tuple(B.shape))
        if reference is None:
            reference = (rank, shapes, modules)
            continue
        if rank != reference[0]:
            raise ValueError(f"[{name}] rank mismatch: {rank} != {reference[0]}")
        if shapes != reference[1]:
            raise ValueError(f"[{name}] shape mismatch: {shapes} != {reference[1]}")
        if modules != reference[2]:
            raise ValueError(f"[{name}] target_modules mismatch:\n  this adapter -> {sorted(modules)}\n"
                             f"  reference   -> {sorted(reference[2])}")
    return sorted(reference[2]), int(reference[0])


def ensure_adapters_target_linear_layers_only(model: nn.Module, adapter_names: list[str]) -> None:
    """A TypeError listing every layer of `adapter_names` that is not Linear-like (nn.Linear, nn.Conv1d,
    transformers' Conv1D, bitsandbytes' Linear4bit): Arrow routes those only."""
    allowed = [nn.Linear, nn.Conv1d]
    try:
        from transformers.pytorch_utils import Conv1D

        allowed.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    offenders = []
    for name in adapter_names:
        for module_name, layer in _adapter_layers(model, name):
            base = layer.get_base_layer()
            bnb_4bit = type(base).__name__ == "Linear4bit" and type(base).__module__.startswith("bitsandbytes")
            if not isinstance(base, tuple(allowed)) and not bnb_4bit:
                offenders.append(f"  - adapter '{name}' on module '{module_name}' of type {type(base).__name__}")
    if offenders:
        raise TypeError("LoRA adapters must only target Linear-like layers (nn.Linear, nn.Conv1d, HF Conv1D, or "
                        "bitsandbytes.nn.Linear4bit). Found:\n" + "\n".join(offenders))


def _adapter_source(path: str) -> tuple[str, Optional[str]]:
    """(model_id, subfolder) of an adapter path: a local folder with adapter_config.json, or a Hub id
    'user/repo[/sub/folder]'."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"Local adapter path '{path}' does not contain 'adapter_config.json'.")
        return path, None
    parts = path.strip("/").split("/")
    if len(parts) > 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return ("/".join(parts) if len(parts) == 2 else path), None


def create_arrow_model(base_model: nn.Module, task_specific_adapter_paths: list[str], arrow_config: ArrowConfig,
                       general_adapter_paths: Optional[list[str]] = None, **adapter_kwargs: Any):
    """A PeftModel routing over the adapters at `task_specific_adapter_paths` (loaded as task_0, task_1 …) with
    Arrow, and with GenKnowSub over those at `general_adapter_paths` (gks_0 …) where arrow_config.use_gks; the
    router adapter "arrow_router" is added and made active. The adapters must share their rank and target modules
    and target Linear-like layers only. `adapter_kwargs` go to each load (subfolder, revision …)."""
    from ...peft_model import PeftModel
    from .config import LoraConfig

    if not task_specific_adapter_paths:
        raise ValueError("`task_specific_adapter_paths` should contain at least one adapter path")
    if arrow_config.use_gks and not general_adapter_paths:
        raise ValueError("You should provide general LoRA paths if you want to use GenKnowSub.")

    def load_kwargs(path: str) -> tuple[str, dict]:
        model_id, subfolder = _adapter_source(path)
        kwargs = dict(adapter_kwargs)
        if subfolder is not None:
            kwargs.setdefault("subfolder", subfolder)
        return model_id, kwargs

    model_id, kwargs = load_kwargs(task_specific_adapter_paths[0])
    model = PeftModel.from_pretrained(base_model, model_id, adapter_name=f"{TASK_ADAPTER_PREFIX}0", **kwargs)
    for i, path in enumerate(task_specific_adapter_paths[1:], start=1):
        model_id, kwargs = load_kwargs(path)
        model.load_adapter(model_id, adapter_name=f"{TASK_ADAPTER_PREFIX}{i}", **kwargs)
    arrow_config.task_adapter_names = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    arrow_config.gks_adapter_names = []
    if arrow_config.use_gks:
        for i, path in enumerate(general_adapter_paths):
            model_id, kwargs = load_kwargs(path)
            model.load_adapter(model_id, adapter_name=f"{GKS_ADAPTER_PREFIX}{i}", **kwargs)
        arrow_config.gks_adapter_names = [f"{GKS_ADAPTER_PREFIX}{i}" for i in range(len(general_adapter_paths))]
    names = arrow_config.task_adapter_names + arrow_config.gks_adapter_names
    target_modules, rank = check_loaded_lora_compatibility_arrow(model, names)
    ensure_adapters_target_linear_layers_only(model, names)
    model.add_adapter(ROUTER_ADAPTER_NAME, LoraConfig(arrow_config=arrow_config, target_modules=target_modules,
                                                      r=rank))
    model.set_adapter(ROUTER_ADAPTER_NAME)
    return model
