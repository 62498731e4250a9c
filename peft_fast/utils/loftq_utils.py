"""LoftQ initialization (`init_lora_weights="loftq"`, https://arxiv.org/abs/2310.08659; PEFT's module path).

For a full-precision weight W, alternately quantize the part the adapter does not explain and take the best rank-r
approximation of what quantization lost: Q = deq(quant(W − BA)), then B, A from the SVD of W − Q. The base weight
becomes Q (the values a 4-/8-bit model will hold once quantized) and the adapter starts as that rank-r correction.
Quantization is bitsandbytes' (NF4 with blocksize 64 and no double quantization, or LLM.int8()'s row-wise int8),
done by peft_fast's own code on the weight's device: no GPU required.

`replace_lora_weights_loftq` does the same for a model already loaded in 4 bits: the full-precision weights come
from the model's safetensors files, the base stays as loaded, and each adapter becomes the rank-r correction of
what that quantization lost (one LoftQ step).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
from torch import nn

from .. import quantization as Q


def quantize_dequantize(weight: torch.Tensor, num_bits: int) -> torch.Tensor:
    """fp32 `weight` through bitsandbytes' quantizer and back: NF4 (blocksize 64) or row-wise int8."""
    if num_bits == 4:
        packed, state = Q.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
        return Q.dequantize_4bit(packed, state, dtype=torch.float32)
    scale = weight.abs().amax(dim=1, keepdim=True)
    codes = torch.round(weight * (127.0 / scale.clamp_min(torch.finfo(torch.float32).tiny)))
    return codes * scale * (1.0 / 127)


def low_rank_decomposition(weight: torch.Tensor, reduced_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L·R the best rank-`reduced_rank` approximation of `weight`, the singular values split evenly."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:reduced_rank].sqrt()
    return u[:, :reduced_rank] * root, root[:, None] * vh[:reduced_rank]


@torch.no_grad()
def loftq_init(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1):
    """(Q in weight's dtype, lora_A = R, lora_B = L) after `num_iter` rounds of quantize / SVD."""
    if num_bits not in (4, 8):
        raise ValueError(f"LoftQ quantizes to 4 bits (NF4) or 8 bits (int8), got loftq_bits={num_bits!r}")
    if num_iter <= 0:
        raise ValueError(f"LoftQ needs at least one iteration, got loftq_iter={num_iter!r}")
    if weight.dim() != 2:
        raise ValueError(f"LoftQ needs a 2-D weight, got shape {tuple(weight.shape)}")
    full = weight.detach().float()
    residual = full
    for step in range(num_iter):
        dequantized = quantize_dequantize(residual, num_bits)
        lora_b, lora_a = low_rank_decomposition(full - dequantized, reduced_rank)
        if step + 1 < num_iter:
            residual = full - lora_b @ lora_a
    return dequantized.to(weight.dtype), lora_a, lora_b


class _SafetensorsWeights:
    """Tensors of a saved model by name, read one at a time: `model.safetensors`, or the shards that
    `model.safetensors.index.json` lists beside it."""

    FILE = "model.safetensors"

    def __init__(self, model: nn.Module, model_path: Optional[str]):
        from safetensors import safe_open

        if model_path is None:
            model_path = self._saved_model_dir(model)
        path = model_path if model_path.endswith(self.FILE) else os.path.join(model_path, self.FILE)
        if os.path.exists(path):
            self.source = path
            with safe_open(path, framework="pt", device="cpu") as f:
                self.files = dict.fromkeys(f.keys(), path)  # tensor name → file holding it
        else:
            folder = os.path.dirname(path)
            index = os.path.join(folder, self.FILE + ".index.json")
            if not os.path.exists(index):
                raise FileNotFoundError(f"Could not find file for {path}, ensure that there is a (sharded) safetensors "
                                        "file of the model.")
            self.source = f"the files of {index}"
            with open(index) as f:
                self.files = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
        self.base_model_prefix = getattr(model.get_base_model(), "base_model_prefix", None)

    @staticmethod
    def _saved_model_dir(model: nn.Module) -> str:
        """The folder the base model was loaded from (a local path, or its copy in the Hugging Face cache)."""
        name = getattr(getattr(model.get_base_model(), "config", None), "_name_or_path", None)
        if not name:
            raise ValueError("The provided model does not appear to be a transformers model or is a local model. In "
                             "this case, you must pass the model_path argument that points to the safetensors file.")
        if os.path.isdir(name):
            return name
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return snapshot_download(name, local_files_only=True)
        except HFValidationError as exc:
            raise ValueError(f"The model's name {name!r} is neither a local folder nor a Hugging Face model id; pass "
                             "the model_path argument that points to the safetensors file.") from exc
        except LocalEntryNotFoundError as exc:
            raise ValueError("The model.safetensors file must be present on disk, but it could not be found.") from exc

    def _locate(self, name: str) -> tuple[str, str]:
        """(file, key) of the tensor `name`; a saved base model may lack the prefix of the task model's names."""
        names = [name]
        prefix = f"{self.base_model_prefix}." if self.base_model_prefix else None
        if prefix and name.startswith(prefix):
            names.append(name[len(prefix):])
        for key in names:
            if key in self.files:
                return self.files[key], key
        raise ValueError(f"The saved model has no tensor {name!r} (looked for {' or '.join(map(repr, names))} in "
                         f"{self.source}).")

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        path, key = self._locate(name)
        with safe_open(path, framework="pt", device="cpu") as f:
            return tuple(f.get_slice(key).get_shape())

    def get_tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, key = self._locate(name)
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.get_tensor(key)


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model,
    model_path: Optional[str] = None,
    adapter_name: str = "default",
    callback: Optional[Callable[[nn.Module, str], bool]] = None,
):
    """Re-initialize the LoRA weights of a model quantized to 4 bits with bitsandbytes by LoftQ (one step).

    For each LoRA layer on a 4-bit base, the full-precision weight W is read from the model's safetensors file(s)
    (`model_path`: the file or its folder; default: the folder the model was loaded from) and the adapter becomes
    the best rank-r approximation of W − dequantize(Q) (A and B unscaled, as PEFT sets them: lora_alpha = r makes
    the layer closest to W). `callback(peft_model, module_name)` is called after each layer's replacement and the
    layer's previous A and B come back where it returns False (keep only replacements that help, greedily).

    Every layer's tensor is looked up before any adapter changes: a missing tensor or a wrong shape raises with the
    model unchanged."""
    from ..tuners.lora.bnb import Linear4bit, dequantize_4bit_layer

    prefix = "base_model.model."
    layers = [(name, module) for name, module in peft_model.named_modules() if isinstance(module, Linear4bit)]
    if not layers:
        raise ValueError("No bnb LoRA module found on the model")
    for name, module in layers:
        if not name.startswith(prefix):
            raise TypeError("The passed model does not appear to be a valid PeftModel")
        if adapter_name not in module.lora_A:
            raise ValueError(f"Adapter {adapter_name!r} is not a LoRA adapter of {name[len(prefix):]} (it has "
                             f"{sorted(module.lora_A)}).")
    weights = _SafetensorsWeights(peft_model, model_path)
    for name, module in layers:
        base = module.get_base_layer()
        tensor_name = name[len(prefix):] + ".weight"
        shape = weights.shape(tensor_name)
        if shape != (base.out_features, base.in_features):
            raise ValueError(f"The saved tensor {tensor_name!r} has shape {shape}, the quantized layer holds "
                             f"{(base.out_features, base.in_features)}.")

    for name, module in layers:
        name = name[len(prefix):]
        quantized = dequantize_4bit_layer(module.get_base_layer()).float()
        full = weights.get_tensor(name + ".weight").to(device=quantized.device, dtype=torch.float32)
        lora_b, lora_a = low_rank_decomposition(full - quantized, module.r[adapter_name])
        a_param = module.lora_A[adapter_name].weight
        b_param = module.lora_B[adapter_name].weight
        before = a_param.data, b_param.data
        a_param.data = lora_a.to(device=a_param.device, dtype=a_param.dtype)
        b_param.data = lora_b.to(device=b_param.device, dtype=b_param.dtype)
        if callback is not None and not callback(peft_model, name):
            a_param.data, b_param.data = before
