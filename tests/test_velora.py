"""VeLoRA (velora_config) against HF PEFT: the same projection vectors, the same approximated gradients (A's from
the rank-1 reconstruction, x's and B's exact), the same files both ways; plain LoRA outside training."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import randomize_adapters, rel_err, tiny_llama

CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _pair(**velora):
    torch.manual_seed(0)
    base = tiny_llama()
    models = []
    for lib in (ref, pf):
        torch.manual_seed(1)
        config = lib.LoraConfig(**CFG, velora_config=lib.tuners.lora.VeloraConfig(**velora))
        models.append(lib.get_peft_model(copy.deepcopy(base), config))
    randomize_adapters(models[0])
    models[1].load_state_dict(models[0].state_dict())
    return base, models


def _step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("velora", [dict(num_groups=4, init_type="batch_average"),
                                    dict(num_groups=5, scale=0.5, init_type="batch_average_once"),
                                    dict(num_groups=8, init_type="random")])
def test_velora_matches_peft(tmp_path, velora):
    base, (theirs, ours) = _pair(**velora)
    embeds = {k: v for k, v in ours.state_dict().items() if "lora_velora_embed" in k}
    assert embeds and all(torch.equal(v, theirs.state_dict()[k]) for k, v in embeds.items())
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    for step in range(2):  # (batch_average_once keeps its first vector on the second step)
        ids = ids.roll(step, dims=1)
        (loss, grads), (want_loss, want) = _step(ours, ids), _step(theirs, ids)
        assert torch.allclose(loss, want_loss, atol=1e-6)
        assert sorted(grads) == sorted(want) and any("lora_A" in n for n in grads)
        for name, grad in grads.items():
            assert rel_err(grad, want[name]) < 1e-5, (step, name)
        for key, value in ours.state_dict().items():
            if "lora_velora_embed" in key:
                assert torch.allclose(value, theirs.state_dict()[key], atol=1e-7), key
    # A's gradient is the approximation: plain LoRA's differs
    plain = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(**CFG))
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if "velora" not in k}, strict=False)
    _, exact = _step(plain, ids)
    name = next(n for n in grads if "lora_A" in n)
    assert rel_err(grads[name], exact[name]) > 1e-3
    b_name = next(n for n in grads if "lora_B" in n)
    assert rel_err(grads[b_name], exact[b_name]) < 1e-5  # (B's gradient is exact)
    # outside training, plain LoRA; files both ways
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        want_logits = theirs(input_ids=ids).logits
        assert rel_err(ours(input_ids=ids).logits, want_logits) < 1e-6
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    for source, lib in ((tmp_path / "theirs", pf), (tmp_path / "ours", ref)):
        loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), str(source))
        with torch.no_grad():
            assert rel_err(loaded(input_ids=ids).logits, want_logits) < 1e-6
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ours.state_dict().items() if "velora" in k)


def test_velora_refusals():
    with pytest.raises(ValueError, match="`num_groups` should be positive"):
        pf.VeloraConfig(num_groups=0)
    with pytest.raises(ValueError, match="Unsupported `init_type`"):
        pf.VeloraConfig(init_type="mean")
    with pytest.raises(ValueError, match="Embedding does not support VeLoRA"):
        pf.get_peft_model(tiny_llama(), pf.LoraConfig(target_modules=["embed_tokens"],
                                                      velora_config=pf.VeloraConfig()))
    with pytest.raises(ValueError, match="VeLoRA cannot be combined"):
        pf.get_peft_model(tiny_llama(), pf.LoraConfig(target_modules=["q_proj"], use_dora=True,
                                                      velora_config=pf.VeloraConfig()))
