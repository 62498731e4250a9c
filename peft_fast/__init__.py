"""peft_fast: a drop-in, kernel-accelerated replacement for Hugging Face PEFT.

`import peft_fast as peft` — same names, arguments, defaults and file formats as PEFT.
"""

__version__ = "0.1.0"

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig, PromptLearningConfig
from .mapping import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
    inject_adapter_in_model,
)
from .mapping_func import get_peft_model
from .mixed_model import PeftMixedModel
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_layer_status,
    get_model_status,
)
from .tuners import (
    BaseTuner,
    BaseTunerLayer,
    LoHaConfig,
    LoHaModel,
    LoKrConfig,
    LoKrModel,
    LoftQConfig,
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
    TrainableTokensConfig,
    TrainableTokensModel,
    convert_to_lora,
    save_as_lora,
)
from .utils import (
    NoMatchingPeftModuleError,
    PeftError,
    PeftWarning,
    PeftType,
    TaskType,
    cast_mixed_precision_params,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    prepare_model_for_kbit_training,
    replace_lora_weights_loftq,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)

__all__ = [
    "__version__",
    "PeftConfig",
    "PromptLearningConfig",
    "LoraConfig",
    "LoftQConfig",
    "LoraModel",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "TrainableTokensConfig",
    "TrainableTokensModel",
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
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "PeftModel",
    "get_layer_status",
    "get_model_status",
    "PeftMixedModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftWarning",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "get_peft_config",
    "get_peft_model",
    "inject_adapter_in_model",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "replace_lora_weights_loftq",
    "convert_to_lora",
    "save_as_lora",
    "cast_mixed_precision_params",
]

# transformers' Trainer writes and reloads adapter checkpoints of peft_fast models as of HF PEFT's (trainer_support.py)
from . import trainer_support as _trainer_support  # noqa: E402

_trainer_support.activate()
