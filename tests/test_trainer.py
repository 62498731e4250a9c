"""transformers' Trainer with peft_fast models: checkpoints hold the adapter files (as with HF PEFT), save_model writes
them, resume_from_checkpoint and load_best_model_at_end reload them (peft_fast/trainer_support.py)."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import peft_fast as pf
from models import tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=8, seq=16):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 64, (seq,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return rows


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, report_to=[],
                use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=2, max_steps=4, seed=0,
                data_seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def _model(lib, base):
    torch.manual_seed(0)
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return lib.get_peft_model(copy.deepcopy(base), config)


def _adapter(model):
    return {k: v.detach().clone() for k, v in pf.get_peft_model_state_dict(model).items()}


def _checkpoint_files(folder):
    return sorted(f for f in os.listdir(folder) if not f.startswith("."))


def test_checkpoints_and_save_model_write_the_adapter_files_hf_peft_writes(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    runs = {}
    for name, lib in (("peft_fast", pf), ("peft", peft)):
        trainer = Trainer(model=_model(lib, base), args=_args(tmp_path / name), train_dataset=_data())
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        runs[name] = trainer
    for folder in ("checkpoint-2", "checkpoint-4", "final"):
        ours, theirs = (_checkpoint_files(tmp_path / lib / folder) for lib in ("peft_fast", "peft"))
        assert ours == theirs, folder
        assert "adapter_config.json" in ours and "adapter_model.safetensors" in ours and "model.safetensors" not in ours
    # the files hold the trained adapter and load with from_pretrained, in peft_fast and in HF PEFT
    trained = _adapter(runs["peft_fast"].model)
    saved = load_file(str(tmp_path / "peft_fast" / "final" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(trained) and all(torch.equal(saved[k], trained[k]) for k in saved)
    reloaded = pf.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft_fast" / "checkpoint-4"))
    assert all(torch.equal(v, trained[k]) for k, v in _adapter(reloaded).items())
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft_fast" / "checkpoint-4"))
    hf_state = peft.get_peft_model_state_dict(hf)
    assert all(torch.equal(hf_state[k], trained[k]) for k in trained)


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    base = tiny_llama()
    straight = Trainer(model=_model(pf, base), args=_args(tmp_path / "a"), train_dataset=_data())
    straight.train()
    resumed = Trainer(model=_model(pf, base), args=_args(tmp_path / "b"), train_dataset=_data())
    before = _adapter(resumed.model)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    after, expected = _adapter(resumed.model), _adapter(straight.model)
    # the resumed run started from the checkpoint's adapter (not its own fresh one) and ended where the first run did
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key in expected:
        torch.testing.assert_close(after[key], expected[key], rtol=1e-5, atol=1e-6)


def test_load_best_model_at_end_reloads_the_best_checkpoints_adapter(tmp_path):
    base = tiny_llama()
    data = _data()
    trainer = Trainer(model=_model(pf, base), train_dataset=data, eval_dataset=data[:4],
                      args=_args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                                 metric_for_best_model="eval_loss", greater_is_better=False, learning_rate=0.2))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    ours = _adapter(trainer.model)
    assert sorted(saved) == sorted(ours) and all(torch.equal(saved[k], ours[k]) for k in saved)
    # the model in memory at the end is the best one, also when that was not the last checkpoint
    last = load_file(str(tmp_path / "checkpoint-4" / "adapter_model.safetensors"))
    if not best.endswith("checkpoint-4"):
        assert any(not torch.equal(last[k], ours[k]) for k in last)


@pytest.mark.parametrize("order", ["peft_fast first", "transformers.trainer first"])
def test_trainer_support_is_installed_whatever_is_imported_first(order):
    imports = ["import peft_fast", "import transformers.trainer as t"]
    if order != "peft_fast first":
        imports.reverse()
    code = "; ".join(imports + [
        "import peft_fast",
        "assert getattr(t._is_peft_model, '_peft_fast_support', False)",
        "import transformers.trainer_utils as tu",
        "assert tu._is_peft_model is t._is_peft_model",
        "assert t.Trainer._save.__wrapped__ is not None",
        "m = peft_fast.get_peft_model(__import__('torch').nn.Sequential(__import__('torch').nn.Linear(4, 4)), "
        "peft_fast.LoraConfig(target_modules=['0']))",
        "assert t._is_peft_model(m) and not t._is_peft_model(m.base_model.model)",
    ])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_trainer_module_without_the_expected_names_gets_one_clear_warning():
    import types

    from peft_fast import trainer_support

    with pytest.warns(UserWarning, match="whole state dict"):
        assert trainer_support.install(types.ModuleType("transformers.trainer")) is False
