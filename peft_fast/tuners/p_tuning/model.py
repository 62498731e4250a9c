"""PromptEncoder: p-tuning's reparameterized virtual tokens (PEFT's `peft.tuners.p_tuning.model`)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..tuners_utils import BasePromptEncoder
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType


class PromptEncoder(BasePromptEncoder):
    """Embedding → MLP (3 linear layers) or bidirectional LSTM → MLP; in inference mode the embedding alone holds
    the saved (already encoded) prompt."""

    def __init__(self, config):
        super().__init__()
        self.token_dim = config.token_dim
        self.input_size = self.token_dim
        self.output_size = self.token_dim
        self.hidden_size = config.encoder_hidden_size
        self.total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if config.inference_mode:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=self.input_size, hidden_size=self.hidden_size, num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout, bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.hidden_size * 2, self.hidden_size * 2),
                nn.ReLU(),
                nn.Linear(self.hidden_size * 2, self.output_size),
            )
        else:
            if config.encoder_num_layers != PromptEncoderConfig.encoder_num_layers:
                warnings.warn(
                    f"for {self.encoder_type.value}, the argument `encoder_num_layers` is ignored. Exactly "
                    f"{PromptEncoderConfig.encoder_num_layers} MLP layers are used."
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.input_size, self.hidden_size),
                nn.ReLU(),
                nn.Linear(self.hidden_size, self.hidden_size),
                nn.ReLU(),
                nn.Linear(self.hidden_size, self.output_size),
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            return self.mlp_head(self.lstm_head(embeds)[0])
        return self.mlp_head(embeds)
