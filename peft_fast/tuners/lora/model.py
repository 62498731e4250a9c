"""LoraModel: injects LoRA layers into a model (PEFT's `peft.tuners.lora.LoraModel`)."""

from __future__ import annotations

import contextlib
import warnings
from functools import partial
from typing import Callable, Optional, Union

import torch
from torch import nn

from ...utils.constants import BASE_ADAPTER_NAME, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ...utils.other import (
    AuxiliaryTrainingWrapper,
    _freeze_adapter,
    get_pattern_key,
)
from ..tuners_utils import BaseTuner, _replicate_layers
from .alora import offsets_for_recompute
from .config import LoraConfig
from .bnb import dispatch_bnb
from . import kasa, tying, weighted
from .layer import LoraLayer, dispatch_default
from .multihead_attention import MultiheadAttention
from .param_wrapper import ParamWrapper


def _forward_kwargs_pre_hook(target, args, kwargs, extra):
    kwargs.update(extra)
    return args, kwargs


class LoraModel(BaseTuner):
    """Creates a LoRA model from a pretrained transformers (or any torch) model.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from peft_fast import LoraConfig, get_peft_model
        >>> model = AutoModelForCausalLM.from_pretrained(...)
        >>> model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    """

    prefix: str = "lora_"
    tuner_layer_cls = LoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config: LoraConfig) -> None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"LoraModel needs a LoraConfig, got {type(config).__name__}.")
        if len(self.peft_config) > 1 and sum(c.bias != "none" for c in self.peft_config.values()) > 1:
            raise ValueError(
                f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, set bias to "
                "'none' for all adapters."
            )
        # KaSA truncates the base weights it adapts: an adapter with and one without it would see different bases
        uses_kasa = config.kasa_config is not None
        for name, other in self.peft_config.items():
            if other is not config and (getattr(other, "kasa_config", None) is not None) != uses_kasa:
                raise ValueError(
                    "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base weights: "
                    f"the new adapter {'uses' if uses_kasa else 'does not use'} KaSA but adapter '{name}' "
                    f"{'does not' if uses_kasa else 'does'}.")

    def subtract_mutated_init(self, output_state_dict: dict, adapter_name: str, kwargs: Optional[dict] = None) -> dict:
        """A PiSSA / CorDA / OLoRA / LoRA-GA adapter as plain LoRA on the original base weights: its A / B tensors
        (`output_state_dict`, keys as saved from the PeftModel) joined with those of `adapter_name`, the same adapter
        as it was right after initialisation, loaded here with init_lora_weights=True ([A ; A₀], [B | −B₀]; twice the
        rank). `kwargs["state_dict"]`: the model state dict to read the initial adapter from."""
        from ...utils.save_and_load import get_peft_model_state_dict
        from .conversion import joined_with_initial

        if adapter_name.startswith("pissa") and any(
                p.dtype not in (torch.float32, torch.float16, torch.bfloat16) for p in self.model.parameters()):
            warnings.warn(r"Note that Quant(W_res) + AB != Quant(W) + \Delta(AB); the converted LoRA, when combined "
                          "with W or Quant(W), may introduce a certain gap in the fine-tuned model. Therefore, we "
                          "recommend directly using the Quant(W_res) in conjunction with the PiSSA adapter.")
        initial = get_peft_model_state_dict(self, state_dict=(kwargs or {}).get("state_dict"),
                                            adapter_name=adapter_name)
        # (keys relative to this tuner: the PeftModel's without their first component, "base_model.")
        return joined_with_initial(output_state_dict, initial, lambda key: key.split(".", 1)[1])

    def _get_kasa_loss(self, adapter_names: Optional[Union[str, list[str]]] = None) -> Union[torch.Tensor, float]:
        """KaSA's regularisers (tuners/lora/kasa.py), β and γ from each adapter's KasaConfig, summed over the layers
        of `adapter_names` (default: the active adapters), to add to the training loss; 0.0 where none is KaSA."""
        names = self.active_adapters if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        total: Union[torch.Tensor, float] = 0.0
        for module in self.modules():
            diag = module._modules.get("lora_diag") if isinstance(module, LoraLayer) else None
            for name in (n for n in names if diag is not None and n in diag):
                config = self.peft_config[name].kasa_config
                total = total + kasa.regularization_loss(module.lora_A[name].weight, module.lora_B[name].weight,
                                                         diag[name], config.beta, config.gamma)
        return total

    def _prepare_model(self, peft_config: LoraConfig, model: nn.Module) -> Optional[Callable[[], None]]:
        tying.prepare_weight_tying(peft_config, model)
        if peft_config.layer_replication:
            return _replicate_layers(model, peft_config.layer_replication)
        return None

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        # (replicated layers share one base weight: merging would add each copy's ΔW to all of them)
        if any(getattr(config, "layer_replication", None) for config in self.peft_config.values()):
            raise ValueError("Cannot merge LORA layers when base model layers are replicated")

    @staticmethod
    def _prepare_adapter_config(peft_config: LoraConfig, model_config: dict) -> LoraConfig:
        if peft_config.target_modules is None and peft_config.target_parameters:
            peft_config.target_modules = set()  # only parameters are targeted
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
                raise ValueError("Please specify `target_modules` in `peft_config`")
            peft_config.target_modules = set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
        return peft_config

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kw):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r_key = get_pattern_key(lora_config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(lora_config.alpha_pattern.keys(), current_key)
        r = lora_config.rank_pattern.get(r_key, lora_config.r)
        alpha = lora_config.alpha_pattern.get(alpha_key, lora_config.lora_alpha)
        parameter_name = kw.get("parameter_name")
        extra = {"tied_adapter": tying.tied_lora_factors(self.model, adapter_name)} \
            if tying.is_tied_target(lora_config, current_key) else {}
        extra["target_name"] = current_key  # (BD-LoRA's patterns match it)
        if isinstance(target, LoraLayer) and getattr(target, "parameter_name", None) == parameter_name:
            target.update_layer(adapter_name, r, lora_alpha=alpha, config=lora_config, **extra)
            return
        # (the runtime setting goes to a new layer only, as PEFT's: a layer keeps the one of its first adapter)
        offload = lora_config.runtime_config.ephemeral_gpu_offload
        if parameter_name is not None:  # target_parameters: a wrapper around the module holding the parameter
            new_module = ParamWrapper(target, adapter_name, parameter_name, lora_config, r=r, lora_alpha=alpha,
                                      ephemeral_gpu_offload=offload)
        else:
            new_module = self._create_new_module(lora_config, adapter_name, target, r=r, lora_alpha=alpha,
                                                 ephemeral_gpu_offload=offload, **extra)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        # bitsandbytes layers subclass nn.Linear: they must be recognised first
        new_module = dispatch_bnb(target, adapter_name, lora_config=lora_config, **kwargs)
        base = target.get_base_layer() if isinstance(target, LoraLayer) else target
        if new_module is None and isinstance(base, nn.MultiheadAttention):
            new_module = MultiheadAttention(target, adapter_name, lora_config, **kwargs)
        if new_module is None:
            new_module = dispatch_default(target, adapter_name, lora_config=lora_config, **kwargs)
        if new_module is None:
            raise ValueError(
                f"Target module {target} is not supported. Currently, only the following modules are supported: "
                "`torch.nn.Linear`, `torch.nn.Embedding`, bitsandbytes `Linear4bit` / `Linear8bitLt`, `torch.nn.Conv1d`, `torch.nn.Conv2d`, `torch.nn.Conv3d`, "
                "`transformers.pytorch_utils.Conv1D`, `torch.nn.MultiheadAttention`."
            )
        return new_module

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if self.prefix not in n:
                p.requires_grad = False
        for active_adapter in self.active_adapters:
            bias = self.peft_config[active_adapter].bias
            if bias == "none":
                continue
            if bias == "all":
                for n, p in model.named_parameters():
                    if "bias" in n:
                        p.requires_grad = True
            elif bias == "lora_only":
                for m in model.modules():
                    if isinstance(m, LoraLayer) and getattr(m.get_base_layer(), "bias", None) is not None:
                        m.get_base_layer().bias.requires_grad = True

    def disable_adapter_layers(self) -> None:
        for name in self.active_adapters:
            bias = self.peft_config[name].bias
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the same "
                    "output as the base model would without adaption."
                )
        super().disable_adapter_layers()

    def _check_add_weighted_adapter(self, adapters: list[str], combination_type: str,
                                    svd_rank: Optional[int]) -> tuple[str, int, object]:
        """(combination type, new rank, new target_modules) for add_weighted_adapter, or a ValueError."""
        kind, rank, targets = weighted.check_add_weighted_adapter(self, adapters, [1.0] * len(adapters),
                                                                  combination_type, svd_rank, density=1.0)
        return kind, rank, targets

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: bool = True,
        svd_driver: Optional[str] = None,
        density: Optional[float] = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add adapter `adapter_name` combined from `adapters` with `weights` (negative weights subtract);
        combination_type: "svd" (default), "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear",
        "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd" (tuners/lora/weighted.py says
        what each computes). `density` (fraction kept) for the pruning types, `majority_sign_method` ("total" |
        "frequency") for the TIES ones, svd_* for the SVD ones. An existing `adapter_name` is left as it is (as in
        PEFT). The new adapter is frozen and not activated; on error the model is left as it was."""
        if adapter_name in self.peft_config:
            return
        kind, new_rank, targets = weighted.check_add_weighted_adapter(self, adapters, weights, combination_type,
                                                                      svd_rank, density)
        if majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
        self.peft_config[adapter_name] = weighted.new_adapter_config(self, adapters, new_rank, targets)
        self.inject_adapter(self.model, adapter_name)
        try:
            _freeze_adapter(self.model, adapter_name)
            weighted.fill_weighted_adapter(self, adapters, weights, adapter_name, kind, new_rank, svd_clamp,
                                           svd_full_matrices, svd_driver, density, majority_sign_method)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def set_scale(self, adapter: str, scale: float) -> None:
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(adapter, scale)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """While active, every LoRA layer gets `adapter_names` (mixed-batch inference) and `alora_offsets` (aLoRA;
        also in the recomputation of gradient-checkpointed layers, after the context has closed)."""
        adapter_names = kwargs.pop("adapter_names", None)
        alora_offsets = kwargs.pop("alora_offsets", None)
        if adapter_names is None and alora_offsets is None:
            yield
            return
        num_beams = kwargs.get("num_beams")
        if alora_offsets is not None and isinstance(num_beams, int) and num_beams > 1:
            raise ValueError("Beam search not yet supported for aLoRA.")
        to_layers = {} if alora_offsets is None else {"alora_offsets": alora_offsets}
        if adapter_names is not None:
            if self.training:
                raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
            expected = set(self.peft_config) | {BASE_ADAPTER_NAME}
            unknown = sorted(set(adapter_names) - expected)
            if unknown:
                raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; available: "
                                 f"{sorted(expected)}")
            if num_beams and num_beams > 1:
                adapter_names = [name for name in adapter_names for _ in range(num_beams)]
            to_layers["adapter_names"] = adapter_names
        recompute = offsets_for_recompute(self.model, alora_offsets) if alora_offsets is not None else None
        handles = []
        try:
            with recompute or contextlib.nullcontext():
                for module in self.modules():
                    if isinstance(module, LoraLayer):
                        extra = to_layers
                    elif isinstance(module, AuxiliaryTrainingWrapper) and adapter_names is not None:
                        extra = {"adapter_names": adapter_names}  # (modules_to_save copies: no offsets)
                    else:
                        continue
                    hook = partial(_forward_kwargs_pre_hook, extra=extra)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                yield
        finally:
            for handle in handles:
                handle.remove()

