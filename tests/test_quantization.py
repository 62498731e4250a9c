"""NF4 / FP4 quantization against bitsandbytes 0.50 on the CPU: same bytes, same state dicts, both ways.

Two bitsandbytes CPU kernels are not its reference semantics, and the tests say where: the C++ blockwise 8-bit
quantizer (used for double quantization) rounds a few values to a neighbouring code (an approximate search; its
torch and CUDA kernels round to nearest, as peft_fast does), and the C++ 4-bit dequantizer uses the wrong absmax
for blocksize ≥ 256 (bnb's own quantize → dequantize error jumps from 0.10 to 0.15 there).
"""

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")  # a test-only dependency: CI installs it, the GPU machine carries a wheel
import bitsandbytes.functional as BF  # noqa: E402

from peft_fast import quantization as Q

SHAPES = [(37, 29), (64, 128), (5, 7), (300, 257)]


def _weight(shape, dtype, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.3
    w.view(-1)[:3] = 0.0  # exact zeros, the tie-prone value
    return w.to(dtype)


def test_dynamic_code_is_bitsandbytes_code():
    assert torch.equal(Q.dynamic_code(signed=True), BF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_4bit_same_bytes_as_bitsandbytes(quant_type, blocksize, shape, dtype):
    w = _weight(shape, dtype)
    packed_ref, state_ref = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    packed, state = Q.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    assert packed.dtype == torch.uint8 and packed.shape == packed_ref.shape
    assert torch.equal(packed, packed_ref)
    assert torch.equal(state.absmax, state_ref.absmax)
    assert torch.equal(state.code, state_ref.code)
    out = Q.dequantize_4bit(packed_ref, state_ref)
    assert out.dtype == dtype and out.shape == w.shape
    # the definition: code value of each nibble times its block's absmax, in fp32
    n = w.numel()
    expected = (state.code[Q.unpack_4bit(packed, n)] * state.absmax.repeat_interleave(blocksize)[:n]).reshape(shape)
    assert torch.equal(out, expected.to(dtype))
    if blocksize < 256:  # bnb's C++ CPU dequantizer is right only below 256 (module docstring)
        assert torch.equal(out, BF.dequantize_4bit(packed_ref, state_ref))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(37, 29), (300, 257), (1000, 300)])
def test_double_quantization_matches_bitsandbytes(quant_type, blocksize, shape):
    w = _weight(shape, torch.bfloat16, seed=1)
    packed_ref, state_ref = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    packed, state = Q.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed, packed_ref)
    assert torch.equal(state.offset, state_ref.offset)
    assert torch.equal(state.state2.absmax, state_ref.state2.absmax)
    assert torch.equal(state.state2.code, state_ref.state2.code)
    steps = (state.absmax.int() - state_ref.absmax.int()).abs()
    assert (steps == 0).float().mean() > 0.98 and steps.max() <= 2  # bnb CPU's approximate 8-bit search
    # nearest rounding: our absmaxes are never further from the true ones than bnb CPU's
    true = Q.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)[1].absmax
    ours, theirs = Q.block_absmax(state), Q.block_absmax(state_ref)
    assert ((ours - true).abs() <= (theirs - true).abs() + 1e-7).all()
    assert ((ours - theirs).abs() / theirs).max() < 0.03
    # and bnb's state dequantizes identically through both libraries
    assert torch.equal(Q.dequantize_4bit(packed_ref, state_ref), BF.dequantize_4bit(packed_ref, state_ref))


@pytest.mark.parametrize("nested", [False, True])
def test_state_dicts_load_both_ways(nested):
    w = _weight((48, 40), torch.float16, seed=2)
    packed, state = Q.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    ours = state.as_dict(packed=True)
    packed_ref, state_ref = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    theirs = state_ref.as_dict(packed=True)
    assert sorted(ours) == sorted(theirs)
    key = "quant_state.bitsandbytes__nf4"
    assert json.loads(bytes(ours[key].tolist())).keys() == json.loads(bytes(theirs[key].tolist())).keys()
    if not nested:  # same numbers → the same bytes
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # bitsandbytes reads ours …
    param = bnb.nn.Params4bit.from_prequantized(packed, ours, requires_grad=False, device="cpu")
    assert torch.equal(BF.dequantize_4bit(param.data, param.quant_state), Q.dequantize_4bit(packed, state))
    # … and we read theirs
    parsed = Q.quant_state_from_dict(theirs)
    assert torch.equal(Q.dequantize_4bit(packed_ref, parsed), BF.dequantize_4bit(packed_ref, state_ref))


def test_bad_input_is_refused_clearly():
    w = _weight((16, 8), torch.float32)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        Q.quantize_4bit(w, blocksize=100)
    with pytest.raises(ValueError, match="quant_type"):
        Q.quantize_4bit(w, quant_type="int4")
    packed, state = Q.quantize_4bit(w, blocksize=64)
    with pytest.raises(ValueError, match="needs 64"):
        Q.dequantize_4bit(packed[:10], state)
    entries = state.as_dict(packed=True)
    corrupt = dict(entries)
    corrupt["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="corrupt quant_state JSON"):
        Q.quant_state_from_dict(corrupt)
    meta = json.loads(bytes(entries["quant_state.bitsandbytes__nf4"].tolist()))
    meta["blocksize"] = 48
    wrong = dict(entries, **{"quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(meta).encode()),
                                                                         dtype=torch.uint8)})
    with pytest.raises(ValueError, match="blocksize"):
        Q.quant_state_from_dict(wrong)
    meta["blocksize"], meta["shape"] = 64, [64, 64]
    wrong = dict(entries, **{"quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(meta).encode()),
                                                                         dtype=torch.uint8)})
    with pytest.raises(ValueError, match="absmax has 2 entries"):
        Q.quant_state_from_dict(wrong)
    with pytest.raises(ValueError, match="exactly one"):
        Q.quant_state_from_dict({k: v for k, v in entries.items() if "quant_state" not in k})
