"""The ops layer: dispatch rules and the torch reference against the LoRA formula of DESIGN.md §2."""

import pytest
import torch
from torch import nn

from peft_fast import ops
from peft_fast.ops import dispatch
from models import rel_err


def _term(k, n, r, p=0.0, scaling=0.5, bias=False):
    a, b = nn.Linear(k, r, bias=False), nn.Linear(r, n, bias=bias)
    nn.init.normal_(b.weight)
    return ops.LoraTerm(a, b, scaling, nn.Dropout(p) if p else nn.Identity())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_matches_formula_with_several_terms(dtype):
    x = torch.randn(5, 3, 13, dtype=dtype)
    base = torch.randn(5, 3, 11, dtype=dtype)
    terms = [_term(13, 11, 4, bias=True), _term(13, 11, 1, scaling=2.0)]
    out = ops.lora_linear(x, base, terms)
    assert out.dtype == dtype
    xf = x.float()
    expected = base.float()
    for t in terms:
        bias = t.lora_B.bias if t.lora_B.bias is not None else 0
        expected = expected + t.scaling * (xf @ t.lora_A.weight.T @ t.lora_B.weight.T + bias)
    assert rel_err(out.float(), expected) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_dropout_in_training_uses_one_mask_and_rescales():
    torch.manual_seed(0)
    x = torch.randn(4000, 8)
    term = _term(8, 8, 8, p=0.25, scaling=1.0)
    with torch.no_grad():
        term.lora_A.weight.copy_(torch.eye(8))
        term.lora_B.weight.copy_(torch.eye(8))
    delta = ops.lora_linear(x, torch.zeros(4000, 8), [term])
    kept = delta != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    assert torch.allclose(delta[kept], x[kept] / 0.75)
    term.dropout.eval()
    assert torch.equal(ops.lora_linear(x, torch.zeros(4000, 8), [term]), x)


def test_mixed_batch_rows_get_their_own_adapter():
    x, base = torch.randn(4, 6), torch.randn(4, 5)
    t1, t2 = _term(6, 5, 2), _term(6, 5, 3)
    out = ops.lora_linear_mixed_batch(x, base.clone(), [([0, 2], t1), ([3], t2)])
    assert torch.allclose(out[0], ops.lora_linear(x[:1], base[:1], [t1])[0])
    assert torch.allclose(out[3], ops.lora_linear(x[3:], base[3:], [t2])[0])
    assert torch.equal(out[1], base[1])


def test_dispatch_env_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.choose("lora_linear", None, None, []) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # an op without a triton implementation stays on torch
    assert dispatch.choose("lora_embedding", None, None, [], None) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="PEFT_FAST_BACKEND"):
        dispatch.choose("lora_linear", None, None, [])


def test_dispatch_falls_back_with_one_warning(monkeypatch):
    calls = []
    dispatch.register("_probe_op", "torch")(lambda v: calls.append("torch") or "torch")
    dispatch.register("_probe_op", "triton", supports=lambda v: None if v > 0 else "needs v > 0")(
        lambda v: calls.append("triton") or "triton"
    )
    try:
        assert dispatch.call("_probe_op", 1) == "triton"
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")
        with pytest.warns(UserWarning, match="needs v > 0"):
            assert dispatch.call("_probe_op", 0) == "torch"
        monkeypatch.setenv(dispatch.ENV_VAR, "torch")
        assert dispatch.call("_probe_op", 1) == "torch"
    finally:
        dispatch._REGISTRY.pop("_probe_op")
