"""LoHaConfig (PEFT's `peft.tuners.loha.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...utils.peft_types import PeftType
from ..lycoris_utils import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """Low-rank Hadamard product adapter: ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r.

    Args:
        r, alpha: rank and scaling numerator. rank_dropout: probability of dropping each output row of ΔW in
        training. module_dropout: probability of skipping the adapter for a training step. use_effective_conv2d:
        Tucker-factored kernels for convs with kernel > 1. target_modules, exclude_modules, init_weights (True:
        ΔW starts at zero; False: random), layers_to_transform, layers_pattern, modules_to_save: as in LoRA.
    """

    r: int = field(default=8, metadata={"help": "LoHa rank"})
    alpha: int = field(default=8, metadata={"help": "LoHa alpha"})
    rank_dropout: float = field(default=0.0, metadata={"help": "The dropout probability for rank dimension"})
    module_dropout: float = field(default=0.0, metadata={"help": "The dropout probability for disabling LoHa"})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "Use parameter effective decomposition"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    init_weights: bool = field(default=True, metadata={"help": "Initialise so that ΔW starts at zero"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indexes"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer pattern"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra trainable modules"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LOHA
        _normalise_targets(self)


def _normalise_targets(config) -> None:
    """Lists of module names become sets (as PEFT stores them); a layers_pattern needs layers_to_transform."""
    if isinstance(config.target_modules, list):
        config.target_modules = set(config.target_modules)
    if isinstance(config.exclude_modules, list):
        config.exclude_modules = set(config.exclude_modules)
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
