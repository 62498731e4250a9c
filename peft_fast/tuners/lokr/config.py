"""LoKrConfig (PEFT's `peft.tuners.lokr.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...utils.peft_types import PeftType
from ..loha.config import _normalise_targets
from ..lycoris_utils import LycorisConfig


@dataclass
class LoKrConfig(LycorisConfig):
    """Low-rank Kronecker product adapter: ΔW = W1 ⊗ W2 · alpha / r, the factors themselves low-rank when large.

    Args (beyond LoHa's): decompose_both (also factor W1), decompose_factor (Kronecker split near this factor;
    -1: near the square root), rank_dropout_scale (rescale the rows kept by rank dropout), init_weights
    (True: ΔW = 0; False: random; "lycoris": the LyCORIS library's zero init).
    """

    r: int = field(default=8, metadata={"help": "LoKr rank"})
    alpha: int = field(default=8, metadata={"help": "LoKr alpha"})
    rank_dropout: float = field(default=0.0, metadata={"help": "The dropout probability for rank dimension"})
    module_dropout: float = field(default=0.0, metadata={"help": "The dropout probability for disabling LoKr"})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "Use parameter effective decomposition"})
    decompose_both: bool = field(default=False, metadata={"help": "Perform rank decomposition of left kronecker"})
    decompose_factor: int = field(default=-1, metadata={"help": "Kronecker product decomposition factor."})
    rank_dropout_scale: bool = field(default=False, metadata={"help": "Rank dropout scale"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    init_weights: Union[bool, Literal["lycoris"]] = field(default=True, metadata={"help": "Initialisation"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indexes"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer pattern"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra trainable modules"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LOKR
        _normalise_targets(self)
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
