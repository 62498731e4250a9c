"""PromptTuningConfig (PEFT's `peft.tuners.prompt_tuning.config`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PromptLearningConfig
from ...utils.peft_types import PeftType


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: trained virtual-token embeddings prepended to the input embeddings.

    Args:
        prompt_tuning_init: RANDOM, SAMPLE_VOCAB (embeddings of random vocabulary tokens) or TEXT (embeddings of
            `prompt_tuning_init_text` tokenized with `tokenizer_name_or_path`, repeated or cut to length).
        prompt_tuning_init_text, tokenizer_name_or_path, tokenizer_kwargs: for TEXT.
    """

    prompt_tuning_init: Union[PromptTuningInit, str] = field(default=PromptTuningInit.RANDOM)
    prompt_tuning_init_text: Optional[str] = field(default=None)
    tokenizer_name_or_path: Optional[str] = field(default=None)
    tokenizer_kwargs: Optional[dict] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.PROMPT_TUNING
        try:
            init = PromptTuningInit(self.prompt_tuning_init)
        except ValueError:
            raise ValueError(
                f"prompt_tuning_init must be one of {[m.value for m in PromptTuningInit]}, got "
                f"{self.prompt_tuning_init!r}"
            ) from None
        if init == PromptTuningInit.TEXT and not self.tokenizer_name_or_path:
            raise ValueError(
                f"When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be {self.tokenizer_name_or_path}."
            )
        if init == PromptTuningInit.TEXT and self.prompt_tuning_init_text is None:
            raise ValueError("When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None.")
        if self.tokenizer_kwargs and init != PromptTuningInit.TEXT:
            raise ValueError("tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'.")
