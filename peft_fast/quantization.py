"""4-bit (NF4 / FP4) and blockwise 8-bit quantization in bitsandbytes' byte layout (DESIGN.md §3), in plain torch.

peft_fast reads and writes the same bytes as bitsandbytes without needing it (CPU path, tests, loading quantized
checkpoints): packed uint8 weights (element 2j in the high nibble), one fp32 absmax per block, optionally the
absmaxes themselves quantized ("double quantization": 8-bit dynamic code, blocks of 256, mean offset), and the
state-dict keys of `bnb.nn.Params4bit`. Rounding is to the nearest code value (ties to the lower code), as the
bitsandbytes torch and CUDA kernels do.

`QuantState4bit` uses bitsandbytes' attribute names (absmax, shape, code, blocksize, quant_type, dtype, offset,
state2), so every function here also accepts a bitsandbytes QuantState.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from typing import Any, Optional

import torch

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3],
                        dtype=torch.float32) / 12
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def code_4bit(quant_type: str, device=None) -> torch.Tensor:
    if quant_type == "nf4":
        return NF4_CODE.to(device)
    if quant_type == "fp4":
        return FP4_CODE.to(device)
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def dynamic_code(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic-tree code (256 sorted values): for each decade 10⁻⁶ … 10⁰, the midpoints of
    2^i (signed) equal steps over [0.1, 1] scaled to that decade, both signs, plus 0 and 1."""
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        steps = 2**i + 1 if signed else 2 ** (i + 1) + 1
        edges = torch.linspace(0.1, 1, steps, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0) * (10 ** (i - 6))
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values / their block's absmax clamped to [-1, 1], absmax per block); the last block may be short."""
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].reshape(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def _per_element(absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    return absmax.repeat_interleave(blocksize)[:n]


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into `code` of the nearest value (ties to the lower one), for any code order."""
    order = torch.argsort(code)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, bounds, out_int32=True).long()]


# ------------------------------------------------------------------------------------------------ 8-bit blockwise
def quantize_blockwise(A: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 4096):
    """(uint8 indices into `code` shaped like A, fp32 absmax per block)."""
    code = dynamic_code().to(A.device) if code is None else code.to(A.device)
    scaled, absmax = _blockwise_scale(A.reshape(-1).float(), blocksize)
    return _nearest(scaled, code).to(torch.uint8).reshape(A.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    flat = code.to(q.device)[q.reshape(-1).long()]
    return (flat * _per_element(absmax, flat.numel(), blocksize)).reshape(q.shape).to(dtype)


# ------------------------------------------------------------------------------------------------ 4-bit
@dataclass
class NestedState:
    """The quantization of the absmaxes (double quantization): 8-bit codes' absmax per 256 blocks."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int = NESTED_BLOCKSIZE
    dtype: torch.dtype = torch.float32


@dataclass
class QuantState4bit:
    absmax: torch.Tensor  # fp32 per block, or uint8 codes when nested
    shape: torch.Size
    code: torch.Tensor
    blocksize: int
    quant_type: str
    dtype: torch.dtype
    offset: Optional[torch.Tensor] = None
    state2: Optional[NestedState] = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bitsandbytes' serialization: tensors, plus (packed) one uint8 tensor holding the rest as JSON."""
        return quant_state_dict(self, packed)

    def to(self, device) -> "QuantState4bit":
        self.absmax, self.code = self.absmax.to(device), self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax, self.state2.code = self.state2.absmax.to(device), self.state2.code.to(device)
        return self


def quantize_4bit(W: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = False,
                  quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState4bit]:
    """Pack W into (numel+1)//2 bytes (shape (bytes, 1), as bnb), two 4-bit codes a byte, element 2j high."""
    _check_blocksize(blocksize)
    code = code_4bit(quant_type, W.device)
    scaled, absmax = _blockwise_scale(W.reshape(-1).float(), blocksize)
    q = _nearest(scaled, code).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, _nearest(scaled.new_zeros(1), code).to(torch.uint8)])  # bnb pads with a 0.0
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze(1).view(quant_storage).unsqueeze(1)
    state = QuantState4bit(absmax, W.shape, code, blocksize, quant_type, W.dtype)
    if compress_statistics:
        offset = absmax.mean()
        qabsmax, absmax2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        state.absmax, state.offset = qabsmax, offset
        state.state2 = NestedState(absmax2, dynamic_code().to(W.device))
    return packed, state


def block_absmax(state) -> torch.Tensor:
    """fp32 absmax per block, undoing double quantization when present."""
    if getattr(state, "state2", None) is None:
        return state.absmax.float()
    s2 = state.state2
    return dequantize_blockwise(state.absmax, s2.absmax, s2.code, s2.blocksize, torch.float32) + state.offset


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes of a packed weight, as int64."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:n].long()


def dequantize_4bit(packed: torch.Tensor, state, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W in `dtype` (default: the dtype it was quantized from): code value · block absmax, computed in fp32."""
    n = prod(state.shape)
    expected = (n + 1) // 2
    if packed.numel() * packed.element_size() != expected:
        raise ValueError(f"packed weight holds {packed.numel() * packed.element_size()} bytes; shape "
                         f"{tuple(state.shape)} needs {expected}")
    values = state.code.to(packed.device)[unpack_4bit(packed, n)]
    out = values * _per_element(block_absmax(state).to(packed.device), n, state.blocksize)
    return out.reshape(state.shape).to(dtype or state.dtype)


# ------------------------------------------------------------------------------------------------ serialization
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quant_state_dict(state, packed: bool = True) -> dict[str, Any]:
    """The entries a 4-bit weight adds to a state dict under `<prefix>.weight.`, in bitsandbytes' format."""
    items: dict[str, Any] = {
        "quant_type": state.quant_type,
        "absmax": state.absmax,
        "blocksize": state.blocksize,
        "quant_map": state.code,
        "dtype": _dtype_name(state.dtype),
        "shape": tuple(state.shape),
    }
    if state.state2 is not None:
        items.update(nested_absmax=state.state2.absmax, nested_blocksize=state.state2.blocksize,
                     nested_quant_map=state.state2.code.clone(), nested_dtype=_dtype_name(state.state2.dtype),
                     nested_offset=float(state.offset))
    if not packed:
        return items
    out = {k: v for k, v in items.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in items.items() if not isinstance(v, torch.Tensor)}
    out[QUANT_STATE_PREFIX + state.quant_type] = torch.tensor(list(json.dumps(rest).encode("utf-8")),
                                                              dtype=torch.uint8)
    return out


def quant_state_from_dict(entries: dict[str, torch.Tensor], device=None) -> QuantState4bit:
    """Parse the state-dict entries of a 4-bit weight (packed JSON form or unpacked), checking everything."""
    keys = [k for k in entries if k.startswith(QUANT_STATE_PREFIX)]
    if len(keys) != 1 or keys[0][len(QUANT_STATE_PREFIX):] not in ("nf4", "fp4"):
        raise ValueError(f"expected exactly one '{QUANT_STATE_PREFIX}nf4|fp4' entry, found {keys or 'none'}")
    try:
        meta = json.loads(bytes(entries[keys[0]].to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt quant_state JSON in {keys[0]}: {exc}") from None
    for key in ("quant_type", "blocksize", "dtype", "shape"):
        if key not in meta:
            raise ValueError(f"quant_state JSON lacks '{key}'")
    for key in ("absmax", "quant_map"):
        if key not in entries:
            raise ValueError(f"4-bit weight entries lack '{key}'")
    _check_blocksize(int(meta["blocksize"]))
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"quant_state dtype {meta['dtype']!r} is not a torch dtype")
    state = QuantState4bit(entries["absmax"].to(device), torch.Size(meta["shape"]), entries["quant_map"].to(device),
                           int(meta["blocksize"]), meta["quant_type"], dtype)
    if "nested_absmax" in entries:
        for key in ("nested_blocksize", "nested_offset", "nested_dtype"):
            if key not in meta:
                raise ValueError(f"quant_state JSON of a double-quantized weight lacks '{key}'")
        state.offset = torch.tensor(float(meta["nested_offset"]), device=device)
        state.state2 = NestedState(entries["nested_absmax"].to(device), entries["nested_quant_map"].to(device),
                                   int(meta["nested_blocksize"]), getattr(torch, meta["nested_dtype"]))
    blocks = -(-prod(state.shape) // state.blocksize)
    if state.absmax.numel() != blocks:
        raise ValueError(f"absmax has {state.absmax.numel()} entries; shape {tuple(state.shape)} with blocksize "
                         f"{state.blocksize} needs {blocks}")
    return state


__all__ = [
    "NF4_CODE", "FP4_CODE", "QuantState4bit", "NestedState", "quantize_4bit", "dequantize_4bit", "block_absmax",
    "quantize_blockwise", "dequantize_blockwise", "dynamic_code", "quant_state_dict", "quant_state_from_dict",
    "unpack_4bit",
]
