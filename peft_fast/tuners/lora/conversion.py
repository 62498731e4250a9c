"""PiSSA / OLoRA adapters saved as plain LoRA: `save_pretrained(..., path_initial_model_for_weight_conversion=...)`.

PiSSA and OLoRA move part of each base weight into the adapter at initialisation (W = W_res + s·B₀A₀), so the trained
adapter only works on the residual base. Given the adapter saved right after initialisation, the training's effect
on the *original* base is ΔW = s·(B A − B₀ A₀) = s·[B | −B₀][A ; A₀]: a plain LoRA adapter of twice the rank, with
lora_alpha doubled as well (√2 with rsLoRA) so that its scaling stays s. Same files as PEFT writes.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch

from ...utils.peft_types import PeftType


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
    converted = {}
    for key, value in output_state_dict.items():
        if "lora_A" in key:
            converted[key] = torch.cat([value, initial[key]], dim=0)
        elif "lora_B" in key and value.dim() == 1:  # lora_bias: the training's change of it
            converted[key] = value - initial[key]
        elif "lora_B" in key:
            converted[key] = torch.cat([value, -initial[key]], dim=1)
    return converted
