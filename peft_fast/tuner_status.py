"""`get_layer_status` / `get_model_status`: what PEFT reports about the adapter layers of a model (which adapters
exist, are active, merged, trainable, on which devices), so that a model left in an inconsistent state shows it.
Exported as PEFT exports them (`peft_fast.get_layer_status`, `peft_fast.peft_model.get_layer_status`, and the
`PeftModel` methods); the field names and values are PEFT's."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Optional, Union

from torch import nn

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _agreement(values: list):
    """The single value all of `values` share, else "irregular"."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else "irregular"


def _all_true_or_false(values: list) -> Union[bool, Irregular]:
    """True when every value is True (also for none), False when every one is False, else "irregular"."""
    if all(v is True for v in values):
        return True
    return False if all(v is False for v in values) else "irregular"


def _adapter_modules(layer: nn.Module, names) -> dict[str, list]:
    """adapter name → the parameters held for it under the layer's attributes `names` (ModuleDicts: every
    parameter of the adapter's submodule; ParameterDicts and buffer dicts: the tensor itself)."""
    found: dict[str, list] = collections.defaultdict(list)
    for attr in names:
        holder = getattr(layer, attr, None)
        if isinstance(holder, nn.ModuleDict):
            for adapter, sub in holder.items():
                found[adapter].extend(sub.parameters())
        elif isinstance(holder, nn.ParameterDict) or type(holder).__name__ == "BufferDict":
            for adapter, tensor in holder.items():
                found[adapter].append(tensor)
    return found


def _reports_status(module: nn.Module) -> bool:
    from .tuners.tuners_utils import BaseTunerLayer
    from .utils.other import ModulesToSaveWrapper

    return isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))


def _tuner_of(model: nn.Module, caller: str) -> nn.Module:
    from .peft_model import PeftModel
    from .tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        if not isinstance(model.base_model, BaseTuner):
            raise TypeError(f"{caller}() got an invalid PeftModel instance; prefix tuning and adaption prompt are "
                            "not supported.")
        return model.base_model
    return model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One `TunerLayerStatus` per adapter layer (and `modules_to_save` wrapper) of `model`, a PeftModel, a model
    with injected adapters, or any nn.Module holding them. ValueError when it holds none; TypeError for a
    prompt-learning PeftModel, which has no adapter layers."""
    statuses = []
    for name, module in _tuner_of(model, "get_layer_status").named_modules():
        if not _reports_status(module):
            continue
        adapter_names = tuple(module.adapter_layer_names)
        trainable = _adapter_modules(module, adapter_names)
        # all / none / some of an adapter's parameters train: True / False / "irregular"
        requires_grad = {a: _all_true_or_false([p.requires_grad for p in ps]) for a, ps in trainable.items()}
        placed = _adapter_modules(module, adapter_names + tuple(module.other_param_names))
        backend = getattr(module, "quantization_backend", None)
        statuses.append(TunerLayerStatus(
            name=name,
            module_type=repr(module).partition("(")[0],
            enabled=not module.disable_adapters,
            active_adapters=module.active_adapters,
            merged_adapters=module.merged_adapters,
            requires_grad=requires_grad,
            available_adapters=sorted(module._get_available_adapters()),
            devices={a: sorted({p.device.type for p in ps}) for a, ps in placed.items()},
            quantization_backend=None if backend is None else backend.backend_name,
        ))
    if not statuses:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                         "PEFT adapters injected in the model.")
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter state of the whole model, each field "irregular" where its layers disagree (a model in that
    state may not behave as expected)."""
    from .peft_model import PeftModel

    tuner = _tuner_of(model, "get_model_status")
    if isinstance(model, PeftModel):
        base_model_type = type(model.get_base_model()).__name__
        adapter_model_type = type(tuner).__name__
        peft_types = {name: str(config.peft_type).partition(".")[-1] for name, config in tuner.peft_config.items()}
    else:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency
            PreTrainedModel = ()
        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        adapter_model_type, peft_types = "None", {}
    trainable_params, total_params = PeftModel.get_nb_trainable_parameters(model)
    layers = get_layer_status(model)

    active = {tuple(s.active_adapters) for s in layers}
    # an adapter merged in one layer must be merged in every layer that has it
    merged_somewhere = set().union(*(s.merged_adapters for s in layers))
    unmerged_somewhere = set().union(*(set(s.available_adapters) - set(s.merged_adapters) for s in layers))
    requires_grad: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set] = collections.defaultdict(set)
    for s in layers:
        for adapter, value in s.requires_grad.items():
            requires_grad[adapter].append(value)
        for adapter, types in s.devices.items():
            devices[adapter].update(types)
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable_params,
        total_params=total_params,
        num_adapter_layers=len(layers),
        enabled=_agreement([s.enabled for s in layers]),
        active_adapters=[] if not active else list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters="irregular" if merged_somewhere & unmerged_somewhere else sorted(merged_somewhere),
        requires_grad={a: _all_true_or_false(vals) for a, vals in requires_grad.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={a: sorted(types) for a, types in devices.items()},
        quantization_backend=_agreement([s.quantization_backend for s in layers]),
    )
