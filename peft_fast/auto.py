"""`AutoPeftModel…` classes: load the base model an adapter was trained on, then the adapter, from the adapter's
folder (or Hub id) alone — PEFT's `AutoPeftModelForCausalLM.from_pretrained("path/to/adapter")`.

The adapter config names the base (`base_model_name_or_path`, `revision`); each class loads it with its
transformers Auto class and wraps it in the matching PeftModel class. `AutoPeftModel` takes adapters saved without a
task type, whose config records the base model class (`auto_mapping`).
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

from .config import PeftConfig
from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "proxies", "subfolder")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


class _BaseAutoPeftModel:
    _target_class_name: Optional[str] = None  # the transformers Auto class; None: from the config's auto_mapping
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(f"{type(self).__name__} is designed to be instantiated using "
                               f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)`.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter_name: str = "default", is_trainable: bool = False,
                        config: Optional[PeftConfig] = None, revision: Optional[str] = None, **kwargs) -> PeftModel:
        """The base model named by the adapter config, loaded with this class's Auto class (`kwargs` go to its
        `from_pretrained` too: dtype, device_map, …), with the adapter loaded onto it as `adapter_name`."""
        path = str(pretrained_model_name_or_path)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        peft_config = PeftConfig.from_pretrained(path, revision=revision, **hub)
        task_type = getattr(peft_config, "task_type", None)
        target_class = cls._base_model_class(peft_config, task_type)
        base_kwargs = {k: v for k, v in kwargs.items() if k != "subfolder"}
        base_model = target_class.from_pretrained(peft_config.base_model_name_or_path,
                                                  revision=peft_config.revision, **base_kwargs)
        cls._resize_to_saved_tokenizer(base_model, path, hub)
        return cls._target_peft_class.from_pretrained(base_model, path, adapter_name=adapter_name,
                                                      is_trainable=is_trainable, config=config, revision=revision,
                                                      **kwargs)

    @classmethod
    def _base_model_class(cls, peft_config: PeftConfig, task_type):
        if cls._target_class_name is None and task_type is not None:
            raise ValueError("Cannot use `AutoPeftModel` with a task type, please use a specific class for your task "
                             "type. (e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)")
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
            if expected is not None and cls._target_peft_class.__name__ != expected.__name__:
                raise ValueError(f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                                 f"{cls._target_peft_class.__name__} make sure that you are loading the correct "
                                 "model for your task type.")
        if cls._target_class_name is not None:
            return getattr(importlib.import_module("transformers"), cls._target_class_name)
        mapping = getattr(peft_config, "auto_mapping", None)
        if mapping is None:
            raise ValueError("Cannot infer the auto class from the config, please make sure that you are loading the "
                             "correct model for your task type.")
        return getattr(importlib.import_module(mapping["parent_library"]), mapping["base_model_class"])

    @staticmethod
    def _resize_to_saved_tokenizer(base_model, path: str, hub: dict) -> None:
        """An adapter saved with its tokenizer (new tokens added in fine-tuning) gets embeddings of that size."""
        folder = os.path.join(path, hub["subfolder"]) if hub.get("subfolder") else path
        if not any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
            return
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        embeddings = base_model.get_input_embeddings()
        if embeddings is not None and embeddings.weight.shape[0] != len(tokenizer):
            base_model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    _target_class_name = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class_name = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
