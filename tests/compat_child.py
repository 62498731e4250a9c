"""Child process of test_transformers_compat.py: runs under another transformers version (PYTHONPATH), loads the
tiny models and prompt-learning adapters the parent saved, and writes what it computes next to the parent's.

usage: python compat_child.py DIR   (DIR holds one sub-folder per case: base/, adapter/, io.pt)
"""

import json
import os
import sys
import warnings

import torch


def greedy(model, ids, mask, new_tokens, eos, pad=0):
    """Greedy decoding by full forward passes, no KV cache reuse: an oracle for generate()'s cache handling (rows
    that emitted `eos` continue with `pad`, as generate() does)."""
    done = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
    for _ in range(new_tokens):
        logits = model(input_ids=ids, attention_mask=mask).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        done = done | (nxt == eos)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def main(root):
    import transformers

    import peft_fast as pf
    from models import output_tensor  # tests/ is this script's folder, so first on sys.path
    from peft_fast.prompt_learning import cache_kwarg

    report = {"transformers": transformers.__version__, "cases": {}}
    report["bert_cache_kwarg"] = cache_kwarg(transformers.BertModel(transformers.BertConfig(
        vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)))
    for case in sorted(os.listdir(root)):
        folder = os.path.join(root, case)
        io = torch.load(os.path.join(folder, "io.pt"))
        auto = getattr(transformers, io["auto_class"])
        base = auto.from_pretrained(os.path.join(folder, "base"))
        model = pf.PeftModel.from_pretrained(base, os.path.join(folder, "adapter")).eval()
        result = {}
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if io["generate"]:
                out = model.generate(**io["inputs"], max_new_tokens=io["new_tokens"], do_sample=False,
                                     pad_token_id=0)
                result["generate_equal"] = torch.equal(out, io["expected"])
                if io["task"] == "CAUSAL_LM":
                    ref = greedy(model, io["inputs"]["input_ids"], io["inputs"]["attention_mask"], io["new_tokens"],
                                 base.generation_config.eos_token_id)
                    result["greedy_equal"] = torch.equal(out, ref)
            else:
                logits = output_tensor(model(**io["inputs"]))
                diff = (logits.double() - io["expected"].double()).norm() / io["expected"].double().norm()
                result["rel_err"] = diff.item()
        result["deprecation_warnings"] = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
        report["cases"][case] = result
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
