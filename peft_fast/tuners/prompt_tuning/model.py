"""PromptEmbedding: the trained virtual-token embeddings (PEFT's `peft.tuners.prompt_tuning.model`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..tuners_utils import BasePromptEncoder
from .config import PromptTuningInit


class PromptEmbedding(BasePromptEncoder):
    """(batch, total_virtual_tokens) ids → (batch, total_virtual_tokens, token_dim), initialised per config."""

    def __init__(self, config, word_embeddings: nn.Module):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        init = PromptTuningInit(config.prompt_tuning_init)
        if config.inference_mode or init == PromptTuningInit.RANDOM:
            return
        if init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        else:
            ids = _text_token_ids(config, total)
        ids = ids.to(word_embeddings.weight.device)
        weights = word_embeddings(ids).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(weights)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def _text_token_ids(config, total: int) -> torch.Tensor:
    """Token ids of the init text, repeated or cut to exactly `total` tokens."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a saved config must not be able to run code
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError("prompt_tuning_init_text tokenizes to no tokens.")
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return torch.tensor(ids, dtype=torch.long)
