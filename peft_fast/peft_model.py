"""PeftModel and its task subclasses (PEFT's `peft.peft_model`)."""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from .config import PeftConfig
from .prompt_learning import PromptLearningMixin
from .tuners.lora import alora
from .tuner_status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status  # noqa: F401
from .utils.atomic_save import recover_interrupted_save, write_files_atomically, write_text
from .utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .utils.other import _unwrap_modules_to_save, infer_device
from .utils.peft_types import PeftType
from .utils.save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

# peft_type -> tuner class (BaseTuner subclass); filled in mapping.py
PEFT_TYPE_TO_TUNER_MAPPING: dict[PeftType, type] = {}
PEFT_TYPE_TO_PREFIX_MAPPING: dict[PeftType, str] = {}


def _snapshot(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in model.parameters()]


class PeftModel(PromptLearningMixin, nn.Module):
    """Base model wrapped with adapters. Attribute access falls through to the base model.

    Args:
        model: the base transformers (or torch) model.
        peft_config: the configuration of the first adapter.
        adapter_name: its name (default "default").
        autocast_adapter_dtype: keep adapter weights of fp16/bf16 models in fp32 (default True).
        low_cpu_mem_usage: create the adapter weights on the meta device (to be loaded in place; PEFT's meaning).
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}")
        self._adapters_disabled = False  # (inside disable_adapter(): has_active_enabled_adapter)
        self.active_adapter = adapter_name
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names", "alora_offsets"}
        self._is_prompt_learning = peft_config.is_prompt_learning
        if self.peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
            raise ValueError(f"peft_type {self.peft_type} is not supported by peft_fast.")
        if self._is_prompt_learning:  # no tuner: the prompt encoder sits beside the frozen model
            self._peft_config = {}
            self.base_model = model
            self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        else:
            self._peft_config = None
            tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[self.peft_type]
            self.base_model = tuner_cls(
                model, {adapter_name: peft_config}, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )
        if _uses_checkpointing(model):
            self._prepare_model_for_gradient_checkpointing(model)
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1

    # ------------------------------------------------------------------ config / adapters
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        if self._is_prompt_learning:
            return self._peft_config
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        if self._is_prompt_learning:
            self._peft_config = value
        else:
            self.base_model.peft_config = value

    @property
    def active_adapters(self) -> list[str]:
        try:
            adapters = self.base_model.active_adapters
            if not isinstance(adapters, list):  # e.g. transformers' own active_adapters method
                adapters = self.active_adapter
                if isinstance(adapters, str):
                    adapters = [adapters]
        except AttributeError:
            adapters = self.active_adapter
            if isinstance(adapters, str):
                adapters = [adapters]
        return adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def base_model_torch_dtype(self):
        return getattr(self.base_model, "dtype", None)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with adapter layers injected, as in PEFT)."""
        return self.base_model if self._is_prompt_learning else self.base_model.model

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> None:
        """Make `model`'s input embeddings' output require grad, so that checkpointed blocks over frozen weights
        still build a graph for the adapters (done at construction where the model checkpoints)."""
        self._prepare_model_for_gradient_checkpointing(model)

    def _prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        # (a quantized model gets this from prepare_model_for_kbit_training instead)
        if any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            return model
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(_output_requires_grad)
        return model

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Gradients on (or off) for the weights of `adapter_names` (a name or several), active or not, e.g. to
        train two adapters at once; other adapters' are left as they are. Not for prompt learning methods."""
        if self.active_peft_config.is_prompt_learning:
            raise TypeError("Setting `requires_grad` is not supported for prompt learning methods like "
                            f"{PeftType(self.active_peft_config.peft_type).value}.")
        self.base_model.set_requires_grad(adapter_names=adapter_names, requires_grad=requires_grad)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether any adapter acts on the model's output: not inside disable_adapter(), and (other than for prompt
        learning, whose adapter is always the active one) at least one adapter active."""
        if self._adapters_disabled:
            return False
        return self.peft_config[self.active_adapter].is_prompt_learning or bool(self.active_adapters)

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The modules_to_save of all adapters together (None where none has any, as in PEFT)."""
        names = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or ())
        return names or None

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new (inactive) adapter; on any error the model is left as it was."""
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}")
        if peft_config.peft_type != self.peft_type:
            raise ValueError(
                f"Cannot combine adapters with different peft types. Found {self.peft_type} and "
                f"{peft_config.peft_type}."
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        before = _snapshot(self)
        try:
            if peft_config.is_prompt_learning:
                self._add_prompt_learning_adapter(adapter_name, peft_config)
            else:
                self.peft_config[adapter_name] = peft_config
                self.base_model.inject_adapter(self.base_model.model, adapter_name,
                                               low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception:
            if peft_config.is_prompt_learning:
                self._remove_adapter(adapter_name, before)
            self.peft_config.pop(adapter_name, None)
            raise

    def _remove_adapter(self, adapter_name: str, requires_grad: list[tuple[nn.Parameter, bool]]) -> None:
        """Undo a partly added adapter (failed add or load): its layers or prompt encoder go, flags come back."""
        if self._is_prompt_learning:
            if hasattr(self, "prompt_encoder") and adapter_name in self.prompt_encoder:
                del self.prompt_encoder[adapter_name]
                self.prompt_tokens.pop(adapter_name, None)
            _unwrap_modules_to_save(self.base_model, adapter_name)
        else:
            self.base_model._remove_adapter_layers(adapter_name)
        self.peft_config.pop(adapter_name, None)
        for param, flag in requires_grad:
            param.requires_grad = flag

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the (only) active adapter."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
        self.active_adapter = adapter_name
        if self.peft_config[adapter_name].is_prompt_learning:
            from .utils.other import _set_adapter

            _set_adapter(self.base_model, adapter_name)  # modules_to_save follow the active adapter
        else:
            self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        self.base_model.delete_adapter(adapter_name)
        new_active = self.base_model.active_adapters
        self.active_adapter = new_active[0] if len(new_active) == 1 else new_active

    @contextmanager
    def disable_adapter(self):
        """Context manager under which the model behaves as the base model."""
        was_disabled = self._adapters_disabled
        self._adapters_disabled = True
        try:
            yield from self._disabled_adapter()
        finally:
            self._adapters_disabled = was_disabled

    def _disabled_adapter(self):
        if self.peft_config[self.active_adapter].is_prompt_learning:
            # as PEFT: forward and generation go straight to the base model (modules_to_save copies stay active)
            old_forward = self.__dict__.get("forward")
            self.forward = self.base_model.forward
            old_prepare = self.__dict__.get("_prompt_generation_disabled")
            self._prompt_generation_disabled = True
            try:
                yield
            finally:
                if old_forward is None:
                    del self.forward
                else:
                    self.forward = old_forward
                self._prompt_generation_disabled = bool(old_prepare)
            return
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    # ------------------------------------------------------------------ status
    def get_layer_status(self) -> list[TunerLayerStatus]:
        """One TunerLayerStatus per adapter layer (see peft_fast.tuner_status)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The adapter state of the whole model, "irregular" where its layers disagree."""
        return get_model_status(self)

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters); 4-bit parameters count as their unpacked size."""
        trainable, total = 0, 0
        for _, param in self.named_parameters():
            num = param.numel()
            if num == 0 and hasattr(param, "ds_numel"):
                num = param.ds_numel
            if param.__class__.__name__ == "Params4bit":
                num_bytes = param.quant_storage.itemsize if hasattr(param, "quant_storage") else 1
                num = num * 2 * num_bytes
            total += num
            if param.requires_grad:
                trainable += num
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ forward
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        hooks = getattr(self.base_model, "_enable_peft_forward_hooks", None)
        if hooks is None:
            if kwargs.get("adapter_names") is not None:
                raise ValueError(f"adapter_names is not supported for {self.peft_type.value} adapters.")
            yield
            return
        with hooks(*args, **kwargs):
            yield

    def forward(self, *args: Any, **kwargs: Any):
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model().generate(*args, **kwargs)

    @contextmanager
    def _prepare_inputs_swapped(self, replacement):
        """While generating, the base model's prepare_inputs_for_generation is `replacement` (which calls the
        original through self._base_prepare_inputs), as PEFT patches it."""
        base = self.base_model
        had_own = "prepare_inputs_for_generation" in base.__dict__
        self._base_prepare_inputs = base.prepare_inputs_for_generation
        base.prepare_inputs_for_generation = replacement
        try:
            yield
        finally:
            if had_own:
                base.prepare_inputs_for_generation = self._base_prepare_inputs
            else:
                del base.prepare_inputs_for_generation

    # ------------------------------------------------------------------ files
    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        save_embedding_layers: Union[str, bool] = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Write each selected adapter (default: all) as adapter_config.json + adapter_model.safetensors.

        The "default" adapter goes to `save_directory`, any other adapter to `save_directory/<name>`. With
        `path_initial_model_for_weight_conversion` (the folder the PiSSA / OLoRA adapter was saved to right after
        initialisation, with init_lora_weights=True) the adapters are saved as plain LoRA adapters of twice the rank
        that apply to the original base model (tuners/lora/conversion.py).
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        if selected_adapters is None:
            selected_adapters = list(self.peft_config.keys())
        elif any(name not in self.peft_config for name in selected_adapters):
            raise ValueError(
                "You passed an invalid `selected_adapters` arguments, current supported adapter names are "
                f"{list(self.peft_config.keys())} - got {selected_adapters}."
            )
        folders: dict[str, dict] = {save_directory: {}}  # the root first: README.md and the "default" adapter
        for adapter_name in selected_adapters:
            peft_config = self.peft_config[adapter_name]
            state = get_peft_model_state_dict(
                self, state_dict=kwargs.get("state_dict"), adapter_name=adapter_name,
                save_embedding_layers=save_embedding_layers,
            )
            if path_initial_model_for_weight_conversion is not None:
                peft_config, state = self._converted_to_plain_lora(peft_config, state, is_main_process,
                                                                   path_initial_model_for_weight_conversion, kwargs)
            output_dir = os.path.join(save_directory, adapter_name) if adapter_name != "default" else save_directory
            folders.setdefault(output_dir, {}).update(self._adapter_file_writers(peft_config, state, safe_serialization))
        if not is_main_process:
            return
        recover_interrupted_save(save_directory)
        card = self._model_card_text(save_directory)
        folders[save_directory]["README.md"] = lambda path: write_text(path, card)
        # each folder all-or-nothing (utils/atomic_save.py): a failed or killed save leaves the old adapter or the new
        for output_dir, writers in folders.items():
            write_files_atomically(output_dir, writers)

    def _converted_to_plain_lora(self, peft_config, state, is_main_process, path_initial, kwargs):
        """(config, state) of a PiSSA / OLoRA adapter as the plain LoRA adapter it amounts to on the original base."""
        from .tuners.lora import conversion

        conversion.check_convertible(peft_config)
        if is_main_process:  # the initial folder's config says init_lora_weights=True, as PEFT leaves it
            initial_config = copy.deepcopy(peft_config)
            initial_config.init_lora_weights = True
            initial_config.save_pretrained(path_initial)
        state = conversion.subtract_initial(self, state, path_initial, state_dict=kwargs.get("state_dict"))
        return conversion.converted_config(peft_config), state

    def _adapter_file_writers(self, peft_config: PeftConfig, state: dict, safe_serialization: bool) -> dict:
        """{file name: writer} of one adapter's folder: the weights and adapter_config.json."""
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = self.get_base_model().__dict__.get("name_or_path", None) or None
        auto_mapping = None
        if peft_config.task_type is None:
            base_cls = self.get_base_model().__class__
            auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
        inference_mode = peft_config.inference_mode
        peft_config.inference_mode = True  # saved configs are for inference, as PEFT writes them
        try:
            config_text = peft_config.to_json_text(auto_mapping)
        finally:
            peft_config.inference_mode = inference_mode
        writers = {CONFIG_NAME: lambda path: write_text(path, config_text)}
        if safe_serialization:
            from safetensors.torch import save_file

            tensors = _unshare(state)
            writers[SAFETENSORS_WEIGHTS_NAME] = lambda path: save_file(tensors, path, metadata={"format": "pt"})
        else:
            writers[WEIGHTS_NAME] = lambda path: torch.save(state, path)
        return writers

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> "PeftModel":
        """Load an adapter saved by peft_fast or HF PEFT (a local directory, or a Hub id when online) onto `model`.

        On any error (missing/corrupt files, wrong shapes, unsupported config) the base model is left unchanged.
        """
        from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

        model_id = str(model_id)
        hub_kwargs = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs}
        if config is None:
            config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
        elif not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
        config.inference_mode = not is_trainable
        if config.is_prompt_learning and is_trainable:
            raise ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
        if hasattr(config, "runtime_config"):  # (LoRA's settings for this process: LoraRuntimeConfig)
            config.runtime_config.ephemeral_gpu_offload = ephemeral_gpu_offload
        elif ephemeral_gpu_offload:
            warnings.warn("Ephemeral GPU offloading is not supported for this model. Ignoring.")

        before = _snapshot(model)
        peft_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, cls) if cls is PeftModel else cls
        if config.task_type is not None and cls is not PeftModel and cls is not peft_cls:
            warnings.warn(f"Loading a {config.task_type} adapter with {cls.__name__}.")
        peft_model = peft_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                              low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            peft_model.load_adapter(model_id, adapter_name, is_trainable=is_trainable,
                                    autocast_adapter_dtype=autocast_adapter_dtype,
                                    low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        except Exception:
            peft_model._remove_adapter(adapter_name, before)
            if "peft_config" in model.__dict__:
                del model.__dict__["peft_config"]
            raise
        return peft_model

    def load_adapter(
        self,
        model_id: Union[str, os.PathLike],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: Optional[str] = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ):
        """Load the adapter at `model_id` as `adapter_name` (added if new, else its weights are replaced).

        Returns torch's load result; missing adapter keys are warned about. On error the model is left unchanged.
        """
        model_id = str(model_id)
        hub_kwargs = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs}
        if torch_device is None:
            torch_device = infer_device()
        added = False
        before = _snapshot(self)
        if adapter_name not in self.peft_config:
            peft_config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
            if peft_config.peft_type != self.peft_type:
                raise ValueError(
                    f"The adapter at {model_id} is a {PeftType(peft_config.peft_type).value} adapter; this model holds "
                    f"{PeftType(self.peft_type).value} adapters. Cannot combine adapters with different peft types."
                )
            peft_config.inference_mode = not is_trainable
            self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
            added = True
        try:
            weights = load_peft_weights(model_id, device=torch_device, **hub_kwargs)
            _check_adapter_keys(weights, model_id)
            load_result = set_peft_model_state_dict(
                self, weights, adapter_name=adapter_name,
                ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False),
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        except Exception:
            if added:  # leave the model as it was before the call
                self._remove_adapter(adapter_name, before)
            raise
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(PeftType(self.peft_config[adapter_name].peft_type), "")
        missing = [k for k in load_result.missing_keys if prefix in k and f".{adapter_name}" in k]
        load_result.missing_keys.clear()
        load_result.missing_keys.extend(missing)
        if missing:
            warnings.warn(f"Found missing adapter keys while loading the checkpoint: {missing}.")
        if not is_trainable:
            self.eval()
        return load_result

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write (or extend) README.md with the library name and the adapter method, as PEFT does."""
        text = self._model_card_text(output_dir)
        write_files_atomically(output_dir, {"README.md": lambda path: write_text(path, text)})

    def _model_card_text(self, output_dir: str) -> str:
        filename = os.path.join(output_dir, "README.md")
        if os.path.exists(filename):
            with open(filename) as f:
                text = f.read()
        else:
            text = ""
        tags = sorted({str(PeftType(c.peft_type).value).lower() for c in self.peft_config.values()})
        header = "---\nlibrary_name: peft\ntags:\n" + "".join(f"- {t}\n" for t in tags) + "- peft_fast\n---\n"
        if not text.startswith("---"):
            text = header + "\n# Model Card\n\nAdapter trained with peft_fast (file format of HF PEFT).\n" + text
        base = self.peft_config[self.active_adapter if isinstance(self.active_adapter, str) else self.active_adapter[0]]
        line = f"\n- PEFT-compatible adapter: {PeftType(base.peft_type).value}, base model: {base.base_model_name_or_path}\n"
        if line not in text:
            text += line
        return text


def _output_requires_grad(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def _uses_checkpointing(model: nn.Module) -> bool:
    """transformers ≥ 5 calls it is_activation_checkpointing (the old name warns); models without either: True."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return True


def _unshare(state: dict) -> dict:
    """safetensors refuses tensors sharing storage; give each its own contiguous copy where needed."""
    seen = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.device) if tensor.numel() else None
        if ptr is not None and ptr in seen:
            tensor = tensor.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = tensor.contiguous()
    return out


def _check_adapter_keys(weights: dict, model_id: str) -> None:
    if not weights:
        raise ValueError(f"The adapter weights file at {model_id} holds no tensors.")


def _given(**kwargs) -> dict:
    """Only the arguments the caller set: models that lack e.g. output_attentions still work."""
    return {k: v for k, v in kwargs.items() if v is not None}


class _TaskHeadMixin:
    """Task heads (classifier / score / qa_outputs) join modules_to_save, as in PEFT, for every adapter method."""

    _head_names: list[str] = []

    def _init_with_head(self, model, peft_config, adapter_name, kwargs) -> None:
        _add_head_to_modules_to_save(peft_config, self._head_names)
        PeftModel.__init__(self, model, peft_config, adapter_name, **kwargs)
        names = peft_config.modules_to_save or []
        for name, _ in self.get_base_model().named_children():
            if any(head in name for head in names):
                self.cls_layer_name = name
                break

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        _add_head_to_modules_to_save(peft_config, self._head_names)
        PeftModel.add_adapter(self, adapter_name, peft_config, low_cpu_mem_usage)


class PeftModelForSequenceClassification(_TaskHeadMixin, PeftModel):
    """PeftModel for sequence classification; the classifier head is trained (modules_to_save) by default."""

    _head_names = ["classifier", "score"]
    _prompt_head = "seq_cls"

    def __init__(self, model, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> None:
        self._init_with_head(model, peft_config, adapter_name, kwargs)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self.active_peft_config.is_prompt_learning:
            return self._prompt_forward_encoder(
                self._prompt_head, input_ids, attention_mask, inputs_embeds, {"labels": labels}, output_attentions,
                output_hidden_states, return_dict, task_ids, kwargs)
        return PeftModel.forward(self, **_given(input_ids=input_ids, attention_mask=attention_mask,
                                                inputs_embeds=inputs_embeds, labels=labels,
                                                output_attentions=output_attentions,
                                                output_hidden_states=output_hidden_states,
                                                return_dict=return_dict), **kwargs)


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    """PeftModel for token classification; the classifier head is trained (modules_to_save) by default."""

    _prompt_head = "token_cls"


class PeftModelForQuestionAnswering(_TaskHeadMixin, PeftModel):
    """PeftModel for extractive QA; the qa_outputs head is trained (modules_to_save) by default."""

    _head_names = ["qa_outputs"]

    def __init__(self, model, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> None:
        self._init_with_head(model, peft_config, adapter_name, kwargs)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, task_ids=None, **kwargs):
        if self.active_peft_config.is_prompt_learning:
            # PEFT's prompt-learning QA path passes neither token_type_ids nor position_ids on
            return self._prompt_forward_encoder(
                "qa", input_ids, attention_mask, inputs_embeds,
                {"start_positions": start_positions, "end_positions": end_positions}, output_attentions,
                output_hidden_states, return_dict, task_ids, kwargs)
        return PeftModel.forward(self, **_given(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, start_positions=start_positions,
            end_positions=end_positions, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict), **kwargs)


class PeftModelForCausalLM(PeftModel):
    """PeftModel for causal language modeling."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self.active_peft_config.is_prompt_learning:
            return self._prompt_forward_causal_lm(input_ids, attention_mask, inputs_embeds, labels, output_attentions,
                                                  output_hidden_states, return_dict, task_ids, kwargs)
        kwargs = alora.get_alora_offsets_for_forward(self, input_ids, inputs_embeds, **kwargs)
        return PeftModel.forward(self, **_given(input_ids=input_ids, attention_mask=attention_mask,
                                                inputs_embeds=inputs_embeds, labels=labels,
                                                output_attentions=output_attentions,
                                                output_hidden_states=output_hidden_states,
                                                return_dict=return_dict), **kwargs)

    def generate(self, *args, **kwargs):
        if not self.active_peft_config.is_prompt_learning:
            kwargs = alora.get_alora_offsets_for_generate(self, *args, **kwargs)
            return PeftModel.generate(self, *args, **kwargs)
        if getattr(self, "_prompt_generation_disabled", False):
            return self.base_model.generate(*args, **kwargs)
        with self._prepare_inputs_swapped(self._prompt_prepare_inputs_for_generation_causal):
            return self.base_model.generate(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """PeftModel for encoder-decoder language modeling."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self.active_peft_config.is_prompt_learning:
            return self._prompt_forward_seq2seq(
                input_ids, attention_mask, inputs_embeds, decoder_input_ids, decoder_attention_mask,
                decoder_inputs_embeds, labels, output_attentions, output_hidden_states, return_dict, task_ids, kwargs)
        return PeftModel.forward(self, **_given(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict), **kwargs)

    def generate(self, *args, **kwargs):
        if not self.active_peft_config.is_prompt_learning:
            return PeftModel.generate(self, *args, **kwargs)
        if getattr(self, "_prompt_generation_disabled", False):
            return self.base_model.generate(*args, **kwargs)
        if args:
            raise TypeError("generate of a prompt-learning Seq2SeqLM takes keyword arguments only (input_ids=...)")
        with self._prepare_inputs_swapped(self._prompt_prepare_inputs_for_generation_seq2seq):
            return self._prompt_generate_seq2seq(kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    """PeftModel for models that return hidden states / embeddings."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self.active_peft_config.is_prompt_learning:
            return self._prompt_forward_feature_extraction(input_ids, attention_mask, inputs_embeds,
                                                           output_attentions, output_hidden_states, return_dict,
                                                           kwargs)
        return PeftModel.forward(self, **_given(input_ids=input_ids, attention_mask=attention_mask,
                                                inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                                                output_hidden_states=output_hidden_states,
                                                return_dict=return_dict), **kwargs)


def _add_head_to_modules_to_save(peft_config: PeftConfig, head_names: list[str]) -> None:
    """Like PEFT: the task head names join modules_to_save (names the model lacks simply match nothing)."""
    # PEFT extends the user's list as it is (a name may then appear twice); keep the files identical
    peft_config.modules_to_save = list(peft_config.modules_to_save or []) + list(head_names)


__all__ = [
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
]
