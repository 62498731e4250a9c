"""PrefixEncoder: the trained key/value prefix (PEFT's `peft.tuners.prefix_tuning.model`)."""

from __future__ import annotations

import torch
from torch import nn

from ..tuners_utils import BasePromptEncoder


class PrefixEncoder(BasePromptEncoder):
    """(batch, num_virtual_tokens) token ids → (batch, num_virtual_tokens, num_layers · 2 · token_dim).

    Without projection the prefix is an embedding table of that width; with `prefix_projection` (and not in
    inference mode, where the saved prefix is loaded directly) it is a token_dim embedding through a Tanh MLP.
    """

    def __init__(self, config):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = config.num_layers * 2 * config.token_dim
        if self.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding(prefix))
        return self.embedding(prefix)

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        if self.prefix_projection:
            raise ValueError("Cannot load flattened prompt embeddings when `prefix_projection=True`.")
        super().load_prompt_embeddings(prompt_embeddings)
