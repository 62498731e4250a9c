"""PiSSA / OLoRA adapters saved as plain LoRA: `save_pretrained(..., path_initial_model_for_weight_conversion=...)`.

PiSSA and OLoRA move part of each base weight into the adapter at initialisation (W = W_res + s·B₀A₀), so the trained
adapter only works on the residual base. Given the adapter saved right after initialisation, the training's effect
on the *original* base is ΔW = s·(B A − B₀ A₀) = s·[B | −B₀][A ; A₀]: a plain LoRA adapter of twice the rank, with
lora_alpha doubled as well (√2 with rsLoRA) so that its scaling stays s. Same files as PEFT writes.

`convert_to_lora` / `save_as_lora` (PEFT's names): methods that add a plain ΔW to a linear layer's weight (LoHa, LoKr,
LoRA itself) approximated by a LoRA of rank r: B·A = the best rank-r approximation of ΔW (truncated SVD, the singular
values on B), lora_alpha = r so that the scaling is 1. A float rank picks, per layer, the fewest singular values that
hold that share of ΔW's energy (rank_pattern / alpha_pattern). The result loads wherever LoRA does.
"""

from __future__ import annotations

import copy
import os
import pathlib
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ...utils.constants import SAFETENSORS_WEIGHTS_NAME
from ...utils.other import ModulesToSaveWrapper
from ...utils.peft_types import PeftType
from ..tuners_utils import BaseTunerLayer
from .config import LoraConfig
from .layer import _conv1d_class


def converted_config(config):
    """The config saved beside a converted adapter: plain init, rank (and alpha) doubled, patterns doubled."""
    out = copy.deepcopy(config)
    out.init_lora_weights = True
    out.r *= 2
    out.lora_alpha = out.lora_alpha * 2**0.5 if out.use_rslora else out.lora_alpha * 2
    out.rank_pattern = {key: 2 * value for key, value in (out.rank_pattern or {}).items()}
    out.alpha_pattern = {key: 2 * value for key, value in (out.alpha_pattern or {}).items()}
    return out


def check_convertible(config) -> None:
    if PeftType(config.peft_type) != PeftType.LORA:
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported for "
                         f"{PeftType(config.peft_type).value} adapters.")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
                         "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    if not str(config.init_lora_weights).lower().startswith(("pissa", "corda", "olora", "lora_ga", "true")):
        warnings.warn("`path_initial_model_for_weight_conversion` only works for converting a PiSSA/CorDA/OLoRA/LoRA-GA "
                      "adapter to a LoRA adapter")


def subtract_initial(peft_model, output_state_dict: dict, path_initial: str, state_dict=None) -> dict:
    """The trained adapter's A/B tensors (`output_state_dict`, saved keys) as [A ; A₀] and [B | −B₀], with A₀, B₀
    the adapter saved at `path_initial` (loaded under its folder name for the computation, then removed)."""
    from ...utils.save_and_load import get_peft_model_state_dict

    initial_name = os.path.basename(os.path.normpath(path_initial))
    if initial_name in peft_model.peft_config:
        raise ValueError(f"path_initial_model_for_weight_conversion: its folder name '{initial_name}' is the name of a "
                         "loaded adapter; save the initial adapter under another folder name")
    peft_model.load_adapter(path_initial, adapter_name=initial_name)
    try:
        init = str(peft_model.peft_config[initial_name].init_lora_weights).lower()
        if init.startswith("pissa") or init in ("corda", "olora", "lora_ga"):
            raise ValueError("The `init_lora_weights` parameter of the initial adapter should be set to `True`. "
                             "Otherwise, `self.load_adapter` will subtract the decomposed values again based on the "
                             "residual model.")
        initial = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=initial_name)
    finally:
        peft_model.delete_adapter(initial_name)
    return joined_with_initial(output_state_dict, initial, lambda key: key)


def joined_with_initial(output_state_dict: dict, initial: dict, initial_key) -> dict:
    """[A ; A₀] and [B | −B₀] (a lora_B bias: b − b₀) for each A / B tensor of `output_state_dict`, A₀ and B₀ being
    `initial[initial_key(key)]`: the trained adapter as a plain LoRA adapter of twice the rank on the original base."""
    converted = {}
    for key, value in output_state_dict.items():
        if "lora_A" in key:
            converted[key] = torch.cat([value, initial[initial_key(key)]], dim=0)
        elif "lora_B" in key and value.dim() == 1:  # lora_bias: the training's change of it
            converted[key] = value - initial[initial_key(key)]
        elif "lora_B" in key:
            converted[key] = torch.cat([value, -initial[initial_key(key)]], dim=1)
    return converted


_PREFIX = "base_model.model."


def _energy_rank(singular_values: torch.Tensor, share: float) -> int:
    """The fewest leading singular values whose squares sum to at least `share` of all squares."""
    energy = singular_values.square().cumsum(0)
    return int(torch.searchsorted(energy, share * energy[-1]).item()) + 1


@torch.no_grad()
def _lora_factors(module: BaseTunerLayer, rank: Union[int, float], adapter_name: str):
    """(lora_A weight, lora_B weight, rank) approximating the module's ΔW of `adapter_name`."""
    delta = module.get_delta_weight(adapter_name)
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (no SVD in half precision)
    k = rank if isinstance(rank, int) else _energy_rank(s, rank)
    if k > s.shape[0]:
        raise ValueError(f"The chosen rank {k} is larger than the weight shape ({s.shape[0]}), please choose a lower "
                         "rank.")
    lora_b, lora_a = (u[:, :k] * s[:k]).to(delta.dtype), vh[:k].to(delta.dtype)
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module.get_base_layer(), conv1d):  # ΔW is stored in × out there
        return lora_b.T.contiguous(), lora_a.T.contiguous(), k
    return lora_a.contiguous(), lora_b.contiguous(), k


def _check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank must be an int (a fixed rank) or a float in (0, 1] (an energy share), got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got "
                         f"{rank}.")
    if isinstance(rank, int) and rank <= 0:
        raise ValueError(f"rank must be at least 1, got {rank}")


def convert_to_lora(model: nn.Module, rank: Union[int, float], adapter_name: str = "default",
                    progressbar: bool = False, compile_kwargs: Optional[dict] = None
                    ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, state dict in PEFT's saved form) of a LoRA approximating `adapter_name` of `model`.

    Every adapter layer of the model must support the conversion (linear layers of LoHa, LoKr or plain LoRA):
    otherwise TypeError. `rank`: an int for the same rank everywhere, or a float in (0, 1] for the share of each
    ΔW's energy to keep (ranks per layer in rank_pattern). modules_to_save copies are carried over. Nothing on the
    model changes. `compile_kwargs`: the per-layer conversion is run under torch.compile with them."""
    _check_rank(rank)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    unsupported = sorted({type(m).__module__ + "." + type(m).__qualname__ for _, m in layers
                          if not m.supports_lora_conversion(adapter_name)})
    if unsupported:
        raise TypeError(f"Some module types on this model do not support LoRA conversion: {', '.join(unsupported)}.")
    layers = [(name, m) for name, m in layers if adapter_name in m._get_available_adapters()]
    if not layers:
        raise TypeError(f"Could not detect any layer that supports LoRA conversion (adapter {adapter_name!r}).")
    peft_config = getattr(model, "peft_config", {}).get(adapter_name)
    if peft_config is not None and peft_config.peft_type == PeftType.LORA:
        warnings.warn("Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need "
                      "for that.")
    bias = getattr(peft_config, "bias", "none")
    if bias != "none":
        raise ValueError(f"The adapter's config sets bias={bias}, this is not supported right now.")

    config_kwargs = {"rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": set()}
    if peft_config is not None:
        config_kwargs.update(target_modules=copy.copy(peft_config.target_modules),
                             base_model_name_or_path=peft_config.base_model_name_or_path,
                             layers_pattern=getattr(peft_config, "layers_pattern", None),
                             layers_to_transform=getattr(peft_config, "layers_to_transform", None))
    else:
        config_kwargs["target_modules"] = set()
    fixed = rank if isinstance(rank, int) else 1  # (a float rank: every layer's rank comes from rank_pattern)
    lora_config = LoraConfig(r=fixed, lora_alpha=fixed, **config_kwargs)

    convert = _lora_factors if compile_kwargs is None else torch.compile(_lora_factors, **compile_kwargs)
    if progressbar:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="Converting to LoRA")
    state_dict = {}
    for name, module in layers:
        lora_a, lora_b, k = convert(module, rank, adapter_name)
        key = name.removeprefix(_PREFIX)
        if k != rank or isinstance(lora_config.target_modules, str):
            lora_config.rank_pattern[key] = k
            lora_config.alpha_pattern[key] = k
        else:
            lora_config.target_modules.add(key)
        state_dict[f"{name}.lora_A.weight"] = lora_a
        state_dict[f"{name}.lora_B.weight"] = lora_b

    if peft_config is not None and getattr(peft_config, "modules_to_save", None):
        lora_config.modules_to_save = copy.copy(peft_config.modules_to_save)
        for name, module in model.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for param_name, param in module.modules_to_save[adapter_name].named_parameters():
                    state_dict[f"{name}.{param_name}"] = param.detach()
    return lora_config, state_dict


def save_as_lora(path: Union[str, os.PathLike], model: nn.Module, rank: Union[int, float],
                 adapter_name: str = "default", progressbar: bool = False, compile_kwargs: Optional[dict] = None
                 ) -> None:
    """convert_to_lora, then `adapter_model.safetensors` and `adapter_config.json` in `path` (created if missing):
    a LoRA adapter that `PeftModel.from_pretrained` (peft_fast's or HF PEFT's) loads."""
    from safetensors.torch import save_file

    lora_config, state_dict = convert_to_lora(model, rank=rank, adapter_name=adapter_name, progressbar=progressbar,
                                              compile_kwargs=compile_kwargs)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / SAFETENSORS_WEIGHTS_NAME))
    lora_config.save_pretrained(str(path))
