"""Arrow routing (create_arrow_model, ArrowConfig) and GenKnowSub against HF PEFT: the same adapters, the same
routed outputs, the same task adapters after GenKnowSub, the same refresh after an adapter is added; and what
cannot be done with a router (merge, mixed batches, non-linear targets) refused."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import randomize_adapters, rel_err, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _save_adapters(tmp_path, count, prefix, seed):
    """`count` LoRA adapters of tiny_llama with random A and B, saved by peft_fast; their folders."""
    paths = []
    for i in range(count):
        torch.manual_seed(seed + i)
        model = pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        randomize_adapters(model, seed=seed + i)
        path = tmp_path / f"{prefix}{i}"
        model.save_pretrained(str(path))
        paths.append(str(path))
    return paths


def _both(tmp_path, use_gks, top_k=2, temperature=0.7):
    tasks = _save_adapters(tmp_path, 3, "task", seed=10)
    general = _save_adapters(tmp_path, 2, "general", seed=20) if use_gks else None
    torch.manual_seed(0)
    base = tiny_llama()
    models = []
    for lib in (ref, pf):
        config = lib.ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=use_gks, rng_seed=7)
        models.append(lib.create_arrow_model(copy.deepcopy(base), tasks, config, general_adapter_paths=general))
    return models


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("use_gks", [False, True])
def test_arrow_routing_matches_peft(tmp_path, use_gks):
    theirs, ours = _both(tmp_path, use_gks)
    assert ours.active_adapter == theirs.active_adapter == "arrow_router"
    assert sorted(ours.peft_config) == sorted(theirs.peft_config)
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    want, got = _logits(theirs.eval(), ids), _logits(ours.eval(), ids)
    assert rel_err(got, want) < 1e-5
    with ours.disable_adapter():
        assert rel_err(_logits(ours, ids), got) > 1e-3  # (the routed term is a real share of the output)
    for name in ("task_0", "task_1", "task_2"):  # after GenKnowSub (in place, at the first forward) or untouched
        for key, value in ours.state_dict().items():
            if f".{name}." in key:
                assert torch.allclose(value, theirs.state_dict()[key], atol=1e-7), key
    experts = ours.base_model.model.model.layers[0].self_attn.q_proj.lora_A
    assert not torch.equal(experts["task_0"].weight, experts["task_1"].weight)  # (distinct experts to route over)
    # another task adapter added later joins the routing (and gets GenKnowSub) in both
    extra = _save_adapters(tmp_path, 1, "extra", seed=30)[0]
    ours.load_adapter(extra, adapter_name="new_task")
    theirs.load_adapter(extra, adapter_name="new_task")
    ours.set_adapter("arrow_router")
    theirs.set_adapter("arrow_router")
    assert rel_err(_logits(ours, ids), _logits(theirs, ids)) < 1e-5
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_arrow["arrow_router"].task_adapter_names == ["task_0", "task_1", "task_2", "new_task"]
    # deleting a task adapter takes it out of the routing
    ours.delete_adapter("task_1")
    assert layer.lora_arrow["arrow_router"].task_adapter_names == ["task_0", "task_2", "new_task"]
    assert torch.isfinite(_logits(ours, ids)).all()


def test_arrow_router_refusals(tmp_path):
    _, ours = _both(tmp_path, use_gks=False, top_k=3)
    ids = torch.tensor([[1, 2, 3]])
    before = _logits(ours.eval(), ids)
    with pytest.raises(RuntimeError, match="Cannot merge an active Arrow router"):
        ours.merge_adapter()
    with pytest.raises(ValueError, match="Arrow router"):
        ours(input_ids=ids, adapter_names=["arrow_router"])
    assert torch.equal(_logits(ours, ids), before)
    ours.delete_adapter("task_2")  # three experts left two: top_k 3 cannot be met
    with pytest.raises(ValueError, match="top_k \\(3\\) is larger than the number of task adapters \\(2\\)"):
        _logits(ours, ids)
    with pytest.raises(ValueError, match="top_k cannot be negative"):
        pf.ArrowConfig(top_k=0)
    with pytest.raises(ValueError, match="router_temperature must be greater than 0"):
        pf.ArrowConfig(router_temperature=0)
    with pytest.raises(ValueError, match="at least one adapter path"):
        pf.create_arrow_model(tiny_llama(), [], pf.ArrowConfig())
    with pytest.raises(ValueError, match="general LoRA paths"):
        pf.create_arrow_model(tiny_llama(), ["x"], pf.ArrowConfig(use_gks=True))
    with pytest.raises(ValueError, match="Arrow routes linear layers only"):
        pf.get_peft_model(tiny_llama(), pf.LoraConfig(target_modules=["embed_tokens"], arrow_config=pf.ArrowConfig()))


def test_arrow_adapters_must_agree(tmp_path):
    tasks = _save_adapters(tmp_path, 2, "task", seed=40)
    torch.manual_seed(3)
    other = pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=2, target_modules=TARGETS))
    other.save_pretrained(str(tmp_path / "rank2"))
    with pytest.raises(ValueError, match="rank mismatch: 2 != 4"):
        pf.create_arrow_model(tiny_llama(), tasks + [str(tmp_path / "rank2")], pf.ArrowConfig(top_k=1))
