from .config import PrefixTuningConfig
from .kv_init import (initialize_kv_prefix_from_past_key_values, initialize_kv_prefix_from_text,
                      prompt_embeddings_from_past_key_values)
from .model import PrefixEncoder

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "initialize_kv_prefix_from_past_key_values",
           "initialize_kv_prefix_from_text", "prompt_embeddings_from_past_key_values"]
