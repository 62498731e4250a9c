"""TrainableTokensLayer (PEFT's `peft.tuners.trainable_tokens.layer`): a few rows of an embedding matrix train.

Per adapter the layer keeps the trained rows (`trainable_tokens_delta`, a (tokens × dim) parameter; despite the name
PEFT gives it, the rows themselves, not a difference), the rows as they were (`trainable_tokens_original`, for
unmerge) and the token indices. A layer tied to another one (an LM head sharing the input embedding's weight) holds
none of its own: it reads the embedding layer's, so both always agree.

Forward without merging, as PEFT's: the output equals the base layer's with the matrix's rows at the token indices
replaced by the adapter's. PEFT builds that whole matrix (vocabulary × dim) each call; here an embedding looks up
the base matrix and then swaps in the adapter's rows where the input holds one of the tokens (the same numbers, with
traffic that grows with the batch, not with the vocabulary), and an LM head computes the logits of those tokens from
the adapter's rows into the base logits. Embeddings with max_norm, scale_grad_by_freq, sparse gradients or a trained
padding token take PEFT's route, whose gradients they define.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._buffer_dict import BufferDict
from ..tuners_utils import BaseTunerLayer, check_adapters_to_merge
from .config import TrainableTokensConfig, check_token_indices


class TrainableTokensLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: TrainableTokensConfig | list | dict | None = None,
        tied_adapter: Optional["TrainableTokensLayer"] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise TypeError(f"TrainableTokensLayer adapts nn.Embedding or nn.Linear (a tied LM head) layers, got "
                            f"{type(base_layer).__name__}; check target_modules / trainable_token_indices")
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self.kwargs = kwargs
        # in a list, so that the tied layer is no submodule of this one (its weights would be saved twice)
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original = BufferDict({})
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        self.merged_adapters: list[str] = []
        self._index_cache: dict[tuple, torch.Tensor] = {}
        if isinstance(base_layer, nn.Embedding):
            self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @property
    def tied_adapter(self) -> Optional["TrainableTokensLayer"]:
        return self._tied_adapter[0] if self._tied_adapter else None

    @property
    def _num_tokens(self) -> int:
        base = self.get_base_layer()
        return base.num_embeddings if isinstance(base, nn.Embedding) else base.out_features

    def update_layer(self, adapter_name: str, config: TrainableTokensConfig | None = None,
                     tied_adapter: Optional["TrainableTokensLayer"] = None, **kwargs) -> None:
        """Create adapter `adapter_name`: its rows start as the tokens' current rows (init_weights=True) or random.
        A tied layer creates nothing (it follows the layer it is tied to)."""
        if tied_adapter is not None or self.tied_adapter is not None:
            return
        indices = config.token_indices if config is not None else kwargs["token_indices"]
        init_weights = config.init_weights if config is not None else kwargs.get("init_weights", True)
        check_token_indices(indices, "token_indices")
        indices = [int(i) for i in indices]
        out_of_range = [i for i in indices if i >= self._num_tokens]
        if out_of_range:
            raise ValueError(f"token_indices {out_of_range[:5]} are out of range for a layer of {self._num_tokens} "
                             "tokens (resize the token embeddings first when adding tokens)")
        weight = self.get_base_layer().weight
        dim = weight.shape[1]
        if weight.device.type == "meta":
            originals = torch.empty((len(indices), dim), dtype=weight.dtype, device="meta")
        else:
            originals = weight.detach()[torch.tensor(indices, dtype=torch.long, device=weight.device)].clone()
        values = originals.clone() if init_weights else \
            torch.randn((len(indices), dim), dtype=weight.dtype, device=weight.device)
        self.token_indices[adapter_name] = indices
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values, requires_grad=True)
        self.trainable_tokens_original[adapter_name] = originals
        self._index_cache.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._index_cache.clear()

    # ------------------------------------------------------------------ which rows
    def _present(self, adapter_names) -> list[str]:
        """The given adapters that this layer has (a model's other adapters may not train tokens)."""
        return [a for a in adapter_names if a in self.trainable_tokens_delta]

    def _check_overlapping_tokens(self, adapter_names: list[str]) -> None:
        """Two adapters replacing the same row have no defined result: refused (merged ones count too)."""
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + list(adapter_names)):
            indices = set(self.token_indices[name])
            if seen & indices:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in undefined "
                                 "merging behavior. Only disjunct token indices are currently supported.")
            seen |= indices

    def _index(self, adapter_names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """The adapters' token indices, concatenated, as a long tensor on `device` (made once)."""
        key = (adapter_names, device)
        index = self._index_cache.get(key)
        if index is None:
            flat = [i for name in adapter_names for i in self.token_indices[name]]
            index = self._index_cache[key] = torch.tensor(flat, dtype=torch.long, device=device)
        return index

    def _slots(self, adapter_names: tuple[str, ...], weight: torch.Tensor) -> torch.Tensor:
        """For each token of the vocabulary its row among the adapters' rows, -1 where it has none (made once)."""
        key = ("slots", adapter_names, weight.device)
        slots = self._index_cache.get(key)
        if slots is None:
            index = self._index(adapter_names, weight.device)
            slots = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
            slots[index] = torch.arange(index.numel(), device=weight.device)
            self._index_cache[key] = slots
        return slots

    def _rows(self, adapter_names: list[str], dtype: torch.dtype) -> torch.Tensor:
        deltas = [self.trainable_tokens_delta[a].to(dtype) for a in adapter_names]
        return deltas[0] if len(deltas) == 1 else torch.cat(deltas)

    # ------------------------------------------------------------------ merging
    def get_merged_weights(self, active_adapters) -> torch.Tensor:
        """The base weight with the adapters' rows in place (a new tensor; the base weight is untouched)."""
        weight = self.get_base_layer().weight
        for name in self._present(active_adapters):
            index = self._index((name,), weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))
        return weight

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = self._present(check_adapters_to_merge(self, adapter_names))
        if not adapter_names:
            return
        self._check_overlapping_tokens(adapter_names)
        base = self.get_base_layer()
        merged = base.weight.data
        for name in adapter_names:
            index = self._index((name,), merged.device)
            merged = merged.index_copy(0, index, self.trainable_tokens_delta[name].to(merged))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        base.weight.data = merged
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            index = self._index((name,), weight.device)
            weight.data.index_copy_(0, index, self.trainable_tokens_original[name].to(weight))

    # ------------------------------------------------------------------ forward
    def forward_adapters(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
        active = self._present(active_adapters)
        if self.disable_adapters or not active:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        self._check_overlapping_tokens(active)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            return self._embed(x, active)
        if isinstance(base, nn.Linear):
            return self._project(x, active)
        raise ValueError("TrainableTokensLayer wraps an unknown layer type, maybe you are targeting the wrong layer?")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.forward_adapters(x, self.active_adapters, *args, **kwargs)

    def _embed(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        base = self.base_layer
        weight = base.weight
        if base.max_norm is not None or base.scale_grad_by_freq or base.sparse or \
                (base.padding_idx is not None and base.padding_idx in {i for a in active for i in self.token_indices[a]}):
            out = F.embedding(x, self.get_merged_weights(active), base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        else:
            out = F.embedding(x, weight, base.padding_idx)
            pos = self._slots(tuple(active), weight)[x]
            rows = self._rows(active, weight.dtype)[pos.clamp(min=0)]
            out = torch.where((pos >= 0).unsqueeze(-1), rows, out)
        scale = getattr(base, "embed_scale", None)  # e.g. Gemma's scaled embeddings, which F.embedding skips
        if scale is not None:
            out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
        return out

    def _project(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """An output layer (x · Wᵀ + b) whose rows at the token indices are the adapter's: the base logits, with
        those tokens' logits computed from the adapter's rows."""
        base = self.base_layer
        out = F.linear(x, base.weight, base.bias)
        index = self._index(tuple(active), out.device)
        bias = None if base.bias is None else base.bias[index]
        # in place: the base GEMM's backward does not read its output
        return out.index_copy_(-1, index, F.linear(x, self._rows(active, base.weight.dtype), bias))
