"""Model-surgery helpers, ModulesToSaveWrapper and the training-preparation utilities of PEFT's utils.other."""

from __future__ import annotations

import copy
import inspect
import operator
import re
import warnings
from abc import ABC, abstractmethod
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
    return _module_name(model, model.get_input_embeddings())


def _module_name(model: nn.Module, module: nn.Module) -> Optional[str]:
    return next((name for name, m in model.named_modules() if m is module), None)


def names_module(key: str, name: str) -> bool:
    """Whether module name `name` (as a config gives it) names module `key`: the whole name or its last segments."""
    return key == name or key.endswith(f".{name}")


# module-name segments a PEFT wrapper inserts above the module it wraps (stripped to get the model's own names)
_WRAPPER_SEGMENT = re.compile(r"\.(base_layer|token_adapter|original_module|modules_to_save\.[^.]+)(?=\.|$)")


def get_module_names_tied_with_embedding(model: nn.Module) -> list[str]:
    """The names (as in the bare model) of the modules that share the input embedding's weight, the embedding
    itself left out: ['lm_head'] for a causal LM with tie_word_embeddings. Read from the parameters themselves (the
    same tensor object), so it holds for transformers 4 and 5 alike and for a model that already has adapters;
    [] when the config turns tying off."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if hasattr(model, "tuner_layer_cls"):
        model = model.model
    if getattr(getattr(model, "config", None), "tie_word_embeddings", None) is False:
        return []
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if embedding is None:
        return []
    base = embedding
    while hasattr(base, "get_base_layer") and base.get_base_layer() is not base:
        base = base.get_base_layer()
    weight = getattr(base, "_parameters", {}).get("weight")
    if weight is None:
        return []
    owners = {_WRAPPER_SEGMENT.sub("", "." + name).lstrip(".").rpartition(".")[0]
              for name, param in model.named_parameters(remove_duplicate=False) if param is weight}
    owners.discard(_WRAPPER_SEGMENT.sub("", "." + (_module_name(model, embedding) or "")).lstrip("."))
    return sorted(owners)


def set_adapter_weights_requires_grad(holder: nn.Module, adapter_names: str | list[str], requires_grad: bool) -> None:
    """requires_grad of the tensors of `adapter_names` in `holder`'s adapter containers (its adapter_layer_names,
    dotted names allowed: an adapter layer, or a module that trains beside the adapters). Leaf tensors only: under
    FSDP a parameter may be a view of a flat one, which takes no flag (its flat parameter is the leaf)."""
    names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
    for layer_name in holder.adapter_layer_names:
        for key, item in operator.attrgetter(layer_name)(holder).items():
            if key not in names:
                continue
            for tensor in [item] if isinstance(item, torch.Tensor) else item.parameters():
                if tensor.is_leaf:
                    tensor.requires_grad_(requires_grad)


class AuxiliaryTrainingWrapper(nn.Module, ABC):
    """A module of the base model that an adapter trains besides its adapter layers: wholly (modules_to_save,
    ModulesToSaveWrapper) or a few rows of it (trainable_token_indices, TrainableTokensWrapper). Keeps which
    adapters it has and which is active (one at a time), and runs a batch that mixes adapters per sample."""

    # what get_layer_status and the adapter-file code read, as on an adapter layer
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    merged_adapters: list[str] = []
    # the submodule under which the wrapped module's own tensors live (the base model's state-dict keys)
    wrapped_attribute: str = ""

    def __init__(self):
        super().__init__()
        self._active_adapter: list[str] = []
        self._disable_adapters = False

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @abstractmethod
    def _get_available_adapters(self) -> set[str]:
        """The adapters this wrapper holds."""

    @abstractmethod
    def update(self, adapter_name: str, **kwargs) -> None:
        """Give `adapter_name` what it trains here (a no-op when it has it)."""

    @abstractmethod
    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]] = None) -> None:
        """Drop `adapter_name`; the first of `new_active_adapters` this wrapper has becomes the active one."""

    @abstractmethod
    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        """The module that replaces this wrapper when the model is unloaded."""

    @abstractmethod
    def adapter_state_dict(self, adapter_name: str, state_dict: dict) -> dict:
        """`adapter_name`'s tensors under their file keys, from this wrapper's state dict `state_dict`."""

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self._get_available_adapters()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Gradients on (or off) for the tensors `adapter_names` train here; other adapters' are left as they are."""
        set_adapter_weights_requires_grad(self, adapter_names, requires_grad)

    @abstractmethod
    def _forward_adapter(self, adapter_name: Optional[str], x: torch.Tensor, *args, **kwargs):
        """The output with adapter `adapter_name` (None: the base module's)."""

    def _active_name(self) -> Optional[str]:
        if self._disable_adapters:
            return None
        return next((name for name in self._active_adapter if self.has_adapter(name)), None)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self._disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        return self._forward_adapter(self._active_name(), x, *args, **kwargs)

    def _mixed_batch_forward(self, x, *args, adapter_names: list[str], **kwargs):
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        results = [None] * len(x)
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            adapter = name if name != BASE_ADAPTER_NAME and self.has_adapter(name) else None
            out = self._forward_adapter(adapter, x[rows], *args, **kwargs)
            for j, i in enumerate(rows):
                results[i] = out[j]
        return torch.stack(results)

    @abstractmethod
    def get_base_layer(self) -> nn.Module:
        """The wrapped module."""

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks are the wrapped module's (num_embeddings, in_features …), as in PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if "_modules" not in self.__dict__ or self.wrapped_attribute not in self._modules:  # (being built)
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(self.get_base_layer(), name)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make the one adapter of `adapter_names` that this module has the active one ([]: none)."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        if len(adapter_names) > 1:
            raise ValueError(f"Attempted to set multiple ({adapter_names}) adapters at once for "
                             f"{self._error_message_name()}.")
        if adapter_names and not self.has_adapter(adapter_names[0]):
            raise ValueError(f"Adapter {adapter_names[0]} not found in {sorted(self._get_available_adapters())}")
        self._set_trainable_adapter(adapter_names[0] if adapter_names else None, inference_mode)
        self._active_adapter = list(adapter_names)

    @abstractmethod
    def _set_trainable_adapter(self, adapter_name: Optional[str], inference_mode: bool) -> None:
        """Only `adapter_name`'s tensors train (none when None, or in inference mode)."""

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        active = self._active_name() if enabled else None
        self._set_trainable_adapter(active, inference_mode=False)

    def _error_message_name(self) -> str:
        return "modules_to_save"


class ModulesToSaveWrapper(AuxiliaryTrainingWrapper):
    """Keeps the original module frozen and one fully trainable copy of it per adapter (PEFT's `modules_to_save`)."""

    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)
    wrapped_attribute = "original_module"

    def _get_available_adapters(self) -> set[str]:
        return set(self.modules_to_save.keys())

    def __init__(self, module_to_save: nn.Module, adapter_name: str, tied_module: Optional[nn.Module] = None):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter = [adapter_name]
        self.update(adapter_name, tied_module=tied_module)
        self.check_module()

    def check_module(self) -> None:
        forbidden = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
        if isinstance(self.original_module, forbidden):
            raise TypeError(
                f"modules_to_save cannot be applied to modules of type {type(self.original_module).__name__}"
            )

    @property
    def weight(self):
        active = self._active_name()
        return self.original_module.weight if active is None else self.modules_to_save[active].weight

    def update(self, adapter_name: str, tied_module: Optional[nn.Module] = None) -> None:
        """Give `adapter_name` its trainable copy; with `tied_module` (ensure_weight_tying: an output layer tied to
        the embedding's copy) a Linear over that copy's very weight Parameter, as PEFT makes it."""
        if adapter_name not in self.modules_to_save:
            if tied_module is not None:
                linear = nn.Linear(*tied_module.weight.shape, bias=False)  # (its random init: PEFT's draws)
                linear.weight = tied_module.weight
                linear.out_features, linear.in_features = tied_module.weight.shape
                self.modules_to_save[adapter_name] = linear
            else:
                self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        if adapter_name in self._active_adapter:
            self.modules_to_save[adapter_name].requires_grad_(True)

    def _forward_adapter(self, adapter_name: Optional[str], x: torch.Tensor, *args, **kwargs):
        module = self.original_module if adapter_name is None else self.modules_to_save[adapter_name]
        return module(x, *args, **kwargs)

    def _set_trainable_adapter(self, adapter_name: Optional[str], inference_mode: bool) -> None:
        self.original_module.requires_grad_(False)
        self.modules_to_save.requires_grad_(False)
        if adapter_name is not None:
            self.modules_to_save[adapter_name].requires_grad_(not inference_mode)

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
        active = self._active_name()
        return self.original_module if active is None else self.modules_to_save[active]

    def adapter_state_dict(self, adapter_name: str, state_dict: dict) -> dict:
        """Saved keys are the original module's own keys (what PEFT ≥ 0.15 writes)."""
        prefix = f"modules_to_save.{adapter_name}."
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict:
        return {k: f"modules_to_save.{adapter_name}.{k}" for k, _ in self.modules_to_save[adapter_name].state_dict().items()}


class TrainableTokensWrapper(AuxiliaryTrainingWrapper):
    """A module (an input embedding, or an LM head tied to it) of which an adapter trains a few rows: LoraConfig's
    `trainable_token_indices`. The rows live in a TrainableTokensLayer (`token_adapter`); an LM head tied to the
    embedding gets one tied to the embedding's, so both follow the same rows and only the embedding's are saved."""

    adapter_layer_names: tuple[str, ...] = ("token_adapter.trainable_tokens_delta",)
    other_param_names: tuple[str, ...] = ("token_adapter.token_indices", "token_adapter.trainable_tokens_original")
    wrapped_attribute = "token_adapter"

    def __init__(self, module_to_save: nn.Module, adapter_name: str, token_indices: list[int], tied_adapter=None):
        from ..tuners.trainable_tokens import TrainableTokensLayer

        super().__init__()
        self.token_adapter = TrainableTokensLayer(module_to_save, adapter_name, tied_adapter=tied_adapter)
        self._active_adapter = [adapter_name]
        self.update(adapter_name, token_indices=token_indices)

    @property
    def original_module(self) -> nn.Module:
        return self.get_base_layer()

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the model sees it: the base weight with the active adapter's rows in place."""
        return self.token_adapter.get_merged_weights(self.token_adapter.active_adapters)

    def _get_available_adapters(self) -> set[str]:
        return set(self.token_adapter.trainable_tokens_delta.keys())

    def _error_message_name(self) -> str:
        return "trainable_token_indices"

    def update(self, adapter_name: str, **kwargs) -> None:
        if adapter_name not in self._get_available_adapters():
            self.token_adapter.update_layer(adapter_name, **kwargs)

    def _forward_adapter(self, adapter_name: Optional[str], x: torch.Tensor, *args, **kwargs):
        if adapter_name is None:
            return self.get_base_layer()(x, *args, **kwargs)
        return self.token_adapter.forward_adapters(x, [adapter_name])

    def _set_trainable_adapter(self, adapter_name: Optional[str], inference_mode: bool) -> None:
        names = [] if adapter_name is None else [adapter_name]
        self.token_adapter.set_adapter(names, inference_mode=inference_mode)  # (requires_grad of the rows too)
        self.token_adapter._disable_adapters = self._disable_adapters

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        # a model's other adapters may train no tokens: only the one this module has is set, if any
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        present = [n for n in names if self.has_adapter(n)]
        if len(present) > 1:
            raise ValueError(f"Only one adapter can be set at a time for trainable_token_indices, got {len(present)}")
        super().set_adapter(present, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]] = None) -> None:
        if self.has_adapter(adapter_name):
            self.token_adapter.delete_adapter(adapter_name)
        remaining = [a for a in (new_active_adapters or []) if self.has_adapter(a)]
        self.set_adapter(remaining[:1])

    def get_base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        """The wrapped module, with the adapter's rows merged into it when `merge`."""
        if merge:
            self.token_adapter.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()

    def adapter_state_dict(self, adapter_name: str, state_dict: dict) -> dict:
        """The rows under PEFT's key `token_adapter.trainable_tokens_delta`; nothing for a tied module (the
        embedding's rows are its rows)."""
        if self.token_adapter.tied_adapter is not None:
            return {}
        key = f"token_adapter.trainable_tokens_delta.{adapter_name}"
        return {"token_adapter.trainable_tokens_delta": state_dict[key]} if key in state_dict else {}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict:
        if self.token_adapter.tied_adapter is not None:
            return {}
        return {"token_adapter.trainable_tokens_delta": f"token_adapter.trainable_tokens_delta.{adapter_name}"}


def _set_trainable(model: nn.Module, adapter_name: str, module_names, inference_mode: bool = False,
                   wrapper_cls: type = ModulesToSaveWrapper, strict_module_check: bool = False,
                   **wrapper_kwargs) -> list[str]:
    """Wrap every module whose name ends with one of `module_names` in a `wrapper_cls` (or give the wrapper that is
    there the adapter). strict_module_check: a name that matches no module is a ValueError."""
    if not module_names:
        return []
    wrapped = []
    key_list = [key for key, _ in model.named_modules(remove_duplicate=False)]
    for key in key_list:
        if not any(names_module(key, name) for name in module_names):
            continue
        try:
            parent, target, target_name = _get_submodules(model, key)
        except AttributeError:  # under a module replaced earlier in this loop
            continue
        if isinstance(target, wrapper_cls):
            target.update(adapter_name, **wrapper_kwargs)  # which adapter is active is settled by set_adapter later
        elif isinstance(target, AuxiliaryTrainingWrapper):
            raise ValueError(f"{key} is already trained through {target._error_message_name()}; it cannot also be "
                             f"wrapped for {wrapper_cls.__name__}")
        elif any(isinstance(m, AuxiliaryTrainingWrapper) for m in _parents(model, key)):
            continue
        else:
            new_module = wrapper_cls(target, adapter_name, **wrapper_kwargs)
            new_module.set_adapter(adapter_name, inference_mode)
            setattr(parent, target_name, new_module)
        wrapped.append(key)
    if strict_module_check and not wrapped:
        raise ValueError(f"Target modules {module_names} not found in the base model. Please check the target "
                         "modules and try again.")
    return wrapped


def _unwrap_modules_to_save(model: nn.Module, adapter_name: str) -> None:
    """Drop `adapter_name` from every modules_to_save / trainable-tokens wrapper; a wrapper left without adapters is
    replaced by the module it wraps (undoing _set_trainable of a failed add)."""
    for key, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, AuxiliaryTrainingWrapper) or not module.has_adapter(adapter_name):
            continue
        module.delete_adapter(adapter_name, [a for a in module.active_adapters if a != adapter_name])
        if not module._get_available_adapters():
            parent, _, target_name = _get_submodules(model, key)
            setattr(parent, target_name, module.get_base_layer())


def _parents(model: nn.Module, key: str):
    parts = key.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))


def _set_adapter(model: nn.Module, adapter_name: str | list[str], inference_mode: bool = False) -> None:
    """Point every modules_to_save / trainable-tokens wrapper of `model` at `adapter_name` (those that have it)."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            present = [n for n in names if module.has_adapter(n)]
            module.set_adapter(present[:1], inference_mode=inference_mode)


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
