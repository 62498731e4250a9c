"""Adapter configurations and their adapter_config.json, readable and writable by HF PEFT."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from .utils.atomic_save import recover_interrupted_save, write_files_atomically, write_text
from .utils.constants import CONFIG_NAME
from .utils.peft_types import PeftType, TaskType

# peft_type -> config class; filled by the tuner packages as they are imported (see mapping.py).
PEFT_TYPE_TO_CONFIG_MAPPING: dict[str, type] = {}


def register_peft_config(peft_type: PeftType, config_cls: type) -> None:
    PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)] = config_cls


def _jsonable(value):
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class PeftConfigMixin:
    """Serialization shared by every config: to_dict, save_pretrained, from_pretrained."""

    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "The task type."})
    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "The type of PEFT model."})
    auto_mapping: Optional[dict] = field(default=None, metadata={"help": "Custom base model class, if any."})
    peft_version: Optional[str] = field(default=None, metadata={"help": "Version that wrote this config."})

    def __post_init__(self):
        if self.task_type is not None and self.task_type not in list(TaskType):
            raise ValueError(
                f"Invalid task type: '{self.task_type}'. Must be one of: {[t.value for t in TaskType]}."
            )
        if self.peft_version is None:
            from . import __version__

            self.peft_version = f"peft_fast-{__version__}"

    def to_dict(self) -> dict:
        return asdict(self)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write adapter_config.json (sorted keys, indent 2, as PEFT writes it) into `save_directory`."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        text = self.to_json_text(kwargs.pop("auto_mapping_dict", None))
        write_files_atomically(save_directory, {CONFIG_NAME: lambda path: write_text(path, text)})

    def to_json_text(self, auto_mapping_dict: Optional[dict] = None) -> str:
        """The content of adapter_config.json."""
        output_dict = {key: _jsonable(value) for key, value in self.to_dict().items()}
        if auto_mapping_dict is not None:
            output_dict["auto_mapping"] = auto_mapping_dict
        return json.dumps(output_dict, indent=2, sort_keys=True)

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Build the config class named by kwargs['peft_type'] from a plain dict, dropping unknown keys with a warning."""
        if "peft_type" not in kwargs:
            raise ValueError("The config dict has no 'peft_type'; cannot tell which adapter config to build.")
        peft_type = kwargs["peft_type"]
        config_cls = _config_class_for(peft_type)
        if cls not in (PeftConfigMixin, PeftConfig) and not issubclass(config_cls, cls):
            raise ValueError(
                f"The config file is for peft_type '{PeftType(peft_type).value}', which {cls.__name__} cannot load; "
                f"use {config_cls.__name__} or PeftConfig.from_pretrained instead."
            )
        known = {f.name for f in dataclasses.fields(config_cls) if f.init}
        unexpected = sorted(set(kwargs) - known)
        if unexpected:
            warnings.warn(
                f"Unexpected keyword arguments {unexpected} for class {config_cls.__name__}, these are ignored. "
                "This probably means that you're loading a configuration file that was saved using a newer PEFT "
                "version."
            )
        return config_cls(**{k: v for k, v in kwargs.items() if k in known})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load adapter_config.json from a local directory or a Hub repo id (downloaded when online)."""
        path = (
            os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        )
        hf_hub_download_kwargs, class_kwargs, _ = cls._split_kwargs(kwargs)
        recover_interrupted_save(path)  # a save killed half-way: back to the old adapter, whole
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            config_file = os.path.join(path, CONFIG_NAME)
        elif os.path.isdir(path):
            raise ValueError(f"Can't find '{CONFIG_NAME}' in the directory '{path}'.")
        else:
            config_file = _hub_download(pretrained_model_name_or_path, CONFIG_NAME, subfolder, hf_hub_download_kwargs)
        loaded = cls.from_json_file(config_file)
        loaded.update(class_kwargs)
        return cls.from_peft_type(**loaded)

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        try:
            with open(path_json_file) as file:
                json_object = json.load(file)
        except json.JSONDecodeError as exc:
            raise ValueError(f"The adapter config file {path_json_file} is not valid JSON: {exc}") from exc
        if not isinstance(json_object, dict):
            raise ValueError(f"The adapter config file {path_json_file} does not hold a JSON object.")
        if "runtime_config" in json_object:  # (settings of one process: never part of a saved adapter)
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                          "configurations are only valid at runtime.")
            del json_object["runtime_config"]
        return json_object

    @classmethod
    def _split_kwargs(cls, kwargs):
        hub_params = {"cache_dir", "force_download", "local_files_only", "token", "revision", "proxies"}
        hf_hub_download_kwargs, class_kwargs, other_kwargs = {}, {}, {}
        init_params = set(inspect.signature(cls.__init__).parameters) if cls is not PeftConfigMixin else set()
        for key, value in kwargs.items():
            if key in hub_params:
                hf_hub_download_kwargs[key] = value
            elif key in init_params:
                class_kwargs[key] = value
            else:
                other_kwargs[key] = value
        return hf_hub_download_kwargs, class_kwargs, other_kwargs

    @classmethod
    def _get_peft_type(cls, model_id: str, **hf_hub_download_kwargs) -> str:
        subfolder = hf_hub_download_kwargs.pop("subfolder", None)
        path = os.path.join(model_id, subfolder) if subfolder else model_id
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            config_file = os.path.join(path, CONFIG_NAME)
        else:
            config_file = _hub_download(model_id, CONFIG_NAME, subfolder, hf_hub_download_kwargs)
        return cls.from_json_file(config_file)["peft_type"]

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False


def _config_class_for(peft_type) -> type:
    from . import mapping  # noqa: F401  (importing it registers every tuner's config)

    try:
        key = PeftType(peft_type)
    except ValueError:
        raise ValueError(f"Unknown peft_type '{peft_type}' in the adapter config.") from None
    if key not in PEFT_TYPE_TO_CONFIG_MAPPING:
        supported = sorted(t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING)
        raise ValueError(f"peft_type '{key.value}' is not supported by peft_fast (supported: {supported}).")
    return PEFT_TYPE_TO_CONFIG_MAPPING[key]


def _hub_download(repo_id: str, filename: str, subfolder: Optional[str], kwargs: dict) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise ValueError(f"'{repo_id}' is not a local directory and huggingface_hub is not installed.") from exc
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, **kwargs)
    except Exception as exc:
        raise ValueError(f"Can't find '{filename}' at '{repo_id}' (not a local directory, and the Hub said: {exc})") from exc


@dataclass
class PeftConfig(PeftConfigMixin):
    """Base configuration of every adapter method."""

    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "The name of the base model."})
    revision: Optional[str] = field(default=None, metadata={"help": "The revision of the base model."})
    inference_mode: bool = field(default=False, metadata={"help": "Whether to use inference mode."})


@dataclass
class PromptLearningConfig(PeftConfig):
    """Base configuration of the prompt-learning methods (prefix, prompt and p-tuning)."""

    num_virtual_tokens: int = field(default=None, metadata={"help": "Number of virtual tokens."})
    token_dim: int = field(default=None, metadata={"help": "Hidden embedding dimension of the base model."})
    num_transformer_submodules: Optional[int] = field(default=None, metadata={"help": "Number of submodules."})
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Number of attention heads."})
    num_layers: Optional[int] = field(default=None, metadata={"help": "Number of transformer layers."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra trainable modules."})

    @property
    def is_prompt_learning(self) -> bool:
        return True
