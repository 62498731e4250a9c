"""Model-surgery helpers, ModulesToSaveWrapper and the training-preparation utilities of PEFT's utils.other."""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from typing import Optional

import torch
from torch import nn

from .constants import BASE_ADAPTER_NAME


def infer_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    if weight.dim() == 2 and fan_in_fan_out:
        return weight.T
    return weight


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """Return (parent, target, target_name) for the dotted module path `key`."""
    parent = model.get_submodule(".".join(key.split(".")[:-1])) if "." in key else model
    target_name = key.split(".")[-1]
    target = model.get_submodule(key)
    return parent, target, target_name


def _freeze_adapter(model: nn.Module, adapter_name: str) -> None:
    for n, p in model.named_parameters():
        if adapter_name in n.split("."):
            p.requires_grad = False


def _get_input_embeddings_name(model: nn.Module) -> Optional[str]:
    if not hasattr(model, "get_input_embeddings"):
        return None
    input_embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is input_embeddings:
            return name
    return None


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and one fully trainable copy of it per adapter (PEFT's `modules_to_save`)."""

    # what get_layer_status reads, as on an adapter layer
    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)
    other_param_names: tuple[str, ...] = ()
    merged_adapters: list[str] = []

    def _get_available_adapters(self) -> set[str]:
        return set(self.modules_to_save.keys())

    def __init__(self, module_to_save: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter = [adapter_name]
        self._disable_adapters = False
        self.update(adapter_name)
        self.check_module()

    def check_module(self) -> None:
        forbidden = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
        if isinstance(self.original_module, forbidden):
            raise TypeError(
                f"modules_to_save cannot be applied to modules of type {type(self.original_module).__name__}"
            )

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def weight(self):
        active = [a for a in self._active_adapter if a in self.modules_to_save]
        if self._disable_adapters or not active:
            return self.original_module.weight
        return self.modules_to_save[active[0]].weight

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if "_modules" not in self.__dict__ or "original_module" not in self._modules:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(self._modules["original_module"], name)

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        if adapter_name in self._active_adapter:
            self.modules_to_save[adapter_name].requires_grad_(True)

    def _active_copy(self) -> Optional[nn.Module]:
        if self._disable_adapters:
            return None
        for name in self._active_adapter:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self._disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        module = self._active_copy()
        return (module or self.original_module)(x, *args, **kwargs)

    def _mixed_batch_forward(self, x, *args, adapter_names: list[str], **kwargs):
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        results = [None] * len(x)
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            module = self.original_module
            if name != BASE_ADAPTER_NAME and name in self.modules_to_save:
                module = self.modules_to_save[name]
            out = module(x[rows], *args, **kwargs)
            for j, i in enumerate(rows):
                results[i] = out[j]
        return torch.stack(results)

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.original_module.requires_grad_(False)
            for name in self._active_adapter:
                if name in self.modules_to_save:
                    self.modules_to_save[name].requires_grad_(True)
            self._disable_adapters = False
        else:
            self.original_module.requires_grad_(False)
            self.modules_to_save.requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        if len(adapter_names) > 1:
            raise ValueError(f"Attempted to set multiple ({adapter_names}) adapters at once for modules_to_save.")
        if not adapter_names:
            self._active_adapter = []
            return
        name = adapter_names[0]
        if name not in self.modules_to_save:
            raise ValueError(f"Adapter {name} not found in {list(self.modules_to_save)}")
        self.modules_to_save.requires_grad_(False)
        self.modules_to_save[name].requires_grad_(not inference_mode)
        self._active_adapter = [name]

    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]] = None) -> None:
        if adapter_name not in self.modules_to_save:
            return
        del self.modules_to_save[adapter_name]
        remaining = [a for a in (new_active_adapters or []) if a in self.modules_to_save]
        self._active_adapter = remaining[:1]

    def get_base_layer(self) -> nn.Module:
        return self.original_module

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        """Return the module that replaces this wrapper on unload: the active copy, or the original when none."""
        module = self._active_copy()
        return module if module is not None else self.original_module

    def adapter_state_dict(self, adapter_name: str, state_dict: dict) -> dict:
        """Saved keys are the original module's own keys (what PEFT ≥ 0.15 writes)."""
        prefix = f"modules_to_save.{adapter_name}."
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict:
        return {k: f"modules_to_save.{adapter_name}.{k}" for k, _ in self.modules_to_save[adapter_name].state_dict().items()}


def _set_trainable(model: nn.Module, adapter_name: str, module_names, inference_mode: bool = False) -> list[str]:
    """Wrap every module whose name ends with one of `module_names` in a ModulesToSaveWrapper (or update it)."""
    if not module_names:
        return []
    wrapped = []
    key_list = [key for key, _ in model.named_modules()]
    for key in key_list:
        if not any(key == name or key.endswith(f".{name}") for name in module_names):
            continue
        parent, target, target_name = _get_submodules(model, key)
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)  # which copy is active is settled by the tuner's set_adapter afterwards
        elif any(isinstance(m, ModulesToSaveWrapper) for m in _parents(model, key)):
            continue
        else:
            new_module = ModulesToSaveWrapper(target, adapter_name)
            new_module.set_adapter(adapter_name, inference_mode)
            setattr(parent, target_name, new_module)
        wrapped.append(key)
    return wrapped


def _unwrap_modules_to_save(model: nn.Module, adapter_name: str) -> None:
    """Drop `adapter_name`'s copy from every ModulesToSaveWrapper; a wrapper left without copies is replaced by its
    original module (undoing _set_trainable of a failed add)."""
    for key, module in list(model.named_modules()):
        if not isinstance(module, ModulesToSaveWrapper) or adapter_name not in module.modules_to_save:
            continue
        del module.modules_to_save[adapter_name]
        module._active_adapter = [a for a in module._active_adapter if a != adapter_name]
        if len(module.modules_to_save) == 0:
            parent, _, target_name = _get_submodules(model, key)
            setattr(parent, target_name, module.original_module)


def _parents(model: nn.Module, key: str):
    parts = key.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))


def _set_adapter(model: nn.Module, adapter_name: str | list[str], inference_mode: bool = False) -> None:
    """Point every ModulesToSaveWrapper of `model` at `adapter_name` (those that have it)."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            present = [n for n in names if n in module.modules_to_save]
            if present:
                module.set_adapter(present[0], inference_mode=inference_mode)
            else:
                module.set_adapter([], inference_mode)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict] = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Freeze the base model, upcast its half-precision (non 4-bit) parameters to fp32 and, for k-bit models, turn on
    gradient checkpointing with input gradients so that adapters train through a frozen quantized model."""
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    quant_method = getattr(model, "quantization_method", None)
    quantized_elsewhere = quant_method in ("gptq", "aqlm", "eetq", "torchao", "hqq") or getattr(
        model, "hqq_quantized", False
    )
    if gradient_checkpointing_kwargs is None:
        gradient_checkpointing_kwargs = {}

    for _, param in model.named_parameters():
        param.requires_grad = False

    if not quantized_elsewhere:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()

    if (loaded_in_kbit or quantized_elsewhere) and use_gradient_checkpointing:
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:

                def make_inputs_require_grad(module, input, output):
                    output.requires_grad_(True)

                model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)

        supports_gc_kwargs = "gradient_checkpointing_kwargs" in inspect.signature(
            model.gradient_checkpointing_enable
        ).parameters
        if not supports_gc_kwargs and gradient_checkpointing_kwargs:
            warnings.warn(
                "gradient_checkpointing_kwargs is not supported in this version of transformers. The passed kwargs "
                "will be ignored.",
                FutureWarning,
            )
        kwargs = {"gradient_checkpointing_kwargs": gradient_checkpointing_kwargs} if supports_gc_kwargs else {}
        model.gradient_checkpointing_enable(**kwargs)
    return model


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast frozen parameters to `dtype` (fp16/bf16) and trainable ones to fp32, for mixed-precision training."""
    for p in model.parameters():
        p.data = p.to(dtype) if not p.requires_grad else p.to(torch.float32)


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """input_ids moved one position right with decoder_start_token_id first (seq2seq decoder inputs from labels);
    the labels' ignore value -100 becomes pad_token_id."""
    if pad_token_id is None:
        raise ValueError("self.model.config.pad_token_id has to be defined.")
    shifted = torch.cat([torch.full_like(input_ids[:, :1], decoder_start_token_id), input_ids[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == -100, pad_token_id)


def id_tensor_storage(tensor: torch.Tensor) -> tuple[torch.device, int, int]:
    """(device, storage address, storage bytes): equal for tensors sharing one storage (while it lives)."""
    storage = tensor.untyped_storage()
    return tensor.device, storage.data_ptr(), storage.nbytes()


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """Return the rank_pattern/alpha_pattern key that applies to module `key_to_match`: the first pattern that
    matches the end of the module path at a segment boundary (as a regex), else the module path itself."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


__all__ = [
    "id_tensor_storage",
    "shift_tokens_right",
    "ModulesToSaveWrapper",
    "prepare_model_for_kbit_training",
    "cast_mixed_precision_params",
    "transpose",
    "_get_submodules",
    "_set_trainable",
    "_freeze_adapter",
    "infer_device",
    "get_pattern_key",
]
