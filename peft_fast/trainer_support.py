"""transformers' Trainer checkpoints, saves and reloads peft_fast models as it does HF PEFT's, without peft installed.

Trainer knows adapters only through two checks in transformers/trainer.py:
- `_is_peft_model(model)`: isinstance against peft's PeftModel / PeftMixedModel (False when peft is not installed).
  It decides how `resume_from_checkpoint` and `load_best_model_at_end` reload a checkpoint (`model.load_adapter` on
  its adapter files), which columns the model's forward takes, and the label smoother's model name.
- `Trainer._save`: `model.save_pretrained(...)` only for PreTrainedModel or peft's PeftModel; any other model is
  written as one model.safetensors of its whole state dict (base + adapters, no adapter_config.json), which
  `PeftModel.from_pretrained` cannot load.
`install(trainer_module)` teaches both peft_fast's PeftModel and PeftMixedModel: the module's `_is_peft_model` also
answers True for them, and `Trainer._save` lets them write their adapter folder (save_pretrained, all-or-nothing)
and then saves the processing class and the training arguments as it does for any model. Everything else goes to
Trainer's own code unchanged.

It runs when transformers.trainer is imported (an import hook, so `import peft_fast` never imports Trainer itself),
or at once when it already is. A transformers version without those two names gets one warning saying that its
checkpoints will hold the whole state dict; tests/test_trainer.py checks the files against HF PEFT's.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import warnings

_TRAINER_MODULE = "transformers.trainer"
_MARK = "_peft_fast_support"


def _peft_fast_model_types() -> tuple[type, ...]:
    from .mixed_model import PeftMixedModel
    from .peft_model import PeftModel

    return PeftModel, PeftMixedModel


def _unwrapped(trainer):
    """trainer.model, or what accelerate wrapped (DDP, torch.compile) when that is a peft_fast model; else None."""
    types = _peft_fast_model_types()
    model = trainer.model
    if isinstance(model, types):
        return model
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "unwrap_model"):
        try:
            inner = accelerator.unwrap_model(model, keep_torch_compile=False)
        except TypeError:  # accelerate without keep_torch_compile
            inner = accelerator.unwrap_model(model)
        if isinstance(inner, types):
            return inner
    return None


def install(trainer_module) -> bool:
    """Teach `trainer_module` (transformers.trainer) peft_fast's models; True when installed (or already was)."""
    is_peft_model = getattr(trainer_module, "_is_peft_model", None)
    trainer_cls = getattr(trainer_module, "Trainer", None)
    save = getattr(trainer_cls, "_save", None)
    if is_peft_model is None or save is None:
        warnings.warn(
            "peft_fast: this transformers' Trainer has no `_is_peft_model` / `Trainer._save` to extend; its "
            "checkpoints of a peft_fast model hold the whole state dict (save the adapter with "
            "model.save_pretrained)", stacklevel=2)
        return False
    if getattr(is_peft_model, _MARK, False):
        return True
    training_args_name = getattr(trainer_module, "TRAINING_ARGS_NAME", "training_args.bin")

    def _is_peft_model(model) -> bool:
        return isinstance(model, _peft_fast_model_types()) or is_peft_model(model)

    def _save(self, output_dir=None, state_dict=None):
        model = _unwrapped(self)
        if model is None:
            return save(self, output_dir, state_dict=state_dict)
        # Trainer._save for a model class it knows, the model writing its own adapter folder
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        processing_class = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        collator_tokenizer = getattr(getattr(self, "data_collator", None), "tokenizer", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        elif collator_tokenizer is not None:
            collator_tokenizer.save_pretrained(output_dir)
        import torch

        torch.save(self.args, os.path.join(output_dir, training_args_name))

    setattr(_is_peft_model, _MARK, True)
    _save.__doc__ = save.__doc__
    _save.__wrapped__ = save
    trainer_module._is_peft_model = _is_peft_model
    # the function's home module too, for code that imports it from there after this point (Seq2SeqTrainer, TRL…)
    utils_module = sys.modules.get("transformers.trainer_utils")
    if getattr(utils_module, "_is_peft_model", None) is is_peft_model:
        utils_module._is_peft_model = _is_peft_model
    trainer_cls._save = _save
    return True


class _InstallAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds transformers.trainer through the other finders and runs `install` once the module has executed."""

    def __init__(self) -> None:
        self._loader = None

    def find_spec(self, name, path=None, target=None):
        if name != _TRAINER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                self._loader = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        install(module)


def activate() -> None:
    """Install now if transformers.trainer is imported, else when it is (idempotent)."""
    module = sys.modules.get(_TRAINER_MODULE)
    if module is not None:
        install(module)
    elif not any(isinstance(f, _InstallAfterImport) for f in sys.meta_path) and \
            importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _InstallAfterImport())
