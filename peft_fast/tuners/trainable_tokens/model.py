"""TrainableTokensModel (PEFT's `peft.tuners.trainable_tokens.model`)."""

from __future__ import annotations

from torch import nn

from ...utils.other import (
    _get_input_embeddings_name,
    _get_submodules,
    get_module_names_tied_with_embedding,
    names_module,
)
from ..tuners_utils import BaseTuner
from .layer import TrainableTokensLayer


class TrainableTokensModel(BaseTuner):
    """`get_peft_model(model, TrainableTokensConfig(token_indices=[...]))`: selected embedding rows train. Layers
    tied to the input embedding (an LM head under tie_word_embeddings) follow the same rows."""

    prefix: str = "trainable_tokens_"
    tuner_layer_cls = TrainableTokensLayer

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            peft_config.target_modules = _get_input_embeddings_name(self.model) or "embed_tokens"
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = get_module_names_tied_with_embedding(model)
        if not tied or not self.get_model_config(model).get("tie_word_embeddings", False) or \
                not isinstance(embedding, TrainableTokensLayer):
            return
        # each layer sharing the embedding's weight gets a layer tied to the embedding's adapter (replacing one the
        # targets may have made of its own)
        peft_config = self.peft_config[adapter_name]
        for name, module in list(model.named_modules(remove_duplicate=False)):
            if not any(names_module(name, key) for key in tied):
                continue
            parent, target, target_name = _get_submodules(model, name)
            base = target.base_layer if isinstance(target, TrainableTokensLayer) else target
            if isinstance(target, TrainableTokensLayer) and target.tied_adapter is embedding:
                continue
            setattr(parent, target_name, self._create_new_module(peft_config, adapter_name, base, tied_adapter=embedding))

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key,
                            tied_adapter=None) -> None:
        if isinstance(target, TrainableTokensLayer):
            target.update_layer(adapter_name, config=peft_config, tied_adapter=tied_adapter)
        else:
            new_module = self._create_new_module(peft_config, adapter_name, target, tied_adapter=tied_adapter)
            self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(peft_config, adapter_name, target, tied_adapter=None) -> TrainableTokensLayer:
        new_module = TrainableTokensLayer(target, adapter_name, config=peft_config, tied_adapter=tied_adapter)
        new_module.update_layer(adapter_name, config=peft_config, tied_adapter=tied_adapter)
        return new_module
