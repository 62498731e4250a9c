"""CorDA initialisation (context-oriented decomposition adaptation; PEFT's `peft.tuners.lora.corda`).

Before `get_peft_model(model, LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(...)))`, call
`preprocess_corda(model, config, run_model=...)`: `run_model` runs the model on a few calibration samples while
hooks sum, per targeted linear layer, the covariance C = Σ xᵀx of its (max-normalised) inputs. Each layer's weight
is then decomposed as SVD(W·C) = U S Vh, and V = (Vh C⁻¹)ᵀ, so that W = U S Vᵀ with the directions ordered by how
much the calibration context uses them. "ipm" keeps the r largest triplets for the adapter (fast adaptation to the
task the samples preview), "kpm" the r smallest (the knowledge the samples exercise stays in the frozen residual).
The adapter starts at A = √S' Vᵀ, B = U √S' with S' = S / scaling, and the base weight keeps W − scaling·B·A, so
the model's output is unchanged at the start (LoRA layer: `LoraLayer.corda_init`).

C is made invertible with the least diagonal damping (doubling from 1 % of its mean diagonal) for which
‖C·C⁻¹ − I‖ < 0.05. Results can be cached (`cache_file`: the cropped triplets; `covariance_file`: the covariances).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ...utils.other import get_pattern_key, transpose
from ..tuners_utils import check_target_module_exists
from .config import LoraConfig
from .layer import _conv1d_class


@dataclass
class CordaEigens:
    S_WC: torch.Tensor  # the kept singular values (r)
    U_WC: torch.Tensor  # left singular vectors (out × r)
    V_WC: torch.Tensor  # right singular vectors times C⁻¹ (in × r)


def target_modules(model: nn.Module, config: LoraConfig) -> Iterable[tuple[str, nn.Module]]:
    """(name, module) of each Linear / Conv1D layer `config` targets."""
    linear_types = (nn.Linear,) + ((_conv1d_class(),) if _conv1d_class() is not None else ())
    for name, module in model.named_modules():
        if isinstance(module, linear_types) and check_target_module_exists(config, name):
            yield name, module


def _device(model: nn.Module) -> torch.device:
    model = getattr(model, "module", model)  # DataParallel / DeepSpeed wrappers
    return next(iter(model.parameters())).device


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out × in) in fp32 (Conv1D stores in × out)."""
    conv1d = _conv1d_class()
    return transpose(module.weight.data.float(), conv1d is not None and isinstance(module, conv1d))


def preprocess_corda(model: nn.Module, lora_config: LoraConfig, run_model: Optional[Callable[[], None]] = None,
                     hooked_model: Optional[nn.Module] = None) -> None:
    """Attach to every targeted layer of `model` the CorDA triplets (`module.eigens`) that `get_peft_model` with
    init_lora_weights='corda' builds the adapter from. `run_model()` runs the calibration samples (on
    `hooked_model` when given, e.g. another copy of the model); it is not needed when the config's cache or
    covariance file already exists."""
    config = lora_config.corda_config
    if config is None:
        raise ValueError("preprocess_corda needs lora_config.corda_config (and init_lora_weights='corda').")
    targets = list(target_modules(model, lora_config))
    if not targets:
        raise ValueError(f"preprocess_corda: target_modules {lora_config.target_modules} match no Linear layer.")
    device = _device(model)
    if config.cache_file is not None and os.path.exists(config.cache_file) and os.path.getsize(config.cache_file):
        cache = torch.load(config.cache_file, map_location=device, weights_only=True)
        for name, module in targets:
            module.eigens = CordaEigens(*(cache[f"{name}.eigens.{part}"] for part in ("S_WC", "U_WC", "V_WC")))
        return

    for name, module in targets:
        module.corda_method = config.corda_method
        module.rank = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), name), lora_config.r)
    _calibrate(model, lora_config, targets, run_model, hooked_model)
    for _, module in targets:
        module.eigens = _cropped(_eigens(module), module.corda_method, module.rank, module, device)
    if config.prune_temporary_fields:
        for _, module in targets:
            for attr in ("sample_count", "covariance_matrix", "corda_method", "rank"):
                if hasattr(module, attr):
                    delattr(module, attr)
    if config.cache_file is not None:
        cache = {f"{name}.eigens.{part}": getattr(module.eigens, part)
                 for name, module in targets for part in ("S_WC", "U_WC", "V_WC")}
        os.makedirs(os.path.dirname(os.path.abspath(config.cache_file)), exist_ok=True)
        torch.save(cache, config.cache_file)


@torch.no_grad()
def _calibrate(model: nn.Module, lora_config: LoraConfig, targets: list[tuple[str, nn.Module]],
               run_model: Optional[Callable[[], None]], hooked_model: Optional[nn.Module]) -> None:
    """Set `covariance_matrix` (the mean of the samples' xᵀx) and `sample_count` on every target."""
    config = lora_config.corda_config
    path = config.covariance_file
    if path is not None and os.path.exists(path) and os.path.getsize(path):
        covariances = torch.load(path, map_location=_device(model), weights_only=True)
        for name, module in targets:
            module.covariance_matrix = covariances[name]
        return
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()
    hooked_targets = list(target_modules(hooked, lora_config)) if hooked is not model else targets

    def hook(module, inputs, output):
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if not config.use_float16_for_covariance:
            x = x.float()
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ValueError("Invalid value found in input, please check your input data.")
        covariance = x.t() @ x
        if not torch.isfinite(covariance).all():
            raise ValueError("Invalid value found in the input covariance (overflow; use fp32 covariances).")
        module.sample_count += 1
        module.covariance_matrix = module.covariance_matrix + covariance

    handles = []
    for _, module in hooked_targets:
        module.sample_count, module.covariance_matrix = 0, 0
        handles.append(module.register_forward_hook(hook))
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    if hooked is not model:  # layers used only by the hooked model are left out
        by_name = dict(hooked_targets)
        for name, module in targets:
            if name in by_name:
                module.sample_count = by_name[name].sample_count
                module.covariance_matrix = by_name[name].covariance_matrix
    for name, module in targets:
        if not getattr(module, "sample_count", 0):
            raise ValueError(f"preprocess_corda: layer {name} saw no input while run_model() ran.")
        module.covariance_matrix = module.covariance_matrix / module.sample_count
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({name: module.covariance_matrix for name, module in targets}, path)


@torch.no_grad()
def _eigens(module: nn.Module) -> CordaEigens:
    """SVD of W·C with C damped until invertible; V = (Vh C⁻¹)ᵀ (all min(out, in) triplets)."""
    if not hasattr(module, "covariance_matrix"):
        raise ValueError("Covariance matrix not found in the layer: call preprocess_corda, not its parts.")
    w = _weight_out_in(module)
    covariance = module.covariance_matrix.float()
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    damp = 0.01
    while True:
        damped = covariance + eye * (torch.mean(torch.diag(covariance)) * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ damped, full_matrices=False)
    return CordaEigens(S_WC=s, U_WC=u.cpu(), V_WC=(vh @ inverse).t().cpu())  # U, V are large: off the GPU for now


def _cropped(eigens: CordaEigens, method: str, rank: int, module: nn.Module, device: torch.device) -> CordaEigens:
    """The r triplets the method keeps: the largest ('ipm') or the smallest ('kpm')."""
    if method not in ("ipm", "kpm"):
        raise ValueError(f"Invalid corda_method found: {method}, it should be 'ipm' or 'kpm'.")
    if rank > eigens.S_WC.shape[0]:
        raise ValueError(f"rank {rank} is larger than the layer allows ({eigens.S_WC.shape[0]} singular values)")
    part = slice(None, rank) if method == "ipm" else slice(-rank, None)
    # copies, so that a saved cache holds only the kept columns
    return CordaEigens(S_WC=eigens.S_WC[part].clone(), U_WC=eigens.U_WC[:, part].clone().to(device),
                       V_WC=eigens.V_WC[:, part].clone().to(device))
