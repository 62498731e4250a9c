"""PEFT API behaviour of peft_fast on its own: adapters, merging, unloading, mixed batches, training, errors."""

import copy
import os

import pytest
import torch
from torch import nn

import peft_fast as pf
from models import MLP, EmbConv, inputs_for, output_tensor, randomize_adapters, rel_err, tiny_bert, tiny_llama, tiny_t5
from peft_fast.tuners.lora import Linear as LoraLinear
from peft_fast.tuners.tuners_utils import BaseTunerLayer


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_model(model, state, structure, grads):
    assert [type(m).__name__ for m in model.modules()] == structure
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert [p.requires_grad for p in model.parameters()] == grads


def _snapshot(model):
    return _state(model), [type(m).__name__ for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_public_names_and_module_paths():
    import peft_fast.tuners.lora.layer as layer_mod
    import peft_fast.utils.other as other_mod
    from peft_fast.tuners.tuners_utils import BaseTuner

    import peft_fast.kernels

    assert isinstance(pf.__version__, str)
    assert callable(peft_fast.kernels.available)
    for name in ("PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
                 "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
                 "get_peft_model", "get_peft_config", "inject_adapter_in_model", "get_peft_model_state_dict",
                 "set_peft_model_state_dict", "prepare_model_for_kbit_training", "cast_mixed_precision_params",
                 "LoraConfig", "PeftConfig", "PeftType", "TaskType", "LoraModel", "LoftQConfig",
                 "replace_lora_weights_loftq", "convert_to_lora", "save_as_lora", "EvaConfig", "get_eva_state_dict",
                 "initialize_lora_eva_weights", "LoraGAConfig", "preprocess_loraga", "LoraRuntimeConfig",
                 "shift_tokens_right", "PEFT_TYPE_TO_MIXED_MODEL_MAPPING", "initialize_kv_prefix_from_text",
                 "initialize_kv_prefix_from_past_key_values", "prompt_embeddings_from_past_key_values", "ArrowConfig",
                 "create_arrow_model", "KasaConfig", "VeloraConfig",
                 "BdLoraConfig"):
        assert hasattr(pf, name), name
    assert pf.PEFT_TYPE_TO_MIXED_MODEL_MAPPING == {pf.PeftType.LORA: pf.LoraModel, pf.PeftType.LOHA: pf.LoHaModel,
                                                   pf.PeftType.LOKR: pf.LoKrModel}
    assert pf.shift_tokens_right is pf.utils.shift_tokens_right
    assert pf.tuners.lora.convert_to_lora is pf.convert_to_lora is pf.tuners.convert_to_lora
    assert pf.tuners.lora.eva.initialize_lora_eva_weights is pf.initialize_lora_eva_weights
    assert pf.tuners.lora.config.EvaConfig is pf.EvaConfig is pf.tuners.EvaConfig
    assert pf.tuners.lora.loraga.preprocess_loraga is pf.preprocess_loraga is pf.tuners.preprocess_loraga
    assert pf.utils.replace_lora_weights_loftq is pf.replace_lora_weights_loftq
    assert issubclass(pf.LoraModel, BaseTuner)
    assert issubclass(layer_mod.LoraLayer, BaseTunerLayer)
    assert other_mod.ModulesToSaveWrapper is pf.utils.ModulesToSaveWrapper
    for method in ("inject_adapter", "merge_adapter", "unmerge_adapter", "_prepare_adapter_config",
                   "_create_and_replace", "_check_target_module_exists", "delete_adapter", "set_adapter",
                   "merge_and_unload", "unload", "enable_adapter_layers", "disable_adapter_layers",
                   "supports_lora_conversion"):
        assert callable(getattr(BaseTuner, method)), method
    for method in ("get_base_layer", "set_adapter", "enable_adapters", "delete_adapter", "merge", "unmerge",
                   "supports_lora_conversion"):
        assert callable(getattr(BaseTunerLayer, method)), method


def test_peft_s_exception_warning_and_utility_names():
    from peft_fast.utils.error import NoMatchingPeftModuleError, PeftError
    from peft_fast.utils.warning import PeftWarning

    assert pf.PeftError is PeftError and pf.PeftWarning is PeftWarning
    assert issubclass(NoMatchingPeftModuleError, PeftError) and issubclass(NoMatchingPeftModuleError, ValueError)
    assert issubclass(PeftWarning, UserWarning)
    with pytest.raises(PeftError, match="not found in the base model"):  # `except PeftError` catches it, as in PEFT
        pf.get_peft_model(tiny_llama(), pf.LoraConfig(target_modules=["does_not_exist"]))
    assert pf.utils.TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING["llama"] == \
        pf.utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"]
    labels = torch.tensor([[5, 6, -100, 7], [1, -100, 2, 3]])
    assert pf.utils.shift_tokens_right(labels, 0, 9).tolist() == [[9, 5, 6, 0], [9, 1, 0, 2]]
    with pytest.raises(ValueError, match="pad_token_id"):
        pf.utils.shift_tokens_right(labels, None, 9)
    t = torch.randn(4)
    assert pf.utils.id_tensor_storage(t[1:]) == pf.utils.id_tensor_storage(t)
    assert pf.utils.id_tensor_storage(t.clone()) != pf.utils.id_tensor_storage(t)


def test_task_subclasses_chosen_by_task_type():
    expected = {
        "CAUSAL_LM": (tiny_llama, pf.PeftModelForCausalLM),
        "SEQ_CLS": (lambda: tiny_bert("seq_cls"), pf.PeftModelForSequenceClassification),
        "TOKEN_CLS": (lambda: tiny_bert("token_cls"), pf.PeftModelForTokenClassification),
        "QUESTION_ANS": (lambda: tiny_bert("qa"), pf.PeftModelForQuestionAnswering),
        "FEATURE_EXTRACTION": (lambda: tiny_bert("feature"), pf.PeftModelForFeatureExtraction),
        "SEQ_2_SEQ_LM": (tiny_t5, pf.PeftModelForSeq2SeqLM),
    }
    for task, (builder, cls) in expected.items():
        model = pf.get_peft_model(builder(), pf.LoraConfig(task_type=task))
        assert type(model) is cls, task
        name = "t5" if task == "SEQ_2_SEQ_LM" else "bert"
        out = model(**inputs_for(name))
        assert torch.isfinite(output_tensor(out)).all()
    head = pf.get_peft_model(tiny_bert("qa"), pf.LoraConfig(task_type="QUESTION_ANS"))
    assert any("qa_outputs.modules_to_save.default" in n for n, p in head.named_parameters() if p.requires_grad)


def test_default_targets_all_linear_and_regex():
    model = pf.get_peft_model(tiny_llama(), pf.LoraConfig())
    assert sorted({k.split(".")[-1] for k in model.targeted_module_names}) == ["q_proj", "v_proj"]
    model = pf.get_peft_model(tiny_llama(), pf.LoraConfig(target_modules="all-linear"))
    names = {k.split(".")[-1] for k in model.targeted_module_names}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model = pf.get_peft_model(tiny_llama(), pf.LoraConfig(target_modules=r".*layers\.1\.self_attn\.k_proj"))
    assert model.targeted_module_names == ["model.layers.1.self_attn.k_proj"]
    with pytest.raises(ValueError, match="target_modules"):
        pf.get_peft_model(MLP(), pf.LoraConfig())


def test_merge_and_unload_unload_and_safe_merge():
    torch.manual_seed(0)
    base = MLP()
    x = inputs_for("mlp")["x"]
    model = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(r=4, target_modules=["lin0", "lin1"], lora_dropout=0.1))
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        y = model(x)
        merged = copy.deepcopy(model).merge_and_unload(progressbar=True, safe_merge=True)
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        assert rel_err(merged(x), y) < 1e-6
        unloaded = copy.deepcopy(model).unload()
        assert rel_err(unloaded(x), base(x)) < 1e-7
        # a broken adapter: safe_merge refuses and leaves the weight as it was
        layer = model.base_model.model.lin0
        w = layer.get_base_layer().weight.clone()
        layer.lora_B["default"].weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaNs detected"):
            layer.merge(safe_merge=True)
        assert torch.equal(layer.get_base_layer().weight, w) and not layer.merged


def test_merge_unmerge_roundtrip_dora_and_lora_bias():
    torch.manual_seed(0)
    for cfg in (dict(use_dora=True), dict(lora_bias=True)):
        model = pf.get_peft_model(MLP(), pf.LoraConfig(r=4, target_modules=["lin0"], **cfg))
        randomize_adapters(model)
        model.eval()
        x = inputs_for("mlp")["x"]
        with torch.no_grad():
            y = model(x)
            w = model.base_model.model.lin0.get_base_layer().weight.clone()
            model.base_model.merge_adapter()
            assert rel_err(model(x), y) < 1e-5
            model.base_model.unmerge_adapter()
            assert rel_err(model.base_model.model.lin0.get_base_layer().weight, w) < 1e-6
            assert rel_err(model(x), y) < 1e-6


def test_delete_and_switch_adapters():
    model = pf.get_peft_model(MLP(), pf.LoraConfig(r=4, target_modules=["lin0"]))
    model.add_adapter("b", pf.LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    model.set_adapter("b")
    assert model.active_adapter == "b" and model.active_adapters == ["b"]
    assert all("b" in n.split(".") for n, p in model.named_parameters() if p.requires_grad)
    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"]
    assert model.active_adapters == ["default"]
    assert not any(".b." in n for n in model.state_dict())
    assert isinstance(model.base_model.model.lin1, LoraLinear) and not model.base_model.model.lin1.lora_A


def test_inject_adapter_in_model_and_state_dict_helpers():
    torch.manual_seed(0)
    model = MLP()
    cfg = pf.LoraConfig(r=4, target_modules=["lin0"])
    injected = pf.inject_adapter_in_model(cfg, model)
    assert injected is model and isinstance(model.lin0, LoraLinear)
    randomize_adapters(model)
    sd = pf.get_peft_model_state_dict(model)
    assert sorted(sd) == ["lin0.lora_A.weight", "lin0.lora_B.weight"]
    other = pf.inject_adapter_in_model(pf.LoraConfig(r=4, target_modules=["lin0"]), MLP())
    pf.set_peft_model_state_dict(other, sd)
    # both factors arrive (a set_peft_model_state_dict that dropped lora_A passed when only lora_B was compared)
    for key in ("lora_A", "lora_B"):
        assert torch.equal(getattr(other.lin0, key)["default"].weight, getattr(model.lin0, key)["default"].weight)


def test_prepare_model_for_kbit_training_enables_checkpointing():
    model = tiny_llama().to(torch.bfloat16)
    model.is_loaded_in_4bit = True
    pf.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


def test_trainer_few_steps_loss_down_and_reload(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    base = tiny_llama()
    model = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                 task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 64, (16,), generator=g)} for _ in range(8)]
    for row in data:
        row["labels"] = row["input_ids"].clone()
        row["attention_mask"] = torch.ones_like(row["input_ids"])
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=6, learning_rate=5e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05, (before, after)
    model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = pf.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
    trainer2 = Trainer(model=reloaded, args=args, eval_dataset=data)
    assert abs(trainer2.evaluate()["eval_loss"] - after) < 1e-5


def test_mixed_batch_errors():
    model = pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=4, target_modules=["q_proj"]))
    x = inputs_for("llama")
    with pytest.raises(ValueError, match="training mode"):
        model.train()(**x, adapter_names=["default"] * 3)
    model.eval()
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(**x, adapter_names=["default", "nope", "default"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(**x, adapter_names=["default"])


# ---------------------------------------------------------------- bad input leaves the model unchanged


def test_no_matching_target_leaves_model_unchanged():
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="not found in the base model"):
        pf.get_peft_model(model, pf.LoraConfig(target_modules=["does_not_exist"]))
    _same_model(model, *before)
    assert "peft_config" not in model.__dict__


def test_unsupported_layer_midway_rolls_back():
    model = EmbConv()
    model.bad = nn.LayerNorm(4)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="is not supported"):
        pf.get_peft_model(model, pf.LoraConfig(target_modules=["emb", "conv1d", "bad"]))
    _same_model(model, *before)


def test_unknown_and_duplicate_adapter_names():
    model = pf.get_peft_model(MLP(), pf.LoraConfig(r=4, target_modules=["lin0"]))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", pf.LoraConfig(target_modules=["lin1"]))
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("nope")
    with pytest.raises(ValueError, match="not found in the base model"):
        model.add_adapter("new", pf.LoraConfig(target_modules=["nothing"]))
    assert list(model.peft_config) == ["default"]
    _same_model(model, *before)


def test_adding_to_existing_layers_rolls_back_on_error():
    model = pf.get_peft_model(MLP(), pf.LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    before = _snapshot(model)
    # lin0 gets the adapter first, then the rank-0 pattern on lin1 fails: lin0 must lose it again
    with pytest.raises(ValueError, match="positive integer"):
        model.add_adapter("b", pf.LoraConfig(r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 0}))
    _same_model(model, *before)
    assert list(model.peft_config) == ["default"]


def _saved_adapter(tmp_path, **cfg):
    torch.manual_seed(0)
    model = pf.get_peft_model(MLP(), pf.LoraConfig(**cfg))
    randomize_adapters(model)
    model.save_pretrained(str(tmp_path))
    return model


def test_wrong_shapes_in_loaded_adapter(tmp_path):
    _saved_adapter(tmp_path, r=4, target_modules=["lin0"])
    # the file says r=4 but holds rank-5 tensors
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "adapter_model.safetensors")
    sd = load_file(path)
    sd = {k: torch.randn(5, v.shape[1]) if "lora_A" in k else torch.randn(v.shape[0], 5) for k, v in sd.items()}
    save_file(sd, path)
    model = MLP()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"2 tensors have the wrong shape: .*lin0\.lora_A\.default\.weight "
                                         r"\(\(5, 10\) in the checkpoint, \(4, 10\) in the model\)") as raised:
        pf.PeftModel.from_pretrained(model, str(tmp_path))
    assert len(str(raised.value).splitlines()) == 1
    _same_model(model, *before)
    assert "peft_config" not in model.__dict__
    # into an existing PeftModel as a new adapter: the adapter is removed again
    peft_model = pf.get_peft_model(MLP(), pf.LoraConfig(r=2, target_modules=["lin1"]))
    before = _snapshot(peft_model)
    with pytest.raises(ValueError, match="wrong shape"):
        peft_model.load_adapter(str(tmp_path), adapter_name="other")
    _same_model(peft_model, *before)
    assert list(peft_model.peft_config) == ["default"]


def test_a_long_list_of_wrong_shapes_is_summarised_in_one_line(tmp_path):
    """An adapter of another rank for every projection of a model: one line naming three tensors and the count."""
    from safetensors.torch import load_file, save_file

    model = pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    sd = {k: torch.randn(v.shape[0] + 1, v.shape[1]) for k, v in load_file(path).items()}
    save_file(sd, path)
    with pytest.raises(ValueError) as raised:
        model.load_adapter(str(tmp_path), adapter_name="other")
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and f"{len(sd)} tensors have the wrong shape" in message
    assert f"and {len(sd) - 3} more" in message and list(model.peft_config) == ["default"]


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_integer_adapter_weights_are_refused_not_cast(tmp_path, low_cpu_mem_usage):
    """torch would cast int64 'weights' silently into the float adapter; the load refuses, the model unchanged."""
    from safetensors.torch import load_file, save_file

    _saved_adapter(tmp_path, r=4, target_modules=["lin0"])
    path = str(tmp_path / "adapter_model.safetensors")
    save_file({k: v.round().to(torch.int64) for k, v in load_file(path).items()}, path)
    peft_model = pf.get_peft_model(MLP(), pf.LoraConfig(r=2, target_modules=["lin1"]))
    before = _snapshot(peft_model)
    with pytest.raises(ValueError, match=r"2 tensors have the wrong dtype: .*\(torch.int64 in the checkpoint, "
                                         r"torch.float32 in the model\).*must be floating point"):
        peft_model.load_adapter(str(tmp_path), adapter_name="other", low_cpu_mem_usage=low_cpu_mem_usage)
    _same_model(peft_model, *before)
    assert list(peft_model.peft_config) == ["default"]


def test_corrupt_safetensors_file(tmp_path):
    _saved_adapter(tmp_path, r=4, target_modules=["lin0"])
    with open(tmp_path / "adapter_model.safetensors", "wb") as f:
        f.write(b"\x00\x01garbage")
    model = MLP()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="Could not read the adapter weights"):
        pf.PeftModel.from_pretrained(model, str(tmp_path))
    _same_model(model, *before)


def test_config_of_another_peft_type(tmp_path):
    _saved_adapter(tmp_path, r=4, target_modules=["lin0"])
    import json

    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["peft_type"] = "PREFIX_TUNING"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        pf.LoraConfig.from_pretrained(str(tmp_path))
    peft_model = pf.get_peft_model(MLP(), pf.LoraConfig(r=2, target_modules=["lin1"]))
    before = _snapshot(peft_model)
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        peft_model.load_adapter(str(tmp_path), adapter_name="other")
    _same_model(peft_model, *before)
    data["peft_type"] = "NOT_A_METHOD"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Unknown peft_type"):
        pf.PeftConfig.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        pf.PeftConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="Can't find"):
        pf.PeftConfig.from_pretrained(str(tmp_path / "missing_dir_that_is_local") if os.path.isdir(tmp_path) else "")


def test_config_validation():
    with pytest.raises(ValueError, match="positive integer"):
        pf.LoraConfig(r=0)
    with pytest.raises(ValueError, match="layers_to_transform"):
        pf.LoraConfig(target_modules=".*q", layers_to_transform=[0])
    with pytest.raises(ValueError, match="DoRA"):
        pf.LoraConfig(use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        pf.LoraConfig(init_lora_weights="kasa")  # (not an init of PEFT's either)
    with pytest.raises(ValueError, match="not supported by peft_fast"):
        pf.LoraConfig(use_qalora=True)
    cfg = pf.get_peft_config({"peft_type": "LORA", "r": 5, "target_modules": ["a"], "task_type": "CAUSAL_LM"})
    assert isinstance(cfg, pf.LoraConfig) and cfg.r == 5 and cfg.target_modules == {"a"}
    with pytest.raises(ValueError, match="Invalid task type"):
        pf.LoraConfig(task_type="NOPE")


def test_grouped_conv_forward_works_but_merge_refuses_like_peft():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, groups=2, padding=1)

        def forward(self, x):
            return self.conv(x)

    import peft as ref

    torch.manual_seed(0)
    base = Grouped()
    with pytest.warns(UserWarning, match="groups > 1"):
        model = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(r=4, target_modules=["conv"]))
    with pytest.warns(UserWarning, match="groups > 1"):
        ref_model = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(r=4, target_modules=["conv"]))
    randomize_adapters(ref_model)
    model.load_state_dict(ref_model.state_dict())
    x = torch.randn(2, 4, 5, 5)
    y = model(x)
    assert y.shape == (2, 8, 5, 5)
    # the same numbers as HF PEFT, and the adapter's share is not nothing (scaling 0 passed a shape-only check)
    assert rel_err(y, ref_model(x)) < 1e-6
    assert rel_err(y, base(x)) > 1e-2
    weight = model.base_model.model.conv.get_base_layer().weight.clone()
    with pytest.raises(NotImplementedError, match="groups > 1"):
        model.base_model.merge_adapter()
    assert torch.equal(model.base_model.model.conv.get_base_layer().weight, weight)
    with pytest.raises(ValueError, match="divisible by groups"):
        pf.get_peft_model(Grouped(), pf.LoraConfig(r=3, target_modules=["conv"]))


@pytest.mark.parametrize("field,value", [("lora_alpha", "16"), ("lora_alpha", True), ("lora_dropout", "0.1"),
                                         ("lora_dropout", 1.0), ("r", 4.0), ("r", "8"),
                                         ("rank_pattern", {"q_proj": "8"}), ("alpha_pattern", {"q_proj": None}),
                                         ("layers_to_transform", ["1"])])
def test_numeric_config_fields_are_checked_when_the_config_is_made(field, value):
    """A wrong type fails at LoraConfig(...) with a ValueError naming the field, not later inside a layer."""
    extra = {"target_modules": ["q_proj"]} if field == "layers_to_transform" else {}
    with pytest.raises(ValueError, match=field):
        pf.LoraConfig(**{field: value}, **extra)
    assert pf.LoraConfig(lora_alpha=16.5, lora_dropout=0, rank_pattern={"q_proj": 4}).lora_alpha == 16.5
