"""CorDA initialisation: preprocess_corda + init_lora_weights='corda' build the same adapter and residual weights
as HF PEFT's from the same calibration run, leave the model's outputs unchanged at the start, and reuse caches."""

import peft as ref
import pytest
import torch
from peft.tuners.lora.corda import preprocess_corda as ref_preprocess

import peft_fast as pf
from peft_fast.tuners.lora import CordaConfig
from peft_fast.tuners.lora.corda import preprocess_corda

from models import save_trained_and_converted, tiny_llama

SAMPLES = [torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def llama():
    torch.manual_seed(0)
    return tiny_llama()


def corda_model(lib, preprocess, method, **kw):
    model = llama()
    corda = (ref.tuners.lora.config.CordaConfig if lib is ref else CordaConfig)(corda_method=method, **kw)
    config = lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="corda", corda_config=corda,
                            rank_pattern={"v_proj": 2})

    def run_model():
        with torch.no_grad():
            for ids in SAMPLES:
                model(ids)

    preprocess(model, config, run_model=run_model)
    return lib.get_peft_model(model, config)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_same_adapter_and_residual_as_peft_and_the_same_outputs_at_start(method):
    ours = corda_model(pf, preprocess_corda, method)
    theirs = corda_model(ref, ref_preprocess, method)
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert ours.base_model.model.model.layers[0].self_attn.v_proj.lora_A["default"].weight.shape[0] == 2  # pattern
    base_out = llama()(SAMPLES[0]).logits
    torch.testing.assert_close(ours(SAMPLES[0]).logits, base_out, rtol=1e-4, atol=1e-4)
    assert not hasattr(ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer, "eigens")


def test_cache_and_covariance_files_are_reused(tmp_path):
    cache, covariance = str(tmp_path / "c/cache.pt"), str(tmp_path / "c/cov.pt")
    first = corda_model(pf, preprocess_corda, "ipm", cache_file=cache, covariance_file=covariance)
    # no run_model needed once the files exist
    for kw in (dict(cache_file=cache), dict(covariance_file=covariance)):
        model = llama()
        config = pf.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="corda",
                               corda_config=CordaConfig(**kw), rank_pattern={"v_proj": 2})
        preprocess_corda(model, config)
        again = pf.get_peft_model(model, config)
        for key, value in first.state_dict().items():
            torch.testing.assert_close(again.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_misuse_is_refused_clearly(tmp_path):
    config = pf.LoraConfig(target_modules=["q_proj"], init_lora_weights="corda")
    assert isinstance(config.corda_config, CordaConfig)  # defaulted, with a warning
    model = llama()
    with pytest.raises(ValueError, match="preprocess_corda"):
        pf.get_peft_model(model, config)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="run_model must be specified"):
        preprocess_corda(llama(), config)
    with pytest.raises(ValueError, match="corda_method"):
        CordaConfig(corda_method="fast")
    saved = pf.LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "kpm"})
    assert saved.corda_config == CordaConfig(corda_method="kpm")  # as read back from adapter_config.json
    saved.save_pretrained(tmp_path)
    assert pf.LoraConfig.from_pretrained(tmp_path).corda_config == CordaConfig(corda_method="kpm")


def test_conversion_on_save_gives_a_plain_lora_adapter_on_the_original_base(tmp_path):
    model = corda_model(pf, preprocess_corda, "ipm").eval()
    plain = pf.PeftModel.from_pretrained(llama(), save_trained_and_converted(model, str(tmp_path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(SAMPLES[1]).logits, model(SAMPLES[1]).logits, rtol=1e-4, atol=1e-4)
