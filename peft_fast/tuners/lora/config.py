"""LoraConfig: PEFT's field names, defaults and validation."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...utils.peft_types import PeftType

# Fields HF PEFT's LoraConfig carries for methods peft_fast does not implement. They are kept so that config
# files round-trip byte for byte; a non-default value is refused with a clear error instead of being ignored.
_UNSUPPORTED_FIELDS = {
    "megatron_config": None,
    "use_qalora": False,
    "monteclora_config": None,
}

SUPPORTED_INIT_LORA_WEIGHTS = (True, False, "gaussian", "pissa", "olora", "corda", "orthogonal", "loftq", "eva",
                               "lora_ga", "mica")


@dataclass
class LoraGAConfig:
    """LoRA-GA initialisation (arXiv 2407.05000; `init_lora_weights="lora_ga"`, after
    `peft_fast.tuners.lora.loraga.preprocess_loraga`): A and B from the top singular vectors of each layer's weight
    gradient on a few training batches, so that the first steps follow full fine-tuning's direction; the base weight
    keeps W − s·B·A (the model's output is unchanged at the start).

    Args:
        direction: which of the gradient's first 2r singular triplets go to A and which to B: "ArB2r" (A the first r,
            B the next r), "A2rBr" (the other way), "ArBr" (A the odd ones, B the even ones), "random".
        scale: B's scale: "stable" (· out_features^¼ / √stable_gamma), "weight_svd" (so that B's largest singular
            value is the weight's), "gd_scale" (A and B divided by the LoRA scaling), "unit" (none).
        stable_gamma: γ of the "stable" scale.
    """

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = field(
        default="ArB2r", metadata={"help": "Component distribution strategy from gradient SVD"}
    )
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = field(
        default="stable", metadata={"help": "Scaling strategy for initialization"}
    )
    stable_gamma: int = field(default=16, metadata={"help": "Gamma parameter for stable scaling"})

    def __post_init__(self):
        if self.direction not in ("ArBr", "A2rBr", "ArB2r", "random"):
            raise ValueError(f"LoraGAConfig.direction must be 'ArBr', 'A2rBr', 'ArB2r' or 'random', got "
                             f"{self.direction!r}")
        if self.scale not in ("stable", "weight_svd", "gd_scale", "unit"):
            raise ValueError(f"LoraGAConfig.scale must be 'stable', 'weight_svd', 'gd_scale' or 'unit', got "
                             f"{self.scale!r}")
        if not _is_real(self.stable_gamma) or self.stable_gamma <= 0:
            raise ValueError(f"LoraGAConfig.stable_gamma must be a positive number, got {self.stable_gamma!r}")


@dataclass
class EvaConfig:
    """EVA initialisation (Explained Variance Adaptation, arXiv 2410.07170; `init_lora_weights="eva"`, then
    `initialize_lora_eva_weights(peft_model, dataloader)`): each adapted layer's A starts as the top principal
    components of that layer's inputs on the data, and the ranks are redistributed over the layers by explained
    variance.

    Args:
        rho: ≥ 1; a layer may get up to round(r · rho) components (1: no redistribution).
        tau: cosine similarity between the components of two successive batches above which they count as converged.
        use_label_mask: leave out positions whose label is `label_mask_value` (the prompt in most SFT data).
        label_mask_value: the label that marks ignored positions.
        whiten: divide each component by the square root of its singular value.
        adjust_scaling_factors: scale lora_alpha with each layer's new rank (alpha · new_r / r), so that every layer's
            scaling stays alpha / r.
    """

    rho: float = field(default=2.0, metadata={"help": "Rho value for EVA redistribution"})
    tau: float = field(default=0.99, metadata={"help": "Cosine similarity threshold for early stopping"})
    use_label_mask: bool = field(default=True, metadata={"help": "Use label mask for EVA initialization"})
    label_mask_value: int = field(
        default=-100, metadata={"help": "if use_label_mask=True the value to look for to mask out ignored tokens"}
    )
    whiten: bool = field(default=False, metadata={"help": "Apply whitening to singular vectors"})
    adjust_scaling_factors: bool = field(
        default=True, metadata={"help": "Adjust LoRA scaling factors after the rank redistribution"}
    )

    def __post_init__(self):
        if not _is_real(self.rho) or self.rho < 1.0:
            raise ValueError("`rho` must be >= 1.0")
        if not _is_real(self.tau) or not 0.0 <= self.tau <= 1.0:
            raise ValueError("`tau` must be between 0.0 and 1.0.")


@dataclass
class CordaConfig:
    """CorDA initialisation (`init_lora_weights="corda"`; run `peft_fast.tuners.lora.corda.preprocess_corda` first).

    Args:
        cache_file: where to keep the per-layer SVD results (reused when it exists: no calibration run needed).
        covariance_file: where to keep the per-layer input covariances (reusable for other ranks).
        corda_method: "ipm" (instruction-previewed: the adapter takes the largest context-weighted singular
            directions, for fastest fine-tuning) or "kpm" (knowledge-preserved: the smallest, so the pre-trained
            behaviour is kept in the residual weight).
        verbose: show progress while collecting the SVDs.
        use_float16_for_covariance: accumulate covariances in fp16 (half the memory, less stable).
        prune_temporary_fields: drop the covariances and per-layer settings from the modules afterwards.
    """

    cache_file: Optional[str] = field(default=None, metadata={"help": "File to store the SVD cache."})
    covariance_file: Optional[str] = field(default=None, metadata={"help": "File to store the covariances."})
    corda_method: Literal["ipm", "kpm"] = field(default="ipm", metadata={"help": "'ipm' or 'kpm'."})
    verbose: bool = field(default=False, metadata={"help": "Print progress."})
    use_float16_for_covariance: bool = field(default=False, metadata={"help": "fp16 covariance matrices."})
    prune_temporary_fields: bool = field(default=True, metadata={"help": "Drop temporary fields afterwards."})

    def __post_init__(self):
        if self.corda_method not in ("ipm", "kpm"):
            raise ValueError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}")


@dataclass
class LoftQConfig:
    """LoftQ settings, with init_lora_weights="loftq" (peft_fast.utils.loftq_utils): quantize to `loftq_bits` (4: NF4,
    8: int8) and alternate quantization and SVD `loftq_iter` times."""

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits for LoftQ"})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating iterations for LoftQ"})


@dataclass
class BdLoraConfig:
    """BD-LoRA (block-diagonal LoRA, for multi-LoRA serving with tensor parallelism; peft_fast.tuners.lora.bdlora):
    in the modules whose name contains a pattern of `target_modules_bd_a` lora_A is block-diagonal (row-sharded
    modules: attention out, MLP down), in those of `target_modules_bd_b` lora_B (column-sharded: q, k, v, up, gate),
    with `nblocks` blocks (the serving shard count). `match_strict`: every target must match one of the two lists."""

    target_modules_bd_a: Optional[list[str]] = field(default=None, metadata={
        "help": "Modules where the LoRA-A is block-diagonal (a pattern matches if it is in the module name)."})
    target_modules_bd_b: Optional[list[str]] = field(default=None, metadata={
        "help": "Modules where the LoRA-B is block-diagonal (a pattern matches if it is in the module name)."})
    nblocks: int = field(default=1, metadata={"help": "Number of blocks each block-diagonal matrix has."})
    match_strict: bool = field(default=True, metadata={
        "help": "Require each target module to have a block-diagonal LoRA-A or LoRA-B."})

    def __post_init__(self):
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ValueError("Found overlapping modules in target_modules_bd lists:"
                             f"{self.target_modules_bd_a} (A) and {self.target_modules_bd_b} (B).")


@dataclass
class VeloraConfig:
    """VeLoRA (arXiv 2405.17991; peft_fast.tuners.lora.velora): lora_A's input is kept for backward as one number per
    group of in_features / `num_groups` features, its projection on a unit vector; A's gradient uses the rank-1
    reconstruction times `scale`. `init_type`: that vector from the batch's mean sub-token at every training forward
    ("batch_average"), at the first only ("batch_average_once"), or drawn at random once ("random")."""

    num_groups: int = field(default=64, metadata={
        "help": "Number of feature groups used by VeLoRA to split the input activation depth before compression."})
    scale: float = field(default=1.0, metadata={
        "help": "Scale applied to the reconstructed activations in the VeLoRA backward pass."})
    init_type: Literal["batch_average", "batch_average_once", "random"] = field(default="batch_average", metadata={
        "help": "Projection initialization strategy for VeLoRA: 'batch_average', 'batch_average_once' or 'random'."})

    def __post_init__(self):
        if self.num_groups <= 0:
            raise ValueError(f"`num_groups` should be positive, got {self.num_groups}.")
        if self.scale <= 0:
            raise ValueError(f"`scale` should be positive, got {self.scale}.")
        if self.init_type not in {"batch_average_once", "batch_average", "random"}:
            raise ValueError(f"Unsupported `init_type` {self.init_type!r}. Supported values are 'batch_average_once', "
                             "'batch_average', and 'random'.")


@dataclass
class KasaConfig:
    """KaSA (Knowledge-aware Singular-value Adaptation, arXiv 2412.06071) on an adapter: its base weights lose their
    r smallest singular components at initialisation (destructive: disabling or unloading the adapter does not bring
    them back, so KaSA and non-KaSA adapters cannot share a model), and the update is s·B·diag(lora_diag)·A with a
    learnable r-vector `lora_diag`. `beta` (on Σ lora_diag²) and `gamma` (on ‖BᵀB − I‖ + ‖AAᵀ − I‖) weigh the paper's
    regularisers, which `LoraModel._get_kasa_loss()` returns for the training loss."""

    beta: float = field(default=1e-4, metadata={"help": "Weight of the L2 penalty sum(lora_diag ** 2)."})
    gamma: float = field(default=1e-3, metadata={"help": "Weight of the orthogonality penalty on A and B."})

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"`beta` must be non-negative, got {self.beta}.")
        if self.gamma < 0:
            raise ValueError(f"`gamma` must be non-negative, got {self.gamma}.")


@dataclass
class ArrowConfig:
    """Arrow routing (arXiv 2405.11157; `create_arrow_model`): a library of task-specific LoRA adapters of one rank
    and target set, routed per token. Each expert's prototype is the top right singular vector of its ΔW = B·A; a
    token goes to the `top_k` experts whose prototypes it is most aligned with (|cosine| up to the token's norm),
    weighted by a softmax at `router_temperature`. With `use_gks` (GenKnowSub, ACL 2025 short 54) the mean of some
    general-knowledge adapters is subtracted from every task adapter first. `rng_seed` fixes the power iteration's
    start (None: torch's global generator)."""

    top_k: int = field(default=3, metadata={"help": "Number of top LoRA modules to combine in Arrow routing."})
    router_temperature: float = field(default=1.0, metadata={
        "help": "Softmax temperature for computing Arrow expert coefficients."})
    use_gks: bool = field(default=False, metadata={"help": "Enable GenKnowSub."})
    task_adapter_names: Optional[list[str]] = field(default=None, metadata={
        "help": "list of task-specific LoRA adapter names. It will be set in create_arrow_model()."})
    gks_adapter_names: Optional[list[str]] = field(default=None, metadata={
        "help": "list of general LoRA adapter names for GenKnowSub. It will be set in create_arrow_model()."})
    rng_seed: Optional[int] = field(default=None, metadata={
        "help": "Optional RNG seed for reproducibility. If None, sampling is non-deterministic."})

    def __post_init__(self):
        if self.top_k <= 0:
            raise ValueError("top_k cannot be negative.")
        if self.router_temperature <= 0:
            raise ValueError("router_temperature must be greater than 0.")


@dataclass
class LoraRuntimeConfig:
    """Settings of a LoRA adapter that hold for this process only: never saved with the adapter, and a
    `runtime_config` found in an adapter_config.json is dropped with a warning (PEFT's LoraRuntimeConfig).

    ephemeral_gpu_offload: where a layer's adapter weights sit in CPU memory (a model partly offloaded), the work
    made on them at set-up (DoRA's weight norm) runs on the GPU, the results coming back to the CPU."""

    ephemeral_gpu_offload: bool = field(default=False, metadata={
        "help": "Run the set-up work of adapters kept in CPU memory (DoRA's weight norm) on the GPU, momentarily."})


def loftq_settings(loftq_config: dict) -> LoftQConfig:
    """A LoraConfig's loftq_config dict (as saved: keys may be left out) with LoftQConfig's defaults filled in."""
    known = {f.name for f in fields(LoftQConfig)}
    return LoftQConfig(**{key: value for key, value in loftq_config.items() if key in known})


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (see PEFT's LoraConfig documentation; the fields and defaults are the same)."""

    r: int = field(default=8, metadata={"help": "Lora attention dimension"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex (full match) to replace with LoRA, or 'all-linear'."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    lora_alpha: int = field(default=8, metadata={"help": "Lora alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "Lora dropout"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True if the layer stores (fan_in, fan_out)."})
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "Bias type for Lora."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by lora_alpha/sqrt(r) (rank-stabilized)."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides LoRA layers to train fully and save."}
    )
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] | str = field(
        default=True, metadata={"help": "How to initialize the LoRA weights."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list that layers_to_transform indexes (e.g. 'layers')."}
    )
    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module rank overrides."})
    alpha_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module alpha overrides."})
    megatron_config: Optional[dict] = field(default=None, metadata={"help": "Not supported by peft_fast."})
    megatron_core: Optional[str] = field(default="megatron.core", metadata={"help": "Not used by peft_fast."})
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={"help": "Embedding rows to train besides the LoRA layers: a list of token indices (the input "
                          "embedding) or a dict of layer name to indices."},
    )
    loftq_config: Union[LoftQConfig, dict] = field(
        default_factory=dict,
        metadata={"help": "LoftQ settings (LoftQConfig or its dict), with init_lora_weights='loftq'."},
    )
    eva_config: Optional[EvaConfig] = field(
        default=None,
        metadata={"help": "EVA settings, with init_lora_weights='eva' (then initialize_lora_eva_weights)."}
    )
    corda_config: Optional[CordaConfig] = field(
        default=None, metadata={"help": "CorDA settings, with init_lora_weights='corda'."}
    )
    lora_ga_config: Optional[LoraGAConfig] = field(default=None, metadata={
        "help": "LoRA-GA settings, with init_lora_weights='lora_ga' (after preprocess_loraga)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-Decomposed Low-Rank Adaptation (DoRA)."})
    velora_config: Optional[VeloraConfig] = field(default=None, metadata={
        "help": "VeLoRA: lora_A's input kept for backward as rank-1 projections of its feature groups."})
    alora_invocation_tokens: Optional[list[int]] = field(default=None, metadata={"help": (
        "Activated LoRA (aLoRA): the token ids of the invocation sequence; the adapter acts only from the last "
        "occurrence of this sequence in an input to its end (and on every token generated after it), so the KV cache "
        "before it is the base model's. Linear layers only; cannot be merged.")})
    use_qalora: bool = field(default=False, metadata={"help": "Not supported by peft_fast."})
    qalora_group_size: int = field(default=16, metadata={"help": "Not used by peft_fast."})
    monteclora_config: Optional[dict] = field(default=None, metadata={"help": "Not supported by peft_fast."})
    layer_replication: Optional[list[tuple[int, int]]] = field(default=None, metadata={"help": (
        "Rebuild the model's layer stack from [start, end) ranges of its layers, e.g. [[0, 4], [2, 5]] turns layers "
        "[0, 1, 2, 3, 4] into [0, 1, 2, 3, 2, 3, 4]; the copies share the base weights and each gets its own LoRA "
        "adapters (Llama-, BERT- and Falcon-like layer stacks). Such a model cannot be merged.")})
    runtime_config: LoraRuntimeConfig = field(
        default_factory=LoraRuntimeConfig, metadata={"help": "Settings for this process only (not saved)."}
    )
    lora_bias: bool = field(default=False, metadata={"help": "Train a bias on lora_B."})
    target_parameters: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Parameters (not modules) to adapt, by name or name suffix, e.g. MoE expert weights "
                          "('feed_forward.experts.gate_up_proj'); 2-D and 3-D (experts × in × out) parameters."},
    )
    use_bdlora: Optional[BdLoraConfig] = field(default=None, metadata={
        "help": "BD-LoRA: block-diagonal lora_A or lora_B in the modules its BdLoraConfig names."})
    arrow_config: Optional[ArrowConfig] = field(default=None, metadata={
        "help": "Arrow routing over task adapters (set by create_arrow_model on its router adapter)."})
    kasa_config: Optional[KasaConfig] = field(default=None, metadata={
        "help": "KaSA: the base weight's r smallest singular components dropped, update s·B·diag(lora_diag)·A."})
    ensure_weight_tying: bool = field(
        default=False,
        metadata={"help": "Keep layers tied to the input embedding (tie_word_embeddings) tied in the adapter."},
    )

    def to_dict(self) -> dict:
        """The adapter's settings as saved: runtime_config is left out."""
        out = super().to_dict()
        out.pop("runtime_config", None)
        return out

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _check_init_subconfig(self, init: str, name: str, cls: type, label: str) -> None:
        """The sub-config of init_lora_weights=`init` (field `name`) as its dataclass: its defaults where that init
        is asked for without it, a warning where it is given for another init."""
        value = _subconfig(getattr(self, name), cls, name)
        if self.init_lora_weights == init and value is None:
            warnings.warn(f"`init_lora_weights` is '{init}' but `{name}` is not specified. Using default {label} "
                          "config.")
            value = cls()
        elif self.init_lora_weights != init and value is not None:
            warnings.warn(f"`{name}` specified but will be ignored when `init_lora_weights` is not '{init}'.")
        setattr(self, name, value)

    def _check_alora(self) -> None:
        tokens = self.alora_invocation_tokens
        if tokens is None:
            return
        if (isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__") or len(tokens) == 0
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
            raise ValueError(f"`alora_invocation_tokens` must be a non-empty list of token ids (ints), got {tokens!r}")
        self.alora_invocation_tokens = list(tokens)
        if self.use_dora:
            raise ValueError("aLoRA (alora_invocation_tokens) cannot be combined with DoRA (use_dora=True).")
        if self.task_type != "CAUSAL_LM":
            warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.")

    def _validate(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, set, frozenset, tuple)):
                raise TypeError(f"LoraConfig.{name} must be a module name / regex string or a list of names, "
                                f"got {type(value).__name__} {value!r}")
        for name, default in _UNSUPPORTED_FIELDS.items():
            value = getattr(self, name)
            if value != default and value not in (None, {}, []):
                raise ValueError(f"LoraConfig.{name}={value!r} is not supported by peft_fast.")
        _check_trainable_token_indices(self.trainable_token_indices)
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(isinstance(t, str) for t in self.target_parameters):
                raise ValueError(f"`target_parameters` must be a list of parameter names, got "
                                 f"{self.target_parameters!r}")
            self.target_parameters = list(self.target_parameters)
        if not isinstance(self.ensure_weight_tying, bool):
            raise ValueError(f"`ensure_weight_tying` must be True or False, got {self.ensure_weight_tying!r}")
        self._check_init_subconfig("corda", "corda_config", CordaConfig, "CorDA")
        self._check_init_subconfig("eva", "eva_config", EvaConfig, "EVA")
        self.arrow_config = _subconfig(self.arrow_config, ArrowConfig, "arrow_config")
        self.kasa_config = _subconfig(self.kasa_config, KasaConfig, "kasa_config")
        self.velora_config = _subconfig(self.velora_config, VeloraConfig, "velora_config")
        self.use_bdlora = _subconfig(self.use_bdlora, BdLoraConfig, "use_bdlora")
        self.lora_ga_config = _subconfig(self.lora_ga_config, LoraGAConfig, "lora_ga_config")
        if isinstance(self.loftq_config, LoftQConfig):  # (kept as a dict, as PEFT does: it goes to adapter_config.json)
            self.loftq_config = dict(vars(self.loftq_config))
        if self.loftq_config is not None and not isinstance(self.loftq_config, dict):  # (None: as PEFT, none)
            raise TypeError(f"`loftq_config` must be a LoftQConfig or a dict, got {type(self.loftq_config).__name__} "
                            f"{self.loftq_config!r}")
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
            loftq = loftq_settings(self.loftq_config)
            if loftq.loftq_bits not in (4, 8) or not _is_int(loftq.loftq_iter) or loftq.loftq_iter < 1:
                raise ValueError(f"loftq_config needs loftq_bits 4 or 8 and loftq_iter >= 1, got {self.loftq_config!r}")
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}")
        if not _is_real(self.lora_alpha):
            raise ValueError(f"`lora_alpha` must be a number, got {self.lora_alpha!r} ({type(self.lora_alpha).__name__})")
        if not math.isfinite(self.lora_alpha):  # a NaN / Inf scale would turn every output into NaN, silently
            raise ValueError(f"`lora_alpha` must be finite, got {self.lora_alpha!r}")
        if not _is_real(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be a number in [0, 1), got {self.lora_dropout!r}")
        layers = self.layers_to_transform
        if layers is not None and not (_is_int(layers) or (isinstance(layers, (list, tuple)) and all(map(_is_int, layers)))):
            raise ValueError(f"`layers_to_transform` must be an int or a list of ints, got {layers!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"`bias` must be one of 'none', 'all', 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        is_pissa_niter = isinstance(init, str) and init.startswith("pissa_niter_")
        if init not in SUPPORTED_INIT_LORA_WEIGHTS and not is_pissa_niter:
            raise ValueError(
                f"init_lora_weights={init!r} is not supported by peft_fast; use one of "
                f"{list(SUPPORTED_INIT_LORA_WEIGHTS)} or 'pissa_niter_<n>'."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.use_dora and self.lora_bias:
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        if init == "mica" and (self.use_dora or self.alora_invocation_tokens is not None):
            raise ValueError("init_lora_weights='mica' (MiCA: B frozen, A trained) cannot be combined with DoRA or "
                             "aLoRA.")
        self._check_alora()
        mutates_base = isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda", "lora_ga"))
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and mutates_base:
            warnings.warn(
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of modified "
                "base weights (PiSSA, CorDA, OLoRA, LoRA-GA) means that you won't be able to pass "
                "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial values of the "
                "base weights; if you intend to do this, please ensure not to use rslora or rank_pattern/alpha_pattern."
            )
        for pattern_name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, pattern_name)
            if value is None:
                setattr(self, pattern_name, {})
            elif not isinstance(value, dict):
                raise ValueError(f"`{pattern_name}` must be a dict of module-name pattern to value, got {value!r}")
            else:
                valid = (lambda v: _is_int(v) and v > 0) if pattern_name == "rank_pattern" else _is_real
                bad = {k: v for k, v in value.items() if not valid(v)}
                if bad:
                    kind = "positive integers" if pattern_name == "rank_pattern" else "numbers"
                    raise ValueError(f"`{pattern_name}` values must be {kind}, got {bad!r}")


def _subconfig(value, cls: type, name: str):
    """A sub-config field (corda_config, eva_config) as its dataclass (adapter_config.json holds it as a dict), or a
    clear error."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            warnings.warn(f"Unknown {name} keys {unknown} are ignored.")
        return cls(**{k: v for k, v in value.items() if k in known})
    raise TypeError(f"`{name}` must be a {cls.__name__}, a dict, or None, got {type(value).__name__}")


def _check_trainable_token_indices(value) -> None:
    if value is None:
        return
    from ..trainable_tokens.config import check_token_indices

    if isinstance(value, dict):
        for name, indices in value.items():
            if not isinstance(name, str):
                raise ValueError(f"`trainable_token_indices` keys must be layer names, got {name!r}")
            check_token_indices(indices, f"trainable_token_indices[{name!r}]")
    else:
        check_token_indices(value, "trainable_token_indices")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A real number (int or float, numpy scalars too), not a bool or a numeric string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
