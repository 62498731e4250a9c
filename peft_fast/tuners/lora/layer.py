"""LoRA layers: per-adapter state around one base layer. The arithmetic is delegated to `peft_fast.ops`.

Linear (also transformers' Conv1D through fan_in_fan_out), Embedding and Conv1d/2d/3d, each with rsLoRA, DoRA,
lora_bias, merge/unmerge, and mixed-batch inference (`adapter_names=` one per row).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...ops import cuda_lora
from ...utils import loftq_utils
from ...utils.constants import BASE_ADAPTER_NAME
from ...utils.other import transpose
from ..tuners_utils import BaseTunerLayer, check_adapters_to_merge
from .alora import add_alora_term
from . import bdlora, kasa, velora
from .._buffer_dict import BufferDict
from .arrow import ArrowRouter
from .config import LoraConfig, loftq_settings
from .dora import DoraConvLayer, DoraEmbeddingLayer, DoraLinearLayer


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover
        return None


class LoraLayer(BaseTunerLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")
    _supports_alora = False  # (Linear and its bitsandbytes subclasses)
    _supports_arrow = False  # (the same)
    _supports_kasa = False  # (Linear over nn.Linear only: it truncates a plain weight)
    _supports_velora = False  # (the same: its lora_A is an nn.Linear over the layer's input)
    _supports_bdlora = False  # (Linear and its bitsandbytes subclasses)

    def __init__(self, base_layer: nn.Module, ephemeral_gpu_offload: bool = False, **kwargs) -> None:
        self.base_layer = base_layer
        self.ephemeral_gpu_offload = ephemeral_gpu_offload  # (LoraRuntimeConfig: DoRA's set-up on the GPU)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.lora_magnitude_vector = nn.ModuleDict()
        self.use_dora: dict[str, bool] = {}
        self.use_alora: dict[str, bool] = {}  # aLoRA adapters (alora_invocation_tokens): tuners/lora/alora.py
        self._alora_offsets_for_recompute = None  # (alora.offsets_for_recompute)
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._caches: dict[str, Any] = {}
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs
        self.in_features, self.out_features = self._get_in_out_features(self.get_base_layer())

    @staticmethod
    def _get_in_out_features(base: nn.Module) -> tuple[int, int]:
        if isinstance(base, nn.Linear):
            return base.in_features, base.out_features
        if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return base.in_channels, base.out_channels
        if isinstance(base, nn.Embedding):
            return base.num_embeddings, base.embedding_dim
        conv1d = _conv1d_class()
        if conv1d is not None and isinstance(base, conv1d):
            shape = base.weight.ds_shape if hasattr(base.weight, "ds_shape") else base.weight.shape
            return shape[0], shape[1]
        if hasattr(base, "in_features") and hasattr(base, "out_features"):
            return base.in_features, base.out_features
        raise ValueError(f"Unsupported layer type {type(base).__name__} for LoRA.")

    # ---------------------------------------------------------------- creating an adapter
    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        raise NotImplementedError  # each concrete layer creates its own A/B

    def _make_dora_layer(self) -> nn.Module:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        """Add (or replace) adapter `adapter_name` of rank r in this layer."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        use_alora = config.alora_invocation_tokens is not None
        if use_alora and not self._supports_alora:
            raise ValueError(f"aLoRA adapts linear layers only, not {type(self).__name__} layers (here around "
                             f"{type(self.get_base_layer()).__name__}); leave this module out of target_modules.")
        self._check_variant(config, use_alora, kwargs.get("target_name", ""))
        lora_bias = config.lora_bias
        if lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(
                f"`lora_bias=True` was passed but the targeted layer of type {type(self.get_base_layer()).__name__} "
                "has no bias. This means that merging LoRA weights won't be possible."
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self._create_adapter_weights(adapter_name, r, lora_bias)
        tied = kwargs.get("tied_adapter")
        if tied:  # ensure_weight_tying: an output layer's factors are views of the input embedding's (as PEFT ties)
            self.lora_A[adapter_name].weight = nn.Parameter(tied["lora_A"])
            self.lora_B[adapter_name].weight = nn.Parameter(tied["lora_B"])
        self.lora_bias[adapter_name] = lora_bias
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = config.use_dora
        self.use_alora[adapter_name] = use_alora

        init = config.init_lora_weights
        if isinstance(init, str) and init.startswith("pissa"):
            self.pissa_init(adapter_name, init)
        elif init == "corda":
            self.corda_init(adapter_name)
        elif isinstance(init, str) and init.lower() == "olora":
            self.olora_init(adapter_name)
        elif init == "orthogonal":
            self.orthogonal_init(adapter_name)
        elif init == "loftq":
            self.loftq_init(adapter_name, config)
        elif init == "eva":  # B zero; A is set from the data by initialize_lora_eva_weights (tuners/lora/eva.py)
            self.reset_lora_parameters(adapter_name, True)
        elif init == "lora_ga":
            self.lora_ga_init(adapter_name, config.lora_ga_config)
        elif init == "mica":
            self.mica_init(adapter_name)
            self._register_frozen_peft_weight(adapter_name, "lora_B" if adapter_name in self.lora_A else
                                              "lora_embedding_B")
        elif init:
            self.reset_lora_parameters(adapter_name, init)
        self._move_adapter_to_device_of_base_layer(adapter_name)

        if config.use_dora:
            self._init_dora(adapter_name)
        if config.kasa_config is not None:
            self._init_kasa(adapter_name)
        if config.velora_config is not None:
            self._init_velora(adapter_name, config.velora_config)
        if config.use_bdlora is not None:
            self._init_bdlora(adapter_name, config.use_bdlora, kwargs.get("target_name", ""))
        if config.arrow_config is not None:
            if "lora_arrow" not in self._modules:
                self.lora_arrow = nn.ModuleDict()
            self.lora_arrow[adapter_name] = ArrowRouter(self.in_features, config.arrow_config)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._refresh_arrow_routers()

    def _check_variant(self, config: LoraConfig, use_alora: bool, target_name: str) -> None:
        """Refuse, before anything is made, a LoRA variant this layer cannot hold, or several in one adapter."""
        variants = [name for name, on in (
            ("DoRA", config.use_dora), ("aLoRA", use_alora), ("Arrow", config.arrow_config is not None),
            ("KaSA", config.kasa_config is not None), ("VeLoRA", config.velora_config is not None),
            ("BD-LoRA", config.use_bdlora is not None)) if on]
        if len(variants) > 1:
            raise ValueError(f"{variants[-1]} cannot be combined with {', '.join(variants[:-1])} in one adapter.")
        if config.kasa_config is not None:
            if not self._supports_kasa:
                raise ValueError(f"{type(self).__name__} does not support KaSA, please set `kasa_config=None`.")
            if config.fan_in_fan_out:
                raise ValueError("KaSA does not support `fan_in_fan_out=True` layers (e.g. Conv1D). Please target "
                                 "nn.Linear layers.")
        if config.velora_config is not None and not self._supports_velora:
            raise ValueError(f"{type(self).__name__} does not support VeLoRA.")
        if config.use_bdlora is not None:
            if not self._supports_bdlora:
                raise ValueError(f"BD-LoRA makes linear layers' factors block-diagonal, not {type(self).__name__} "
                                 "layers'; leave this module out of target_modules.")
            bdlora.block_diagonal_side(config.use_bdlora, target_name)  # (a pattern error now, not half-way)
        if config.arrow_config is not None and not self._supports_arrow:
            raise ValueError(f"Arrow routes linear layers only, not {type(self).__name__} layers (here around "
                             f"{type(self.get_base_layer()).__name__}); leave this module out of target_modules.")

    def _init_kasa(self, adapter_name: str) -> None:
        """KaSA (tuners/lora/kasa.py): the adapter's learnable singular values lora_diag, and the base weight's r
        smallest singular components dropped now (on the meta device: at the first forward or merge)."""
        if "lora_diag" not in self._modules:  # (the first KaSA adapter: its vectors are saved with the others)
            self.lora_diag = nn.ParameterDict({})
            self.adapter_layer_names = self.adapter_layer_names + ("lora_diag",)
            self._kasa_deferred = set()
        lora_A = self.lora_A[adapter_name].weight
        r = self.r[adapter_name]
        if lora_A.device.type == "meta":  # (its values come from a state dict, or at the deferred truncation)
            self.lora_diag[adapter_name] = nn.Parameter(torch.empty(r, device=lora_A.device, dtype=lora_A.dtype))
            self._kasa_deferred.add(adapter_name)
            return
        self.lora_diag[adapter_name] = nn.Parameter(torch.randn(r, device=lora_A.device, dtype=lora_A.dtype))
        kasa.truncate_base_weight(self.get_base_layer(), r)

    def _kasa_truncate_if_deferred(self, adapter: str):
        """The truncation a meta-device KaSA adapter still owes, applied now (the dropped factors), or None."""
        deferred = getattr(self, "_kasa_deferred", None)
        if not deferred or adapter not in deferred:
            return None
        if self.get_base_layer().weight.device.type == "meta":
            raise RuntimeError("KaSA could not apply its SVD base-weight truncation because the base weight is still "
                               "on the meta device; load the base model's weights first.")
        if self.lora_diag[adapter].device.type == "meta":
            lora_A = self.lora_A[adapter].weight
            self.lora_diag[adapter] = nn.Parameter(torch.randn(self.r[adapter], device=lora_A.device,
                                                               dtype=lora_A.dtype))
        deferred.discard(adapter)
        return kasa.truncate_base_weight(self.get_base_layer(), self.r[adapter])

    def _init_bdlora(self, adapter_name: str, bd_config, target_name: str) -> None:
        """BD-LoRA (tuners/lora/bdlora.py): the factor its patterns name for this module made block-diagonal (in the
        base weight's dtype and device, drawn after A and B as PEFT draws it)."""
        side = bdlora.block_diagonal_side(bd_config, target_name)
        if not side:
            return
        weight = self._base_weight()
        r = self.r[adapter_name]
        if side == "A":
            self.lora_A[adapter_name] = bdlora.BlockDiagonalLinear(
                self.in_features, r, bd_config.nblocks, init_zero=False, dtype=weight.dtype, device=weight.device)
        else:
            self.lora_B[adapter_name] = bdlora.BlockDiagonalLinear(
                r, self.out_features, bd_config.nblocks, init_zero=True, dtype=weight.dtype, device=weight.device)

    def _init_velora(self, adapter_name: str, velora_config) -> None:
        """VeLoRA (tuners/lora/velora.py): the projection vector (saved with the adapter, a buffer) and settings."""
        if "lora_velora_embed" not in self._modules:
            self.lora_velora_embed = BufferDict({}, persistent=True)
            self.velora_settings: dict = {}  # adapter → [VeloraConfig, projection set from a batch yet]
            self.other_param_names = self.other_param_names + ("lora_velora_embed", "velora_settings")
        weight = self._base_weight()
        width = velora.group_dim(self.in_features, velora_config.num_groups)
        if velora_config.init_type == "random":
            embed = velora.unit_vector(torch.randn(width, device=weight.device, dtype=weight.dtype))
        else:
            embed = torch.zeros(width, device=weight.device)
        self.lora_velora_embed[adapter_name] = embed.to(weight.dtype)
        self.velora_settings[adapter_name] = [velora_config, velora_config.init_type == "random"]

    def _velora_forward(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora_A = self.lora_A[adapter]
        x = self.lora_dropout[adapter](x)
        if self.training and torch.is_grad_enabled():
            settings = self.velora_settings[adapter]
            config = settings[0]
            if config.init_type == "batch_average" or (config.init_type == "batch_average_once" and not settings[1]):
                embed = self.lora_velora_embed[adapter]
                self.lora_velora_embed[adapter] = velora.batch_embed(x, config.num_groups).to(embed.device,
                                                                                               embed.dtype)
                settings[1] = True
            low = velora.VeloraLinearFunction.apply(x, lora_A.weight, lora_A.bias, self.lora_velora_embed[adapter],
                                                    config.num_groups, config.scale)
        else:
            low = lora_A(x)
        return result + self.lora_B[adapter](low) * self.scaling[adapter]

    def _is_velora(self, adapter: str) -> bool:
        embeds = self._modules.get("lora_velora_embed")
        return embeds is not None and adapter in embeds

    def _is_kasa(self, adapter: str) -> bool:
        diag = self._modules.get("lora_diag")
        return diag is not None and adapter in diag

    def _kasa_forward(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dropped = self._kasa_truncate_if_deferred(adapter)
        if dropped is not None:  # (`result` was made with the untruncated weight)
            result = result - kasa.dropped_output(x, dropped).to(result.dtype)
        low = self.lora_A[adapter](self.lora_dropout[adapter](x)) * self.lora_diag[adapter]
        return result + self.lora_B[adapter](low) * self.scaling[adapter]

    def _arrow_router(self, adapter: str) -> Optional[nn.Module]:
        """Adapter `adapter`'s Arrow router, None for any other kind of adapter."""
        routers = self._modules.get("lora_arrow")
        return None if routers is None else routers._modules.get(adapter)

    def _refresh_arrow_routers(self) -> None:
        """The layer's routers follow its task adapters after one was added or deleted (tuners/lora/arrow.py)."""
        routers = self._modules.get("lora_arrow")
        for router in (routers.values() if routers is not None else ()):
            router.refresh(self.lora_A, self.lora_B, set(routers))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        routers = self._modules.get("lora_arrow")
        if routers is not None and adapter_name in routers:
            del routers[adapter_name]
        getattr(self, "_kasa_deferred", set()).discard(adapter_name)
        self._refresh_arrow_routers()

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        if init_lora_weights is False:
            return
        if adapter_name in self.lora_A:
            if init_lora_weights is True:
                # A as nn.Linear's default init, B zero: the adapter starts as the identity
                nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            elif init_lora_weights.lower() == "gaussian":
                nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / self.r[adapter_name])
            else:
                raise ValueError(f"Unknown initialization {init_lora_weights=}")
            nn.init.zeros_(self.lora_B[adapter_name].weight)
            if self.lora_bias.get(adapter_name):
                nn.init.zeros_(self.lora_B[adapter_name].bias)
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _float_base_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                f"PiSSA/OLoRA initialization needs a float32/float16/bfloat16 base weight, got {weight.dtype}."
            )
        return weight

    def pissa_init(self, adapter_name: str, init_lora_weights: str) -> None:
        """PiSSA: A, B from the top-r singular triplets of W; W keeps the residual W − s·BA."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is only supported for Linear layers.")
        weight = self._float_base_weight()
        dtype = weight.dtype
        w = transpose(weight.to(torch.float32), self.fan_in_fan_out)
        r, s = self.r[adapter_name], self.scaling[adapter_name]
        if init_lora_weights == "pissa":
            V, S, Uh = torch.linalg.svd(w.data, full_matrices=False)
            Vr, Sr, Uhr = V[:, :r], S[:r] / s, Uh[:r]
        elif len(init_lora_weights.split("_niter_")) == 2:
            Vr, Sr, Ur = torch.svd_lowrank(w.data, r, niter=int(init_lora_weights.split("_niter_")[-1]))
            Sr, Uhr = Sr / s, Ur.t()
        else:
            raise ValueError(
                f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {init_lora_weights}."
            )
        lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
        lora_B = Vr @ torch.diag(torch.sqrt(Sr))
        self.lora_A[adapter_name].weight.data = lora_A
        self.lora_B[adapter_name].weight.data = lora_B
        residual = w.data - s * lora_B @ lora_A
        self.get_base_layer().weight.data = transpose(residual.to(dtype), self.fan_in_fan_out)

    def corda_init(self, adapter_name: str) -> None:
        """CorDA: A = √S' Vᵀ, B = U √S' (S' = S / scaling) from the triplets preprocess_corda attached to the base
        layer (`eigens`, consumed here); W keeps W − s·BA."""
        if adapter_name not in self.lora_A:
            raise ValueError("init_lora_weights='corda' is only supported for Linear layers.")
        base = self.get_base_layer()
        if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError("Please initialize CorDA under float32, float16, or bfloat16. Subsequently, re-quantize "
                            "the residual model to help minimize quantization errors.")
        eigens = getattr(base, "eigens", None)
        if eigens is None:
            raise ValueError("`eigens` attribute not found for layer, please run `preprocess_corda` first "
                             "(peft_fast.tuners.lora.corda.preprocess_corda).")
        u, s_values, v = eigens.U_WC, eigens.S_WC, eigens.V_WC
        r, scale = self.r[adapter_name], self.scaling[adapter_name]
        if not all(torch.isfinite(t).all() for t in (u, s_values, v)):
            raise ValueError("CorDA's singular vectors / values hold NaN or Inf; check the calibration inputs.")
        weight = transpose(base.weight.data.to(torch.float32), self.fan_in_fan_out)  # out × in
        expected = {"U": (weight.shape[0], r), "S": (r,), "V": (weight.shape[1], r)}
        for name, tensor in (("U", u), ("S", s_values), ("V", v)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"CorDA matrix {name} has shape {tuple(tensor.shape)}, the layer needs "
                                 f"{expected[name]}: preprocess_corda must see the same model and LoRA rank (and a "
                                 "cache must come from them)")
        root = (s_values / scale).sqrt()
        lora_A = (v.t() * root.view(-1, 1)).contiguous()
        lora_B = (u * root).contiguous()
        self.lora_A[adapter_name].weight.data = lora_A
        self.lora_B[adapter_name].weight.data = lora_B
        residual = weight - scale * lora_B @ lora_A
        base.weight.data = transpose(residual, self.fan_in_fan_out).to(base.weight.dtype)
        del base.eigens

    def lora_ga_init(self, adapter_name: str, lora_ga_config) -> None:
        """LoRA-GA: A, B from the top 2r singular triplets of the weight's gradient that preprocess_loraga attached to
        the base layer (`_peft_loraga_grad`, consumed here), split and scaled as lora_ga_config says; W keeps W − s·BA.
        A layer without a gradient (an embedding or conv layer, or an adapter about to be loaded from a file) gets the
        default init, as in PEFT."""
        base = self.get_base_layer()
        grad = getattr(base, "_peft_loraga_grad", None)
        if grad is None or adapter_name not in self.lora_A:
            self.reset_lora_parameters(adapter_name, True)
            return
        if lora_ga_config is None:
            raise ValueError("lora_ga_config must be provided when init_lora_weights='lora_ga'. Please pass "
                             "lora_ga_config=LoraGAConfig(...) to LoraConfig.")
        weight = self._float_base_weight()
        dtype = weight.dtype
        r, s = self.r[adapter_name], self.scaling[adapter_name]
        grad = transpose(grad.to(torch.float32), self.fan_in_fan_out)  # out × in, as the weight
        if tuple(grad.shape) != (self.out_features, self.in_features):
            raise ValueError(f"The LoRA-GA gradient has shape {tuple(grad.shape)}, the layer's weight "
                             f"({self.out_features}, {self.in_features}): preprocess_loraga must see the same model")
        U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
        U, S, Vh = U[:, : 2 * r], S[: 2 * r], V.t()[: 2 * r]
        direction = lora_ga_config.direction
        if direction == "ArBr":
            a_idx, b_idx = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
        elif direction == "A2rBr":
            a_idx, b_idx = slice(r, 2 * r), slice(0, r)
        elif direction == "ArB2r":
            a_idx, b_idx = slice(0, r), slice(r, 2 * r)
        else:  # "random": the same r triplets for both, drawn from the first 2r
            a_idx = b_idx = torch.randperm(2 * r)[:r]
        lora_A = Vh[a_idx]
        s_b = S[b_idx]
        lora_B = U[:, b_idx] @ torch.diag(s_b)
        if lora_ga_config.scale == "stable":
            lora_B = lora_B * (self.out_features**0.25 / lora_ga_config.stable_gamma**0.5)
        elif lora_ga_config.scale == "weight_svd":
            w = transpose(weight.data.to(torch.float32), self.fan_in_fan_out)
            _, weight_s, _ = torch.svd_lowrank(w, q=r, niter=4)
            if s_b[0] > 0:
                lora_B = lora_B * (weight_s[0] / s_b[0])
        elif lora_ga_config.scale == "gd_scale":
            lora_A, lora_B = lora_A / s, lora_B / s
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)  # (rounded first: the residual removes what they hold)
        self.lora_A[adapter_name].weight.data = lora_A.contiguous()
        self.lora_B[adapter_name].weight.data = lora_B.contiguous()
        residual = transpose(weight.data.to(torch.float32), self.fan_in_fan_out) - s * (lora_B.float() @ lora_A.float())
        base.weight.data = transpose(residual.to(dtype), self.fan_in_fan_out)
        del base._peft_loraga_grad

    def mica_init(self, adapter_name: str) -> None:
        """MiCA (Minor Component Adaptation, arXiv 2604.01694): B = the r left singular vectors of the base weight
        (out × in; an embedding's transposed) with the smallest singular values, A = 0, so B·A = 0 and the base weight
        stays as it is. update_layer then keeps B frozen: only A trains. Adapters made on the meta device (to be
        loaded) are left to the file."""
        embedding = adapter_name not in self.lora_A
        b = self.lora_embedding_B[adapter_name] if embedding else self.lora_B[adapter_name].weight
        if b.device.type == "meta":
            return
        weight = self.get_base_layer().weight
        dtype = weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError("Please initialize MiCA under float32, float16, or bfloat16.")
        w = weight.to(torch.float32).T if embedding else transpose(weight.to(torch.float32), self.fan_in_fan_out)
        r = self.r[adapter_name]
        if r > min(w.shape):
            raise ValueError(f"MiCA requires `r` <= min(in_features, out_features) but got r={r} for a layer with "
                             f"weight shape {tuple(weight.shape)} (max usable r is {min(w.shape)}).")
        U, _, _ = torch.linalg.svd(w.data, full_matrices=False)
        minor = U[:, -r:].contiguous().to(dtype)
        zeros = torch.zeros(r, w.shape[1], device=w.device, dtype=dtype)
        if embedding:
            self.lora_embedding_B[adapter_name].data = minor
            self.lora_embedding_A[adapter_name].data = zeros
        else:
            self.lora_B[adapter_name].weight.data = minor
            self.lora_A[adapter_name].weight.data = zeros

    def loftq_init(self, adapter_name: str, config: LoraConfig) -> None:
        """init_lora_weights="loftq": the base weight becomes its quantized values Q and the adapter the rank-r
        correction of W − Q (peft_fast.utils.loftq_utils). As PEFT, A and B are the SVD factors themselves, so the
        model at start is Q + s·B·A (W's best LoftQ approximation when lora_alpha = r)."""
        loftq = loftq_settings(config.loftq_config)
        base = self.get_base_layer()
        if not base.weight.dtype.is_floating_point:
            raise ValueError(f"LoftQ starts from a full-precision weight; {type(base).__name__}'s is "
                             f"{base.weight.dtype} (quantize after LoftQ, not before).")
        qweight, lora_a, lora_b = loftq_utils.loftq_init(
            transpose(base.weight, self.fan_in_fan_out), num_bits=loftq.loftq_bits, reduced_rank=self.r[adapter_name],
            num_iter=loftq.loftq_iter)
        self.lora_A[adapter_name].weight.data = lora_a.to(self.lora_A[adapter_name].weight.dtype)
        self.lora_B[adapter_name].weight.data = lora_b.to(self.lora_B[adapter_name].weight.dtype)
        base.weight.data = transpose(qweight, self.fan_in_fan_out).contiguous()

    def orthogonal_init(self, adapter_name: str) -> None:
        """init_lora_weights="orthogonal": A's columns lie in the span of the even-indexed rows of one random
        orthogonal r×r matrix and B's rows in that of its odd-indexed rows, so B·A = 0 (the base model's function at
        start, its weight untouched) while neither factor is zero. PEFT's draws, in its order: the same numbers under
        the same seed."""
        r = self.r[adapter_name]
        if r % 2:
            raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
        basis, _ = torch.linalg.qr(torch.randn(r, r))
        a = (torch.randn(self.in_features, r // 2) @ basis[0::2]).T / 10.0
        b = torch.randn(r // 2, self.out_features).T @ basis[1::2] / 10.0
        weight = self.get_base_layer().weight
        # (the base weight's dtype, as PEFT; a quantized base's bytes are no dtype for adapters)
        dtype = weight.dtype if weight.dtype.is_floating_point else self.lora_A[adapter_name].weight.dtype
        self.lora_A[adapter_name].weight = nn.Parameter(a.contiguous().to(dtype))
        self.lora_B[adapter_name].weight = nn.Parameter(b.contiguous().to(dtype))

    def olora_init(self, adapter_name: str) -> None:
        """OLoRA: A, B from the QR decomposition of W; W keeps W − s·BA."""
        if adapter_name not in self.lora_A:
            raise ValueError("init_lora_weights='olora' is only supported for Linear layers.")
        weight = self._float_base_weight()
        dtype = weight.dtype
        w = weight.to(torch.float32)
        Q, R = torch.linalg.qr(w.data)
        r = self.r[adapter_name]
        self.lora_A[adapter_name].weight.data = R[:r].contiguous()
        self.lora_B[adapter_name].weight.data = Q[:, :r].contiguous()
        w = w.data - self.scaling[adapter_name] * self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight
        self.get_base_layer().weight.data = w.to(dtype)

    def _init_dora(self, adapter_name: str) -> None:
        dora_layer = self._make_dora_layer()
        if adapter_name in self.lora_A:
            lora_A, lora_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        else:
            lora_A, lora_B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        place_on_cpu = False
        if self.ephemeral_gpu_offload:  # the norm on the GPU, the magnitude back where the adapter lives
            lora_A, lora_B, place_on_cpu = _on_gpu_for_setup(lora_A, lora_B)
        dora_layer.update_layer(
            base_layer=self.get_base_layer(), lora_A=lora_A, lora_B=lora_B, scaling=self.scaling[adapter_name],
            place_on_cpu=place_on_cpu,
        )
        self.lora_magnitude_vector[adapter_name] = dora_layer

    # ---------------------------------------------------------------- scale
    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter not in self.scaling:
            return
        base = self.lora_alpha[adapter] / (math.sqrt(self.r[adapter]) if self.use_rslora[adapter] else self.r[adapter])
        self.scaling[adapter] = scale * base

    def scale_layer(self, scale: float) -> None:
        if scale == 1:
            return
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for adapter in self.active_adapters:
            if adapter not in self.scaling:
                continue
            if scale is None:
                self.set_scale(adapter, 1.0)
            else:
                self.scaling[adapter] /= scale

    # ---------------------------------------------------------------- merge / unmerge
    def _has_adapter(self, adapter: str) -> bool:
        return adapter in self.lora_A or adapter in self.lora_embedding_A

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def _dora_factor(self, adapter: str, delta: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        """m / ‖W + ΔW‖, shaped to broadcast against the base weight."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _unmerged_base_weight(self):
        """The base weight without any merged adapter in it (DoRA norms are taken against it)."""
        merged = self.merged_adapters[:]
        if merged:
            self.unmerge()
        try:
            yield self.get_base_layer().weight.detach().clone()
        finally:
            if merged:
                self.merge(adapter_names=merged)

    def _merged_weight(self, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.get_delta_weight(adapter)
        if not self.use_dora.get(adapter, False):
            return weight + delta.to(weight.dtype)
        with self._unmerged_base_weight() as base_weight:
            factor, weight_norm = self._dora_factor(adapter, delta, base_weight)
        self._caches[f"{adapter}-weight_norm"] = weight_norm
        return (factor * (self.get_base_layer().weight.data + delta)).to(weight.dtype)

    def _adapters_to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        """check_adapters_to_merge, refusing aLoRA adapters (before anything is merged)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if any(self._arrow_router(name) is not None for name in adapter_names):
            raise RuntimeError("Cannot merge an active Arrow router adapter. Remove it first.")
        alora = [name for name in adapter_names if self.use_alora.get(name, False)]
        if alora:
            raise ValueError(f"aLoRA adapters cannot be merged: they act only from their invocation tokens on, which "
                             f"no weight can express ({', '.join(alora)}).")
        return adapter_names

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the given (default: active) adapters into the base weight; safe_merge checks for NaN/inf first."""
        adapter_names = self._adapters_to_merge(adapter_names)
        base_layer = self.get_base_layer()
        for adapter in adapter_names:
            if not self._has_adapter(adapter):
                continue
            self._kasa_truncate_if_deferred(adapter)  # (into the truncated weight, as the adapter was trained on)
            if base_layer.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise TypeError(f"Cannot merge into a base weight of dtype {base_layer.weight.dtype}.")
            if isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and base_layer.groups > 1:
                # as PEFT: the grouped delta is defined for the forward, not as a mergeable weight
                raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
            new_weight = self._merged_weight(adapter, base_layer.weight.data.clone() if safe_merge else base_layer.weight.data)
            new_bias = None
            if self.lora_bias.get(adapter):
                if getattr(base_layer, "bias", None) is None:
                    raise RuntimeError(
                        "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias."
                    )
                new_bias = base_layer.bias.data + self.lora_B[adapter].bias * self.scaling[adapter]
            if safe_merge and (
                not torch.isfinite(new_weight).all() or (new_bias is not None and not torch.isfinite(new_bias).all())
            ):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base_layer.weight.data = new_weight
            if new_bias is not None:
                base_layer.bias.data = new_bias.to(base_layer.bias.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if not self._has_adapter(adapter):
                continue
            weight = base_layer.weight
            delta = self.get_delta_weight(adapter)
            if self.use_dora.get(adapter, False):
                weight_norm = self._caches.pop(f"{adapter}-weight_norm")
                factor = self._dora_factor_from_norm(adapter, weight_norm)
                weight.data = (weight.data / factor - delta).to(weight.dtype)
            else:
                weight.data -= delta.to(weight.dtype)
            if self.lora_bias.get(adapter):
                base_layer.bias.data -= self.lora_B[adapter].bias * self.scaling[adapter]

    def _dora_factor_from_norm(self, adapter: str, weight_norm: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- forward helpers
    def _check_forward_args(self, x, *args, **kwargs) -> None:
        adapter_names = kwargs.get("adapter_names", None)
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        for name in set(adapter_names) - {BASE_ADAPTER_NAME}:
            if self.use_dora.get(name, False):
                raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
            if self._arrow_router(name) is not None:
                raise ValueError(f"Cannot pass `adapter_names` naming the Arrow router '{name}': it routes each "
                                 "token over the task adapters itself.")
            if self._is_kasa(name):
                raise ValueError(f"Cannot pass `adapter_names` naming the KaSA adapter '{name}'.")

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.cast_input_dtype_enabled or x.dtype == dtype:
            return x
        return x.to(dtype)

    def _adapter_term(self, adapter: str):
        """The ops record of one adapter (Embedding overrides it). Runs on every forward: the submodules are read
        from `_modules` directly (nn.Module.__getattr__ costs ~0.5 µs a lookup)."""
        modules = self._modules
        return ops.LoraTerm(modules["lora_A"][adapter], modules["lora_B"][adapter], self.scaling[adapter],
                            modules["lora_dropout"][adapter])

    def _mixed_batch_groups(self, adapter_names: list[str]) -> list[tuple[list[int], Any]]:
        groups = []
        for name in dict.fromkeys(adapter_names):
            if name == BASE_ADAPTER_NAME or not self._has_adapter(name):
                continue
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            groups.append((rows, self._adapter_term(name)))
        return groups

    def _lora_forward(self, x: torch.Tensor, result: torch.Tensor, alora_offsets: Optional[list] = None
                      ) -> torch.Tensor:
        """Add the active adapters' terms to `result`, in order (runs of plain LoRA go to ops in one call; a variant
        adapter runs its own forward); an aLoRA adapter's only at the tokens alora_offsets activate (none without
        offsets)."""
        out_dtype = result.dtype
        pending: list[ops.LoraTerm] = []
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            x = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
            variant_forward = self._variant_forward(adapter, alora_offsets)
            if variant_forward is None:
                pending.append(self._adapter_term(adapter))
                continue
            result = ops.lora_linear(x, result, pending) if pending else result
            pending = []
            result = variant_forward(adapter, x, result)
        if pending:
            result = ops.lora_linear(x, result, pending)
        return result.to(out_dtype)

    def _variant_forward(self, adapter: str, alora_offsets: Optional[list] = None):
        """How a variant adapter adds its term, `f(adapter, x, result) -> result`; None for plain LoRA."""
        if self.use_alora.get(adapter, False):
            return lambda name, x, result: add_alora_term(x, result, self._adapter_term(name), alora_offsets)
        if self.use_dora.get(adapter, False):
            return self._dora_forward
        if self._is_velora(adapter):
            return self._velora_forward
        if self._is_kasa(adapter):
            return self._kasa_forward
        if self._arrow_router(adapter) is not None:
            return self._arrow_forward
        return None

    def _arrow_forward(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + self._arrow_router(adapter)(x, self.lora_A, self.lora_B, self.lora_dropout[adapter],
                                                    self.scaling, self.cast_input_dtype_enabled)

    def _dora_forward(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + self._dora_term(adapter, x, result)

    def _dora_term(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What a DoRA adapter adds to `result` (the output so far, whose base part it rescales)."""
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result
        else:
            x = dropout(x)
            base_result = None
        return self.lora_magnitude_vector[adapter](
            x,
            lora_A=self.lora_A[adapter],
            lora_B=self.lora_B[adapter],
            scaling=self.scaling[adapter],
            base_layer=self.get_base_layer(),
            base_result=base_result,
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = alora_offsets = None
        if kwargs:
            self._check_forward_args(x, *args, **kwargs)
            adapter_names = kwargs.pop("adapter_names", None)
            alora_offsets = kwargs.pop("alora_offsets", None)  # (LoraModel's hooks give them to every LoRA layer)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            result = self.base_layer(x, *args, **kwargs)
            if any(self.use_alora.get(name, False) for name in set(adapter_names)):
                return self._mixed_batch_forward_with_alora(x, result, adapter_names, alora_offsets)
            return self._mixed_batch_forward(x, result, adapter_names)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if any(self.use_alora.get(name, False) for name in self.active_adapters):
            if alora_offsets is None:  # inside a gradient-checkpointed layer (alora.offsets_for_recompute)
                alora_offsets = self._alora_offsets_for_recompute
            return self._lora_forward(x, self.base_layer(x, *args, **kwargs), alora_offsets)
        return self._unmerged_forward(x, *args, **kwargs)

    def _unmerged_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._lora_forward(x, self.base_layer(x, *args, **kwargs))

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        return ops.lora_linear_mixed_batch(x, result, self._mixed_batch_groups(adapter_names))

    def _mixed_batch_forward_with_alora(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str],
                                        alora_offsets: Optional[list]) -> torch.Tensor:
        """A mixed batch (inference) in which some rows ask for aLoRA adapters: the other rows as
        _mixed_batch_forward, then each aLoRA row's adapter at the tokens its own offset activates."""
        plain = [BASE_ADAPTER_NAME if self.use_alora.get(name, False) else name for name in adapter_names]
        result = self._mixed_batch_forward(x, result, plain)
        for name in dict.fromkeys(adapter_names):
            if not self.use_alora.get(name, False) or not self._has_adapter(name):
                continue
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            offsets = None if alora_offsets is None else [alora_offsets[i] for i in rows]
            result[rows] = add_alora_term(x[rows], result[rows], self._adapter_term(name), offsets)
        return result


def _on_gpu_for_setup(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """LoraRuntimeConfig.ephemeral_gpu_offload: both factors on one GPU for set-up work (the GPU one of them is on,
    else the current CUDA device), and whether its results go back to the CPU (a factor was there). Without a GPU
    they stay where they are, with a warning: the numbers are the same, only slower."""
    on_cpu = lora_A.device.type == "cpu" or lora_B.device.type == "cpu"
    if lora_A.device.type == "cuda":
        device = lora_A.device
    elif lora_B.device.type == "cuda":
        device = lora_B.device
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        warnings.warn("ephemeral_gpu_offload=True (LoraRuntimeConfig) but no CUDA device is available: DoRA's "
                      "weight norm is computed where the adapter's weights are.")
        return lora_A, lora_B, False
    return lora_A.to(device), lora_B.to(device), on_cpu


class _LoraModule(nn.Module, LoraLayer):
    """nn.Module first in the MRO (for __init__/__setattr__), LoraLayer's forward; builds the first adapter."""

    forward = LoraLayer.forward

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self._check_base_layer(base_layer, r, config)
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _check_base_layer(self, base_layer: nn.Module, r: int, config: LoraConfig) -> None:
        """Refuse (or adjust for) base layers this layer class cannot adapt; runs before the adapter is built."""

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Linear(_LoraModule):
    """LoRA around nn.Linear, or transformers' Conv1D (weight stored in×out: fan_in_fan_out=True)."""

    _supports_alora = True
    _supports_arrow = True
    _supports_kasa = True
    _supports_velora = True
    _supports_bdlora = True

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # (DoRA rescales W + ΔW and aLoRA acts on some tokens only: neither is a plain ΔW)
        return not self.use_dora.get(adapter_name, False) and not self.use_alora.get(adapter_name, False) and \
            self._arrow_router(adapter_name) is None and not self._is_kasa(adapter_name)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, is_target_conv_1d_layer: bool = False, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config, r, lora_alpha, **kwargs)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def _make_dora_layer(self) -> nn.Module:
        return DoraLinearLayer(fan_in_fan_out=self.fan_in_fan_out)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s · B A (transposed for fan_in_fan_out; KaSA's s·B·diag·A); fp16/bf16 on CPU is computed in fp32."""
        weight_A, weight_B = bdlora.dense(self.lora_A[adapter]), bdlora.dense(self.lora_B[adapter])
        if self._is_kasa(adapter):  # (never fan_in_fan_out)
            return kasa.delta_weight(weight_A, weight_B, self.lora_diag[adapter], self.scaling[adapter])
        dtype = weight_B.dtype
        cast = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = transpose(weight_B @ weight_A, self.fan_in_fan_out) * self.scaling[adapter]
        return delta.to(dtype) if cast else delta

    def _dora_factor(self, adapter, delta, base_weight):
        weight_norm = self.lora_magnitude_vector[adapter].get_weight_norm(
            base_weight, transpose(delta, self.fan_in_fan_out), scaling=1
        ).detach()
        return self._dora_factor_from_norm(adapter, weight_norm), weight_norm

    def _dora_factor_from_norm(self, adapter, weight_norm):
        factor = self.lora_magnitude_vector[adapter].weight / weight_norm
        return transpose(factor.view(-1, 1), self.fan_in_fan_out)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # the common case on CUDA (one active plain adapter, not merged, eager) in one flat function that makes the
        # general path's decisions and its call: each Python level costs host time a decode step pays per layer
        if not args and not kwargs:
            out = cuda_lora.eager_layer_call(self, x)
            if out is not None:
                return out
        return LoraLayer.forward(self, x, *args, **kwargs)

    def _unmerged_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Plain LoRA adapters go to ops as one call covering the base layer too (fused on the Triton backend);
        DoRA, extra base-layer arguments and disabled input casting keep the step-by-step path."""
        # (every forward runs this: module attributes are read from _modules, not through nn.Module.__getattr__)
        lora_a = self._modules["lora_A"]._modules
        active = [a for a in self.active_adapters if a in lora_a]
        base = self._modules["base_layer"]
        if args or kwargs or not active or not self.cast_input_dtype_enabled or isinstance(base, BaseTunerLayer):
            # (a BaseTunerLayer base: stacked adapters of a mixed model, the inner one must run)
            return super()._unmerged_forward(x, *args, **kwargs)
        use_dora = self.use_dora
        if any(use_dora.get(a, False) for a in active) or not cuda_lora.VARIANT_MODULES.isdisjoint(self._modules):
            return super()._unmerged_forward(x, *args, **kwargs)
        return ops.linear_with_lora(x, base, [self._adapter_term(a) for a in active])


class Embedding(_LoraModule):
    """LoRA around nn.Embedding: A is (r × vocab), B is (dim × r), looked up rather than multiplied."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        if config.lora_bias:
            raise ValueError(f"lora_bias={config.lora_bias} is not supported for {type(self).__name__}.")
        # ("eva", "lora_ga": the default init here; EVA and LoRA-GA leave these layers to it, as PEFT does)
        allowed = ("gaussian", "eva", "lora_ga", "mica")
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights not in allowed:
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is not supported for Embedding layers.")
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn((r, self.in_features)))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn((self.out_features, r)))

    def _make_dora_layer(self) -> nn.Module:
        return DoraEmbeddingLayer(fan_in_fan_out=True)

    def _get_embed_scale(self) -> Optional[torch.Tensor]:
        scale = getattr(self.get_base_layer(), "embed_scale", None)
        if scale is None:
            return None
        return scale if isinstance(scale, torch.Tensor) else torch.tensor(scale)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight_A, weight_B = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
        dtype = weight_A.dtype
        cast = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = transpose(weight_B @ weight_A, True) * self.scaling[adapter]
        return delta.to(dtype) if cast else delta

    def _dora_factor(self, adapter, delta, base_weight):
        weight_norm = self.lora_magnitude_vector[adapter].get_weight_norm(base_weight, delta.T, scaling=1).detach()
        return self._dora_factor_from_norm(adapter, weight_norm), weight_norm

    def _dora_factor_from_norm(self, adapter, weight_norm):
        return (self.lora_magnitude_vector[adapter].weight / weight_norm).view(1, -1)

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(
            x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )

    def _adapter_term(self, adapter: str) -> ops.EmbeddingTerm:
        return ops.EmbeddingTerm(
            self.lora_embedding_A[adapter], self.lora_embedding_B[adapter], self.scaling[adapter], self._get_embed_scale()
        )

    def _lora_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        out_dtype = result.dtype
        pending: list[ops.EmbeddingTerm] = []
        for adapter in self.active_adapters:
            if adapter not in self.lora_embedding_A:
                continue
            if self.use_dora.get(adapter, False):
                result = ops.lora_embedding(x, result, pending, self.get_base_layer()) if pending else result
                pending = []
                mag_norm_scale, dora_result = self.lora_magnitude_vector[adapter](
                    x,
                    lora_A=self.lora_embedding_A[adapter].T,
                    lora_B=self.lora_embedding_B[adapter].T,
                    scaling=self.scaling[adapter],
                    base_layer=self.get_base_layer(),
                    embed_fn=self._embed,
                )
                embed_scale = self._get_embed_scale()
                if embed_scale is not None:
                    dora_result = dora_result * embed_scale.to(dora_result.dtype)
                result = mag_norm_scale * result + dora_result
            else:
                pending.append(self._adapter_term(adapter))
        if pending:
            result = ops.lora_embedding(x, result, pending, self.get_base_layer())
        return result.to(out_dtype)

    def _mixed_batch_forward(self, x, result, adapter_names):
        return ops.lora_embedding_mixed_batch(x, result, self._mixed_batch_groups(adapter_names), self.get_base_layer())


class _ConvNd(_LoraModule):
    """LoRA around nn.Conv1d/2d/3d: A is a conv with the base kernel, B a 1×…×1 conv."""

    _conv_fn = None

    def _check_base_layer(self, base_layer: nn.Module, r: int, config: LoraConfig) -> None:
        if base_layer.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
        if r % base_layer.groups != 0:
            raise ValueError(
                f"Targeting a {type(base_layer).__name__} with groups={base_layer.groups} and rank {r}. Currently, "
                "support is limited to conv layers where the rank is divisible by groups. Either choose a different "
                "rank or do not target this specific layer."
            )
        # ("eva", "lora_ga": the default init here; EVA and LoRA-GA leave these layers to it, as PEFT does)
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights not in ("gaussian", "eva", "lora_ga"):
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is not supported for conv layers.")
        self.fan_in_fan_out = False
        self._kernel_dim = base_layer.weight.dim()

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        conv = type(base)
        ones = (1,) * (self._kernel_dim - 2)
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)

    def _make_dora_layer(self) -> nn.Module:
        return DoraConvLayer(type(self)._conv_fn)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = weight_A.dtype
        cast = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        base = self.get_base_layer()
        if base.weight.size()[2:4] == (1, 1):
            r = weight_A.shape[0]
            delta = (weight_B.reshape(-1, r) @ weight_A.reshape(r, -1)).reshape(base.weight.shape) * self.scaling[adapter]
        else:
            delta = type(self)._conv_fn(weight_A.transpose(0, 1), weight_B)
            delta = delta * self.scaling[adapter] if base.groups > 1 else delta.transpose(0, 1) * self.scaling[adapter]
        return delta.to(dtype) if cast else delta

    def _dora_factor(self, adapter, delta, base_weight):
        weight_norm = self.lora_magnitude_vector[adapter].get_weight_norm(base_weight, delta, scaling=1).detach()
        return self._dora_factor_from_norm(adapter, weight_norm), weight_norm

    def _dora_factor_from_norm(self, adapter, weight_norm):
        factor = self.lora_magnitude_vector[adapter].weight / weight_norm
        return factor.view((-1,) + (1,) * (self._kernel_dim - 1))


class Conv1d(_ConvNd):
    _conv_fn = staticmethod(F.conv1d)


class Conv2d(_ConvNd):
    _conv_fn = staticmethod(F.conv2d)


class Conv3d(_ConvNd):
    _conv_fn = staticmethod(F.conv3d)


def dispatch_default(target: nn.Module, adapter_name: str, lora_config: LoraConfig, **kwargs) -> Optional[nn.Module]:
    """The LoRA layer class for a plain torch / transformers target, or None when it is not supported."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Embedding):
        return Embedding(target, adapter_name, lora_config, **kwargs)
    if isinstance(base, nn.Conv2d):
        return Conv2d(target, adapter_name, lora_config, **kwargs)
    if isinstance(base, nn.Conv3d):
        return Conv3d(target, adapter_name, lora_config, **kwargs)
    if isinstance(base, nn.Conv1d):
        return Conv1d(target, adapter_name, lora_config, **kwargs)
    if isinstance(base, nn.Linear):
        if lora_config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                "Setting fan_in_fan_out to False."
            )
            lora_config.fan_in_fan_out = False
        return Linear(target, adapter_name, lora_config, **kwargs)
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(base, conv1d):
        if not lora_config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
            )
            lora_config.fan_in_fan_out = True
        return Linear(target, adapter_name, lora_config, is_target_conv_1d_layer=True, **kwargs)
    return None
