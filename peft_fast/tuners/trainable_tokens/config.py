"""TrainableTokensConfig (PEFT's `peft.tuners.trainable_tokens.config`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...utils.peft_types import PeftType


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Train the embedding rows of a few tokens (new or existing ones) and leave the rest of the matrix frozen.

    Args:
        token_indices: the indices of the tokens whose embeddings train.
        target_modules: the embedding layer(s) to adapt, names or a regex; None: the model's input embeddings
            (`get_input_embeddings()`), else 'embed_tokens'.
        init_weights: True (default) starts the rows at the tokens' current embeddings, so the adapter is a no-op
            until trained; False starts them random.
    With tied input/output embeddings (tie_word_embeddings), the output layer follows the same rows.
    """

    token_indices: list[int] = field(default_factory=list, metadata={"help": "Indices of the tokens to train."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Embedding layer(s) to adapt; None: the model's input embeddings."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Start from the current embeddings (a no-op)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.TRAINABLE_TOKENS
        check_token_indices(self.token_indices, "TrainableTokensConfig.token_indices")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"TrainableTokensConfig.init_weights must be True or False, got {self.init_weights!r}")


def check_token_indices(indices, what: str) -> None:
    """A list of distinct non-negative ints, or a clear ValueError naming `what` (the range is checked against the
    layer when the adapter is made)."""
    if not isinstance(indices, (list, tuple)):
        raise ValueError(f"{what} must be a list of token indices, got {type(indices).__name__} {indices!r}")
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
    if bad:
        raise ValueError(f"{what} must hold non-negative integers, got {bad[:5]!r}")
    if len(set(indices)) != len(indices):
        seen, repeated = set(), []
        for i in indices:
            if i in seen:
                repeated.append(i)
            seen.add(i)
        raise ValueError(f"{what} holds the same token more than once: {sorted(set(repeated))[:5]!r}")
