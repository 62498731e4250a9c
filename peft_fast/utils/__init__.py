from .constants import (
    CONFIG_NAME,
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    SAFETENSORS_WEIGHTS_NAME,
    TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    WEIGHTS_NAME,
)
from .error import NoMatchingPeftModuleError, PeftError
from .loftq_utils import replace_lora_weights_loftq
from .other import (
    ModulesToSaveWrapper,
    id_tensor_storage,
    shift_tokens_right,
    _get_submodules,
    _set_trainable,
    cast_mixed_precision_params,
    infer_device,
    prepare_model_for_kbit_training,
    transpose,
)
from .peft_types import PeftType, TaskType
from .warning import PeftWarning
from .save_and_load import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)

__all__ = [
    "CONFIG_NAME",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "WEIGHTS_NAME",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftWarning",
    "id_tensor_storage",
    "shift_tokens_right",
    "ModulesToSaveWrapper",
    "_get_submodules",
    "_set_trainable",
    "cast_mixed_precision_params",
    "infer_device",
    "prepare_model_for_kbit_training",
    "replace_lora_weights_loftq",
    "transpose",
    "PeftType",
    "TaskType",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "set_base_model_state_dict",
    "load_peft_weights",
    "set_peft_model_state_dict",
]
