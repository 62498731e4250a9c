"""EVA: Explained Variance Adaptation (arXiv 2410.07170; PEFT's `peft.tuners.lora.eva`).

`get_peft_model(model, LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...)))`, then
`initialize_lora_eva_weights(peft_model, dataloader)`: the model runs batch after batch of the data with the adapters
off, while a hook on every adapted linear layer feeds that layer's inputs (the positions that count: attention mask,
and labels ≠ -100 with `use_label_mask`) to an incremental PCA. Layers that see the same input (q, k, v) share one PCA.
After each batch the rank budget (Σ r over the layers) goes to the components with the largest explained variance
ratios, each layer capped at round(r · rho); a layer stops being fed once the components it was given have converged
(cosine similarity with the previous batch's ≥ tau), and the run ends when every layer has. Each layer's A becomes
its top components (B stays zero, so the model's output is unchanged), with the rank it was given: layers given none
lose their adapter, rank_pattern / alpha_pattern / target_modules in the config follow.
`get_eva_state_dict` computes the components alone (also on a model without adapters, given the config), to be
loaded later with `initialize_lora_eva_weights(peft_model, eva_state_dict=...)`.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from copy import copy, deepcopy
from itertools import cycle
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ...utils.incremental_pca import IncrementalPCA
from ...utils.other import _get_submodules, get_pattern_key
from ..tuners_utils import check_target_module_exists
from .config import LoraConfig
from .layer import Embedding, LoraLayer, _conv1d_class, _ConvNd
from .multihead_attention import MultiheadAttention

logger = logging.getLogger(__name__)

# adapter layers EVA leaves to the default init (their inputs are not vectors a linear map reads)
UNSUPPORTED_LORA_MODULES = (Embedding, MultiheadAttention, _ConvNd)

# from this many adapted modules on, target_modules is written as the shortest suffixes that pick them out
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20


# ---------------------------------------------------------------------------------------------------------------
# What the hooks read: model inputs → the positions that count; layer inputs → rows for the PCA

def prepare_model_inputs_fn_language_modeling(model_input, peft_config: LoraConfig) -> torch.Tensor:
    """(batch, position) indices of the tokens EVA learns from: attention_mask, and with use_label_mask the positions
    whose label is not label_mask_value."""
    if not isinstance(model_input, dict):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if peft_config.eva_config.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


def _first_tensor(layer_input, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer "
                        f"{layer_name}, please provide a custom prepare_layer_inputs_fn")
    return layer_input


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """The layer's input rows at the (batch, position) indices that prepare_model_inputs_fn_language_modeling chose."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def _prepare_layer_inputs_fn_default(layer_input, model_input, layer_name) -> torch.Tensor:
    """Every row of the layer's input (all leading dimensions flattened)."""
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.size(-1)) if x.dim() > 2 else x


def forward_fn_dict(model, inputs):
    return model(**inputs)


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """x's rows from every rank of the process group, concatenated in rank order (row counts may differ)."""
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.size(0)], device=x.device))
    most = int(max(c.item() for c in counts))
    padded = torch.cat([x, x.new_zeros(most - x.size(0), *x.shape[1:])]) if x.size(0) < most else x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)])


class _Hook:
    """A forward hook that turns a layer's input into the rows EVA uses (model_input: what prepare_model_inputs_fn
    made of the current batch)."""

    def __init__(self, name: str, prepare_layer_inputs_fn: Optional[Callable] = None,
                 gather_distributed_inputs: bool = True):
        self.name = name
        self.gather_distributed_inputs = gather_distributed_inputs
        self._prepare_layer_inputs_fn = prepare_layer_inputs_fn or _prepare_layer_inputs_fn_default
        self.model_input = None

    @torch.no_grad()
    def prepare_layer_inputs(self, layer_input) -> torch.Tensor:
        return self._prepare_layer_inputs_fn(layer_input, self.model_input, self.name)

    def gather_layer_inputs(self, layer_input: torch.Tensor) -> torch.Tensor:
        if self.gather_distributed_inputs and dist.is_available() and dist.is_initialized():
            return _gather_rows(layer_input)
        return layer_input


class HashHook(_Hook):
    """Records a fingerprint of each input the layer sees (layers with equal inputs share one PCA)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hashed_inputs = []

    @staticmethod
    def hash_fn(tensor: torch.Tensor) -> str:
        t = tensor.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    @torch.no_grad()
    def __call__(self, module, input, output):
        self.hashed_inputs.append(self.hash_fn(self.gather_layer_inputs(self.prepare_layer_inputs(input))))


class SVDHook(_Hook):
    """One incremental-PCA step on each input the layer sees; `converged[i]`: component i's cosine similarity with
    its value before this step reached sim_thresh."""

    def __init__(self, n_components: int, sim_thresh: Union[float, torch.Tensor], **kwargs):
        super().__init__(**kwargs)
        if isinstance(sim_thresh, torch.Tensor) and sim_thresh.dim() > 0:
            if sim_thresh.dim() != 1 or sim_thresh.size(0) not in (1, n_components):
                raise ValueError("if sim_thresh is a tensor with more than 0 dimensions it must have shape "
                                 "(n_components,) or (1,)")
        self.n_components = n_components
        self.sim_thresh = sim_thresh
        self.svd = IncrementalPCA(n_components=n_components, copy=True, lowrank=True, lowrank_seed=42)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module, input, output):
        before = getattr(self.svd, "components_", None)
        before = None if before is None else before.clone()
        rows = self.gather_layer_inputs(self.prepare_layer_inputs(input))
        if rows.size(0) < self.n_components:
            logger.warning("skipping SVD for %s because there are less than %d examples", self.name,
                           self.n_components)
            return
        self.svd.partial_fit(rows.to(torch.float32))
        if before is None:
            return
        now = self.svd.components_
        if now.dim() == 1:
            now, before = now.reshape(1, -1), before.reshape(1, -1)
        self.converged = nn.functional.cosine_similarity(now, before) >= self.sim_thresh


# ---------------------------------------------------------------------------------------------------------------
# Computing the components

def _device_of(model: nn.Module) -> Optional[torch.device]:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    if len(devices) > 1:
        warnings.warn(f"Could not determine device, model has multiple devices: {devices}")
        return None
    return next(iter(devices), None)


def _to_device(inputs, device: torch.device):
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device")
    return inputs


def _rank_distribution(hooks: dict, layer_hook: dict, shared: dict, budget: int, max_components: dict) -> dict:
    """Ranks per layer: the `budget` components of largest explained variance ratio over all layers (a layer that
    shares another's input competes with that layer's ratios); of layers sharing one input, the one that owns the
    PCA holds the largest rank (its components serve the others)."""
    ratios = {name: hook.svd.explained_variance_ratio_[: max_components[name]] for name, (hook, _) in hooks.items()}
    owners = [layer for layer, owner in layer_hook.items() for _ in range(len(ratios[owner]))]
    order = torch.cat([ratios[owner] for owner in layer_hook.values()]).argsort(descending=True)
    taken = Counter(owners[i] for i in order[:budget].tolist())
    ranks = {layer: taken.get(layer, 0) for layer in layer_hook}
    for layer, owner in shared.items():
        if ranks[owner] < ranks[layer]:
            ranks[owner], ranks[layer] = ranks[layer], ranks[owner]
    return ranks


def _get_eva_state_dict(model, dataloader, peft_config, is_target, forward_fn, prepare_model_inputs_fn,
                        prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar) -> dict:
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and gather_distributed_inputs:
        warnings.warn("torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA "
                      "initialization will gather tensors from all ranks. Ensure the model does not receive the same "
                      "inputs on different ranks.")
    rho = peft_config.eva_config.rho
    if rho > 1000:  # (an unusually high rho: no layer can take more components than its widest weight has)
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)
    device = _device_of(model)

    def hook_inputs(batch):
        return prepare_model_inputs_fn(batch, peft_config) if prepare_model_inputs_fn is not None else deepcopy(batch)

    per_layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    targets, max_components, budget = {}, {}, 0
    for name, module in model.named_modules():
        if not is_target(name, module):
            continue
        fn = per_layer_fns.pop(name, None) if per_layer_fns is not None else prepare_layer_inputs_fn
        rank = peft_config.rank_pattern.get(get_pattern_key(peft_config.rank_pattern.keys(), name), peft_config.r)
        targets[name] = (module, fn)
        max_components[name] = round(rank * rho)
        budget += rank
    if per_layer_fns:
        raise ValueError("prepare_layer_inputs_fn is a mapping but the following module names were not found in the "
                         f"model: {per_layer_fns.keys()}")
    if not targets:
        raise ValueError("EVA found no layer to initialize: no nn.Linear / Conv1D layer matches the config's "
                         "target_modules (or, on a PeftModel, no LoRA linear layer).")

    training = model.training
    model.eval()
    handles = []  # the equal-input pass's
    hooks = {}  # owner layer → (SVDHook, its handle while registered)
    try:
        # one batch first: which layers see equal inputs (one PCA serves them all)
        batch = next(iter(dataloader))
        if device is not None:
            batch = _to_device(batch, device)
        hash_hooks = {}
        for name, (module, fn) in targets.items():
            hook = HashHook(name=name, prepare_layer_inputs_fn=fn, gather_distributed_inputs=gather_distributed_inputs)
            hook.model_input = hook_inputs(batch)
            handles.append(module.register_forward_hook(hook))
            hash_hooks[name] = hook
        forward_fn(model, batch)
        for handle in handles:
            handle.remove()
        handles.clear()
        groups = {}
        for name, hook in hash_hooks.items():
            if not hook.hashed_inputs:
                raise ValueError(f"EVA: layer {name} was not called by forward_fn on the first batch.")
            groups.setdefault(hook.hashed_inputs[0], []).append(name)
        shared = {}  # layer → the layer whose PCA it uses
        for names in groups.values():
            most = max(max_components[n] for n in names)
            for n in names:
                max_components[n] = most
                if n != names[0]:
                    shared[n] = names[0]

        for name, (module, fn) in targets.items():
            if name in shared:
                continue
            hook = SVDHook(n_components=max_components[name], sim_thresh=peft_config.eva_config.tau, name=name,
                           prepare_layer_inputs_fn=fn, gather_distributed_inputs=gather_distributed_inputs)
            hooks[name] = (hook, module.register_forward_hook(hook))
        layer_hook = {**{name: name for name in hooks}, **shared}

        batches = cycle(dataloader)
        progress = None
        if show_progress_bar and (not distributed or dist.get_rank() == 0):
            from tqdm import tqdm

            batches = progress = tqdm(batches, position=0, leave=False)
        done = {name: False for name in hooks}
        ranks = dict(max_components)
        for batch in batches:
            if device is not None:
                batch = _to_device(batch, device)
            model_input = hook_inputs(batch)
            for name, (hook, handle) in hooks.items():
                converged = bool(torch.all(hook.converged[: ranks[name]]))
                if not done[name] and converged:  # the components it was given settled: stop feeding it
                    handle.remove()
                    hooks[name] = (hook, None)
                    done[name] = True
                    continue
                if done[name] and not converged:  # it was given more components than have settled
                    hooks[name] = (hook, targets[name][0].register_forward_hook(hook))
                    done[name] = False
                hook.model_input = model_input
            if progress is not None:
                settled = sum(done.values()) + sum(done[owner] for owner in shared.values())
                progress.set_description(f"{settled}/{len(layer_hook)} layers have converged")
            if all(done.values()):
                break
            forward_fn(model, batch)
            if all(hasattr(hook.svd, "components_") for hook, _ in hooks.values()):
                ranks = _rank_distribution(hooks, layer_hook, shared, budget, max_components)
        if progress is not None:
            progress.close()
    finally:
        for handle in handles:
            handle.remove()
        for hook, handle in hooks.values():
            if handle is not None:
                handle.remove()
        model.train(training)

    state = {}
    for name, rank in ranks.items():
        hook = hooks[layer_hook[name]][0]
        if not torch.all(hook.converged[:rank]):
            raise ValueError(f"Layer {name} has not converged but was assigned rank {rank}.")
        u = hook.svd.components_[:rank]
        if peft_config.eva_config.whiten:
            # (not in place: layers sharing this PCA read the same components)
            u = u / hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        state[name] = u if device is None else u.to(device)
    return state


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Optional[LoraConfig] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict:
    """EVA's components for every adapted layer: {module name: (rank × in_features) tensor}, the rows A starts as.

    `model` is a PeftModel (its LoRA linear layers, the adapters off while the data runs; `peft_config` defaults to
    its adapter's) or a plain model with `peft_config` naming the target modules. `forward_fn(model, batch)` runs a
    batch (default: `model(**batch)`); `prepare_model_inputs_fn(batch, peft_config)` turns it into what
    `prepare_layer_inputs_fn(layer_input, model_input, layer_name)` needs to pick each layer's rows (a dict of such
    functions by layer name is accepted); the defaults keep the positions of a language-modeling batch that count.
    With torch.distributed initialized and `gather_distributed_inputs`, each layer's rows are gathered from all ranks.
    """
    is_peft_model = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft_model:
            raise ValueError("peft_config is required if model is not a PeftModel")
        peft_config = model.peft_config[adapter_name]
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"EVA needs a LoraConfig, got {type(peft_config).__name__}")
    if peft_config.eva_config is None:  # (a config made for another init: EVA's defaults, as PEFT's config would)
        peft_config = copy(peft_config)
        from .config import EvaConfig

        peft_config.eva_config = EvaConfig()
    if is_peft_model:
        context = model.disable_adapter()

        def is_target(name, module):
            return hasattr(module, "base_layer") and not isinstance(module, UNSUPPORTED_LORA_MODULES)
    else:
        context = nullcontext()
        linear = (nn.Linear,) + ((_conv1d_class(),) if _conv1d_class() is not None else ())

        def is_target(name, module):
            targeted = peft_config.target_modules is None or bool(check_target_module_exists(peft_config, name))
            return isinstance(module, linear) and targeted
    with context:
        return _get_eva_state_dict(model, dataloader, peft_config, is_target, forward_fn, prepare_model_inputs_fn,
                                   prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar)


# ---------------------------------------------------------------------------------------------------------------
# Loading them into the adapters

def _minimal_suffixes(targets: list[str], others: list[str]) -> set[str]:
    """For each target module name its shortest dotted suffix that no other module name ends with."""
    def suffixes(name):
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first

    taken = {s for other in others for s in suffixes(other)}
    return {next((s for s in suffixes(t) if s not in taken), t) for t in targets}


def _load_eva_state_dict(model: nn.Module, eva_state_dict: dict, adapter_name: str) -> None:
    config = model.peft_config[adapter_name]
    layers, other_names = {}, []
    for name, module in model.named_modules():
        short = name.replace("base_model.model.", "")
        if isinstance(module, LoraLayer):
            layers[name] = (short, module)
        else:
            other_names.append(short)
    # the components by this model's module names (a state dict computed on the base model has them without the
    # PeftModel's "base_model.model." prefix); every one checked before any layer changes
    by_name = {}
    for name, (short, module) in layers.items():
        key = name if name in eva_state_dict else short if short in eva_state_dict else None
        if key is None:
            continue
        w = eva_state_dict[key]
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or (w.size(0) and w.size(1) != module.in_features):
            raise ValueError(f"eva_state_dict[{key!r}] must be a (rank × {module.in_features}) tensor for layer "
                             f"{name}, got {getattr(w, 'shape', type(w).__name__)}")
        if isinstance(module, UNSUPPORTED_LORA_MODULES):
            continue
        by_name[name] = w
    unused = set(eva_state_dict) - {k for n, (s, _) in layers.items() for k in (n, s)}
    if unused:
        warnings.warn(f"eva_state_dict entries matching no LoRA layer of the model are ignored: {sorted(unused)}")

    settings = copy(config)
    targets, missing, rank_pattern, alpha_pattern = [], [], {}, {}
    for name, (short, module) in layers.items():
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        if name in by_name:
            w = by_name[name]
            rank = w.size(0)
            if rank == 0:  # no component for this layer: it goes back to being its base layer
                parent, _, child = _get_submodules(model, name)
                setattr(parent, child, module.get_base_layer())
                continue
            if rank != r and config.eva_config.adjust_scaling_factors:
                alpha *= rank / r
            if rank != r or module.lora_A[adapter_name].weight.device.type == "meta":
                settings.init_lora_weights = "eva"
                module.update_layer(adapter_name=adapter_name, r=rank, lora_alpha=alpha, config=settings)
            module.lora_A[adapter_name].weight.copy_(w)
            targets.append(short)
        else:
            settings.init_lora_weights = True
            module.update_layer(adapter_name=adapter_name, r=r, lora_alpha=alpha, config=settings)
            missing.append(short)
            rank = r
        if rank != config.r:
            rank_pattern[short] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
    targets += missing
    optimize = len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION
    config.target_modules = _minimal_suffixes(targets, other_names) if optimize else set(targets)
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn("the following layers were initialized with init_lora_weights=True because they were not found "
                      f"in the eva state_dict: {missing}\ncurrently the following lora modules are not supported by "
                      f"EVA: {UNSUPPORTED_LORA_MODULES}")


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    eva_state_dict: Optional[dict] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Initialize a PeftModel's LoRA adapter (made with init_lora_weights="eva") by EVA: from `eva_state_dict`, or
    computed on `dataloader` (get_eva_state_dict's arguments). Returns the model."""
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if adapter_name not in model.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} does not exist; the model has {list(model.peft_config)}")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    _load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model
