"""Hot-swapping LoRA adapters (PEFT's `peft.utils.hotswap` API): replace a loaded adapter's weights and scalings in
place, under the same name, so that a model compiled with torch.compile keeps its graphs.

    model = PeftModel.from_pretrained(base, "adapter-0")
    prepare_model_for_compiled_hotswap(model, target_rank=64)   # only if ranks / alphas differ; before compiling
    model = torch.compile(model)
    hotswap_adapter(model, "adapter-1", adapter_name="default")  # no recompilation

What changes in place: each adapter tensor (copied into the existing one; a smaller rank goes into its leading rows or
columns, the rest zeroed; a larger rank replaces the layer's lora_A / lora_B modules, which a compiled model does not
survive: pad with `prepare_model_for_compiled_hotswap` first) and each layer's scaling (a float, or the 0-dim tensor
that `prepare_model_for_compiled_hotswap` made of it, filled). Layers the new adapter does not cover get zero
weights. The adapter's config in `model.peft_config` stays the one it was loaded with, as in PEFT.

Unlike PEFT, everything is checked before anything is written: an adapter that targets other layers, or a weight of
a shape that cannot go in, raises and leaves the model as it was.

Tensor scalings and the fused paths: a 0-dim tensor scaling would have to be read on the host (a device sync per
layer) to reach the CUDA kernels, so eager calls with one run on the torch path (same numbers); under torch.compile
the traced arithmetic takes it as a tensor.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional, Union

import torch
from torch import nn

from ..config import PeftConfig
from .other import get_pattern_key, infer_device
from .peft_types import PeftType
from .save_and_load import _insert_adapter_name, load_peft_weights

# config fields that change a model's output beyond its weights and that a swap does not carry over
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}


def _lora_layers(model: nn.Module):
    from ..tuners.lora.layer import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def _scalings_to_tensors(model: nn.Module) -> None:
    """Every LoRA scaling becomes a 0-dim tensor on its layer's device (torch.compile then guards on no value)."""
    layers = _lora_layers(model)
    for _, layer in layers:
        device = next((p.device for p in layer.get_base_layer().parameters()), torch.device("cpu"))
        for adapter, value in layer.scaling.items():
            if isinstance(value, torch.Tensor):
                continue
            if not isinstance(value, (int, float)):
                raise TypeError(f"LoRA scaling of adapter '{adapter}' is a {type(value).__name__}, expected a float")
            layer.scaling[adapter] = torch.tensor(float(value), device=device)


def _padded(module: nn.Module, target_rank: int, rank_dim: int, where: str) -> nn.Module:
    """`module` (a LoRA A or B: nn.Linear or nn.ConvNd) with its rank dimension zero-padded to target_rank."""
    weight = module.weight
    rank = weight.shape[rank_dim]
    if rank == target_rank:
        return module
    if rank > target_rank:
        raise ValueError(f"{where}: rank {rank} is larger than target_rank {target_rank}; pass the largest rank of "
                         "the adapters you will swap in")
    if isinstance(module, nn.Linear):
        new = nn.Linear(target_rank if rank_dim == 1 else module.in_features,
                        target_rank if rank_dim == 0 else module.out_features,
                        bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups > 1:
            raise ValueError(f"{where}: padding a grouped conv adapter (groups={module.groups}) is not supported")
        new = type(module)(target_rank if rank_dim == 1 else module.in_channels,
                           target_rank if rank_dim == 0 else module.out_channels,
                           module.kernel_size, module.stride, module.padding, module.dilation,
                           bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
    else:
        raise ValueError(f"{where}: cannot pad an adapter module of type {type(module).__name__}")
    with torch.no_grad():
        new.weight.zero_()
        new.weight.narrow(rank_dim, 0, rank).copy_(weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.weight.requires_grad_(weight.requires_grad)
    if module.bias is not None:
        new.bias.requires_grad_(module.bias.requires_grad)
    return new


def _pad_ranks(model: nn.Module, target_rank: int) -> None:
    """Zero-pad every LoRA A / B module of Linear and conv layers to target_rank (outputs unchanged)."""
    layers = [(name, layer) for name, layer in _lora_layers(model) if len(layer.lora_A) > 0]
    padded = {}
    for name, layer in layers:  # all built first: a failure leaves every layer as it was
        for adapter in layer.lora_A:
            where = f"{name} adapter '{adapter}'"
            padded[(name, adapter)] = (_padded(layer.lora_A[adapter], target_rank, 0, where),
                                       _padded(layer.lora_B[adapter], target_rank, 1, where))
    for name, layer in layers:
        for adapter in list(layer.lora_A):
            layer.lora_A[adapter], layer.lora_B[adapter] = padded[(name, adapter)]


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: Optional[int] = None,
    config: Optional[Union[PeftConfig, dict[str, PeftConfig]]] = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make a model with its first LoRA adapter loaded ready for compiled hot-swapping of adapters whose ranks or
    alphas differ: scalings become tensors and, with `target_rank` (the largest rank to come), every A / B is
    zero-padded to it. Call it after loading the first adapter and before torch.compile. With `config` (a LoraConfig
    or a dict of them, e.g. model.peft_config) its `r` and rank_pattern values become target_rank."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' "
                         "instead.")
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. This "
                          "will likely result in re-compilation, hurting performance. Call the function before "
                          "compiling the model.")
    if target_rank is not None and (not isinstance(target_rank, int) or target_rank <= 0):
        raise ValueError(f"target_rank must be a positive int, got {target_rank!r}")
    if not _lora_layers(model):
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    if target_rank is not None:
        _pad_ranks(model, target_rank)
    _scalings_to_tensors(model)
    if not config or target_rank is None:
        return
    for lora_config in (config.values() if isinstance(config, dict) else [config]):
        lora_config.r = target_rank
        for key in lora_config.rank_pattern or {}:
            lora_config.rank_pattern[key] = target_rank


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """ValueError unless an adapter of config1 can replace one of config0 in place (same PEFT type, and the same
    values of the fields a swap does not carry over: CONFIG_KEYS_TO_CHECK)."""
    type0, type1 = PeftType(config0.peft_type), PeftType(config1.peft_type)
    if type0 != type1:
        raise ValueError(f"Incompatible PEFT types found: {type0.value} and {type1.value}")
    if type0 not in CONFIG_KEYS_TO_CHECK:
        raise ValueError(f"Hotswapping only supports {', '.join(t.value for t in CONFIG_KEYS_TO_CHECK)} but "
                         f"{type0.value} was passed.")
    dict0, dict1 = config0.to_dict(), config1.to_dict()
    missing = object()
    for key in CONFIG_KEYS_TO_CHECK[type0]:
        val0, val1 = dict0.get(key, missing), dict1.get(key, missing)
        if val0 != val1:
            raise ValueError(f"Configs are incompatible: for {key}, {val0} != {val1}")


# the dimension that holds the rank, per adapter container (other containers, e.g. DoRA's magnitude, must match)
_RANK_DIM = {"lora_A": 0, "lora_B": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}


def _owner(key: str, prefix: str) -> tuple[str, str, str]:
    """(module path of the LoRA layer, container, adapter name) of an adapter tensor key such as
    `base_model.model.x.q_proj.lora_A.default.weight`; empty strings when the key holds no adapter container."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(prefix):
            return ".".join(parts[:i]), part, parts[i + 1]
    return "", "", ""


def _new_scaling(config, layer_path: str, rank: int) -> float:
    alpha = config.lora_alpha
    if config.alpha_pattern:
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), layer_path), alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _swap_plan(key: str, old: torch.Tensor, new: torch.Tensor, container: str, compiled: bool) -> str:
    """How `new` goes into `old`: "copy" (same shape), "pad" (a smaller rank), "grow" (a larger rank, uncompiled)."""
    if old.shape == new.shape:
        return "copy"
    dim = _RANK_DIM.get(container)
    other_dims_match = old.dim() == new.dim() and all(
        o == n for i, (o, n) in enumerate(zip(old.shape, new.shape)) if i != dim)
    if dim is not None and other_dims_match:
        if new.shape[dim] < old.shape[dim]:
            return "pad"
        if not compiled:
            return "grow"
        raise ValueError(f"Incompatible shapes found for LoRA weights {key}: {tuple(old.shape)} vs {tuple(new.shape)}. "
                         "Please ensure that all ranks are padded to the largest rank among all LoRA adapters by using "
                         "prepare_model_for_compiled_hotswap.")
    raise ValueError(f"Incompatible shapes found for LoRA weights {key}: {tuple(old.shape)} vs {tuple(new.shape)}.")


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: PeftConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Swap the weights of `adapter_name` for those of `state_dict` (keys with the adapter name, as the model names
    its parameters) and its scalings for those of `config`. Checks everything first: RuntimeError for keys the model
    does not have (an adapter targeting other layers), ValueError for shapes that cannot go in; the model is then
    unchanged."""
    root = getattr(model, "_orig_mod", model)
    compiled = _is_compiled(model)
    layers = dict(_lora_layers(root))
    merged = [name for name, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base "
                         f"weights ({merged[0]}). Please unmerge the adapter first by calling "
                         "`peft_model.unmerge_adapter()`.")
    params = dict(root.named_parameters())
    unexpected = sorted(key for key in state_dict if key not in params)
    if unexpected:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}.")
    plan = []  # every check passes before the first write
    for key, new in state_dict.items():
        layer_path, container, _ = _owner(key, parameter_prefix)
        plan.append((key, layer_path, container, new, _swap_plan(key, params[key], new, container, compiled)))
    ranks = {path: new.shape[0] for _, path, container, new, _ in plan if container in ("lora_A", "lora_embedding_A")}
    missing = [key for key in params if key not in state_dict and _owner(key, parameter_prefix)[2] == adapter_name
               and _owner(key, parameter_prefix)[0] in layers]

    with torch.no_grad():
        for key, layer_path, container, new, how in plan:
            if how != "grow":
                continue
            # a larger rank in an uncompiled model: the layer's A / B rebuilt at it (old weights zero-padded, then
            # overwritten below), before any copy, so that every copy goes into the tensors the model keeps
            holder = getattr(layers[layer_path], container)
            if isinstance(holder, nn.ParameterDict):
                old = holder[adapter_name]
                holder[adapter_name] = nn.Parameter(old.new_zeros(new.shape), requires_grad=old.requires_grad)
            else:
                dim = _RANK_DIM[container]
                holder[adapter_name] = _padded(holder[adapter_name], new.shape[dim], dim, layer_path)
        if any(how == "grow" for *_, how in plan):
            params = dict(root.named_parameters())
        for key in missing:  # layers the new adapter leaves out contribute nothing
            params[key].zero_()
        for key, _, container, new, how in plan:
            old = params[key]
            new = new.to(device=old.device, dtype=old.dtype)
            if how == "pad":
                dim = _RANK_DIM[container]
                old.zero_()
                old.narrow(dim, 0, new.shape[dim]).copy_(new)
            else:
                old.copy_(new)
        for layer_path, rank in ranks.items():
            layer = layers[layer_path]
            scaling = _new_scaling(config, layer_path, rank)
            if isinstance(layer.scaling.get(adapter_name), torch.Tensor):
                layer.scaling[adapter_name].fill_(scaling)
            else:
                layer.scaling[adapter_name] = scaling
            layer.r[adapter_name] = rank


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str,
    torch_device: Optional[str] = None,
    **kwargs,
) -> None:
    """Replace the weights (and scalings) of the loaded adapter `adapter_name` with those of the adapter saved at
    `model_name_or_path`, in place: the name stays, a compiled model keeps its graphs (see
    prepare_model_for_compiled_hotswap when ranks or alphas differ). Raises, leaving the model unchanged, when the
    configs are incompatible or the new adapter targets other layers."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or adapter_name not in peft_config:
        raise ValueError(f"hotswap_adapter: the model has no loaded adapter named '{adapter_name}' to swap")
    if torch_device is None:
        torch_device = infer_device()
    hub_kwargs = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs}
    config = PeftConfig.from_pretrained(str(model_name_or_path), **hub_kwargs)
    check_hotswap_configs_compatible(peft_config[adapter_name], config)
    state_dict = load_peft_weights(str(model_name_or_path), device=torch_device, **hub_kwargs)
    state_dict = {_insert_adapter_name(key, adapter_name): value for key, value in state_dict.items()}
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config, parameter_prefix="lora_")
