"""AutoPeftModel… load base model and adapter from the adapter's folder, as HF PEFT's classes do (no downloads:
the base models are tiny ones saved to a local folder first)."""

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import randomize_adapters, tiny_llama


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """Local folders of a tiny Llama for causal LM and one for sequence classification."""
    torch.manual_seed(0)
    dirs = {}
    for name, model in (("causal", tiny_llama()), ("seq_cls", tiny_llama(num_labels=3))):
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(path))
        dirs[name] = str(path)
    return dirs


def _adapter(base_dirs, tmp_path, kind, task_type, auto_class="AutoModelForCausalLM"):
    import transformers

    base = getattr(transformers, auto_class).from_pretrained(base_dirs[kind])
    model = pf.get_peft_model(base, pf.LoraConfig(task_type=task_type, r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    model.save_pretrained(str(tmp_path))
    return model


def test_causal_lm_loads_base_and_adapter_like_peft(base_dirs, tmp_path):
    trained = _adapter(base_dirs, tmp_path, "causal", "CAUSAL_LM")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    ours = pf.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path))
    theirs = ref.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(ours) is pf.PeftModelForCausalLM
    assert type(ours.get_base_model()).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, want)
        torch.testing.assert_close(theirs(input_ids=ids).logits, want)
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference unless is_trainable
    trainable = pf.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path), is_trainable=True, adapter_name="mine")
    assert list(trainable.peft_config) == ["mine"] and any(p.requires_grad for p in trainable.parameters())


def test_sequence_classification_and_the_task_type_check(base_dirs, tmp_path):
    _adapter(base_dirs, tmp_path, "seq_cls", "SEQ_CLS", "AutoModelForSequenceClassification")
    model = pf.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path))
    assert type(model) is pf.PeftModelForSequenceClassification
    for ours, theirs in ((pf.AutoPeftModelForCausalLM, ref.AutoPeftModelForCausalLM),
                         (pf.AutoPeftModel, ref.AutoPeftModel)):
        with pytest.raises(ValueError) as mine:
            ours.from_pretrained(str(tmp_path))
        with pytest.raises(ValueError) as peft_error:
            theirs.from_pretrained(str(tmp_path))
        assert str(mine.value) == str(peft_error.value)


def test_auto_peft_model_takes_an_adapter_without_task_type(base_dirs, tmp_path):
    """No task type: the saved config's auto_mapping names the base class, as PEFT writes and reads it."""
    trained = _adapter(base_dirs, tmp_path, "causal", None)
    model = pf.AutoPeftModel.from_pretrained(str(tmp_path))
    assert type(model) is pf.PeftModel and type(model.get_base_model()).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained(input_ids=ids).logits)
    with pytest.raises(EnvironmentError, match="from_pretrained"):
        pf.AutoPeftModelForCausalLM()


def test_embeddings_are_resized_to_a_tokenizer_saved_with_the_adapter(base_dirs, tmp_path):
    """Tokens added during fine-tuning: the adapter folder holds the tokenizer, and the base gets its vocab size."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    _adapter(base_dirs, tmp_path, "causal", "CAUSAL_LM")
    vocab = {f"t{i}": i for i in range(70)}  # 64 in the base model, 6 added
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        unk_token="t0")
    tokenizer.save_pretrained(str(tmp_path))
    ours = pf.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path))
    theirs = ref.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path))
    assert ours.get_input_embeddings().weight.shape[0] == theirs.get_input_embeddings().weight.shape[0] == 70
