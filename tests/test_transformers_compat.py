"""Prompt learning under the newest transformers, checked without HF PEFT.

The suite runs on the pinned transformers (constraints.txt), where HF PEFT is the oracle of the prompt-learning
tests. transformers 5.24 renamed the KV-cache keyword `past_key_values` to `cache` (BERT-style models accept only
the new name; HF PEFT 0.21.2's prefix tuning fails there, and its generation with a prefix or prompt goes wrong), so
PEFT cannot be the oracle for it. Here a child process imports transformers 5.24 from the side folder that
scripts/install.sh fills, loads the tiny models and adapters this process saved, and must reproduce this
process's outputs and generations — which the oracle tests pin to HF PEFT's — and, for causal LMs, greedy
decoding done by plain forward passes.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import peft_fast as pf
from models import output_tensor, tiny_bert, tiny_llama, tiny_t5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPAT_VERSION = "5.24.0"
COMPAT_DIR = os.environ.get("PEFT_FAST_COMPAT_TRANSFORMERS",
                            os.path.join(ROOT, ".compat", f"transformers-{COMPAT_VERSION}"))

PREFIX = dict(peft_type="PREFIX_TUNING", num_virtual_tokens=5)
PREFIX_PROJ = dict(peft_type="PREFIX_TUNING", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=24)
PROMPT = dict(peft_type="PROMPT_TUNING", num_virtual_tokens=6)
P_MLP = dict(peft_type="P_TUNING", num_virtual_tokens=4, encoder_hidden_size=16)

# name: (builder, auto class, task type, config, generate?)
CASES = {
    "bert-seqcls-prefix": (lambda: tiny_bert("seq_cls"), "AutoModelForSequenceClassification", "SEQ_CLS", PREFIX,
                           False),
    "bert-tokencls-prefix-proj": (lambda: tiny_bert("token_cls"), "AutoModelForTokenClassification", "TOKEN_CLS",
                                  PREFIX_PROJ, False),
    "bert-qa-prefix": (lambda: tiny_bert("qa"), "AutoModelForQuestionAnswering", "QUESTION_ANS", PREFIX, False),
    "bert-feature-prefix": (lambda: tiny_bert("feature"), "AutoModel", "FEATURE_EXTRACTION", PREFIX, False),
    "llama-causal-prefix": (tiny_llama, "AutoModelForCausalLM", "CAUSAL_LM", PREFIX, False),
    "llama-generate-prefix": (tiny_llama, "AutoModelForCausalLM", "CAUSAL_LM", PREFIX, True),
    "llama-generate-prompt": (tiny_llama, "AutoModelForCausalLM", "CAUSAL_LM", PROMPT, True),
    "llama-generate-ptuning": (tiny_llama, "AutoModelForCausalLM", "CAUSAL_LM", P_MLP, True),
    "t5-generate-prefix": (tiny_t5, "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", PREFIX, True),
    "t5-generate-prompt": (tiny_t5, "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", PROMPT, True),
}


def _inputs(task, generate=False):
    """Two rows; forward cases pad one on the left. Generation cases are unpadded: the greedy oracle's forward
    passes number positions 0…n-1, as generate() does only when nothing is padded."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if not generate and task != "SEQ_2_SEQ_LM":
        mask[0, :2] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _save_cases(root):
    for name, (builder, auto_class, task, cfg, generate) in CASES.items():
        torch.manual_seed(0)
        base = builder()
        base.save_pretrained(os.path.join(root, name, "base"))
        torch.manual_seed(1)
        model = pf.get_peft_model(base, pf.get_peft_config({**cfg, "task_type": task})).eval()
        with torch.no_grad():  # prompt weights far from their init, so that a lost prefix shows
            for param in model.prompt_encoder.parameters():
                param.normal_(0, 1)
        model.save_pretrained(os.path.join(root, name, "adapter"))
        inputs = _inputs(task, generate)
        with torch.no_grad():
            if generate:
                expected = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
            else:
                expected = output_tensor(model(**inputs))
        torch.save(dict(auto_class=auto_class, task=task, generate=generate, inputs=inputs, expected=expected,
                        new_tokens=6), os.path.join(root, name, "io.pt"))


@pytest.mark.skipif(not os.path.isdir(os.path.join(COMPAT_DIR, "transformers")),
                    reason=f"transformers {COMPAT_VERSION} is not in {COMPAT_DIR} (scripts/install.sh puts it there)")
def test_prompt_learning_under_the_new_cache_api(tmp_path):
    import transformers

    if transformers.__version__ == COMPAT_VERSION:
        pytest.skip("the main environment already runs this transformers version")
    _save_cases(str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([COMPAT_DIR, ROOT, os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "compat_child.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["transformers"] == COMPAT_VERSION
    assert report["bert_cache_kwarg"] == "cache"  # the new API is what this test exercises
    assert set(report["cases"]) == set(CASES)
    for name, result in report["cases"].items():
        assert not result["deprecation_warnings"], (name, result["deprecation_warnings"])
        if CASES[name][4]:
            assert result["generate_equal"], name
            if "greedy_equal" in result:
                assert result["greedy_equal"], name
        else:
            assert result["rel_err"] < 1e-5, (name, result["rel_err"])


def test_the_prefix_reaches_the_model():
    """The oracle above only means something if the prefix changes the outputs: a forward that lost it would
    agree with itself across versions."""
    torch.manual_seed(0)
    base = tiny_bert("seq_cls").eval()
    inputs = _inputs("SEQ_CLS")
    with torch.no_grad():
        plain = base(**inputs).logits
        torch.manual_seed(1)
        model = pf.get_peft_model(base, pf.get_peft_config({**PREFIX, "task_type": "SEQ_CLS"})).eval()
        for param in model.prompt_encoder.parameters():
            param.normal_(0, 1)
        prefixed = model(**inputs).logits
    assert (prefixed - plain).norm() > 0.1 * plain.norm()
