"""peft_fast: a drop-in, kernel-accelerated replacement for Hugging Face PEFT.

`import peft_fast as peft` — same names, arguments, defaults and file formats as PEFT.
"""

__version__ = "0.1.0"

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys


class _SourceKernelsFinder(_abc.MetaPathFinder):
    """In a source checkout, `peft_fast.kernels` is the top-level kernels/ folder (installs map it in setup.py)."""

    _dir = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft_fast.kernels" or not _os.path.isfile(_os.path.join(self._dir, "__init__.py")):
            return None
        return _util.spec_from_file_location(
            fullname, _os.path.join(self._dir, "__init__.py"), submodule_search_locations=[self._dir]
        )


if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")):
    _sys.meta_path.append(_SourceKernelsFinder())

from .config import PeftConfig, PromptLearningConfig  # noqa: E402
from .mapping import (  # noqa: E402
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
    inject_adapter_in_model,
)
from .mapping_func import get_peft_model  # noqa: E402
from .mixed_model import PeftMixedModel  # noqa: E402
from .peft_model import (  # noqa: E402
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .tuners import (  # noqa: E402
    BaseTuner,
    BaseTunerLayer,
    LoHaConfig,
    LoHaModel,
    LoKrConfig,
    LoKrModel,
    LoraConfig,
    LoraModel,
    PrefixEncoder,
    PrefixTuningConfig,
    PromptEmbedding,
    PromptEncoder,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
)
from .utils import (  # noqa: E402
    PeftType,
    TaskType,
    cast_mixed_precision_params,
    get_peft_model_state_dict,
    load_peft_weights,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)

__all__ = [
    "__version__",
    "PeftConfig",
    "PromptLearningConfig",
    "LoraConfig",
    "LoraModel",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "PrefixTuningConfig",
    "PrefixEncoder",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PromptEmbedding",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptEncoder",
    "BaseTuner",
    "BaseTunerLayer",
    "PeftModel",
    "PeftMixedModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "get_peft_config",
    "get_peft_model",
    "inject_adapter_in_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "cast_mixed_precision_params",
]
