"""PEFT round trip: coalora's outputs are reproduced by peft on the exported adapter and quantized base."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from workers.adapters.coa import CoAModel
from workers.export.peft import configuration_from_json, export_adapter, folded_adapter, quantized_base_weights
from workers.training import TrainConfig, train


@pytest.mark.parametrize("kind,init", [("bert", "zero_B"), ("roberta", "svd_of_W"), ("llama", "zero_B")])
def test_peft_round_trip(kind, init, space, pool, make_model, make_batch, tmp_path):
    coa = CoAModel(make_model(kind), space, rank=4, alpha=8.0, init=init)
    configs = [[s] * len(coa.registry) for s in pool]
    train(coa, [make_batch(kind)], configs, TrainConfig(lr=2e-2, total_steps=3))
    with torch.no_grad():
        coa.encoder.out.weight.normal_(std=0.05)  # make M clearly ≠ I, so the fold matters
    mixed = [pool[i % 3] for i in range(len(coa.registry))]
    batch = make_batch(kind, seed=1)
    with torch.no_grad():
        expected = coa(mixed, **batch).logits
    out = export_adapter(coa, mixed, tmp_path / "adapter")
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in keys)
    saved = configuration_from_json(json.loads((out / "quant_configuration.json").read_text()))
    assert list(saved.values()) == mixed

    base = make_model(kind)  # the same original weights, as a deployment would load them
    base.load_state_dict(quantized_base_weights(coa, mixed), strict=False)
    served = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = served(**batch).logits
    assert (got - expected).abs().max() <= 1e-4


def test_fold_is_m_times_a(space, pool, make_model):
    coa = CoAModel(make_model("qwen2"), space, rank=4, alpha=8.0)
    config = [pool[0]] * len(coa.registry)
    m = coa.mixing_matrices(config).detach()
    folded = folded_adapter(coa, config)
    for i, layer in enumerate(coa.layers):
        torch.testing.assert_close(folded[layer.name][0], m[i] @ layer.lora_A.detach())


def test_the_packed_base_reproduces_gptq_codes_outside_coalora_s_model(space, pool, make_model, make_batch,
                                                                       tmp_path):
    """A GPTQ-calibrated model's export: the fresh original model + quantized_base.safetensors + the PEFT adapter
    compute coalora's logits, though no consumer could recompute GPTQ's codes from the configuration."""
    from workers.calibration import coa_covariances
    from workers.export.peft import QUANTIZED_BASE_FILE, load_quantized_base
    from workers.quant.formats import packed_nbytes

    coa = CoAModel(make_model("llama"), space, rank=4, alpha=8)
    coa.set_calibration(coa_covariances(coa, [make_batch("llama", seed=s) for s in range(3)]))
    train(coa, [make_batch("llama")], [[s] * len(coa.registry) for s in pool], TrainConfig(lr=2e-2, total_steps=2))
    mixed = [pool[i % 3] for i in range(len(coa.registry))]
    batch = make_batch("llama", seed=1)
    with torch.no_grad():
        expected = coa(mixed, **batch).logits
    out = export_adapter(coa, mixed, tmp_path / "adapter")
    stored = load_file(str(out / QUANTIZED_BASE_FILE))
    assert sum(t.numel() * t.element_size() for t in stored.values()) == sum(
        packed_nbytes(n, s) for n, s in zip(coa.registry.numels, mixed))
    served = PeftModel.from_pretrained(load_quantized_base(make_model("llama"), out / QUANTIZED_BASE_FILE),
                                       str(out)).eval()
    with torch.no_grad():
        assert (served(**batch).logits - expected).abs().max() <= 1e-4
    rtn = make_model("llama")
    rtn.load_state_dict(quantized_base_weights(CoAModel(make_model("llama"), space, rank=4), mixed), strict=False)
    assert any(not torch.equal(rtn.get_submodule(n).weight, load_quantized_base(make_model("llama"),
                                                                                out / QUANTIZED_BASE_FILE)
                               .get_submodule(n).weight) for n in coa.registry.names)
    with pytest.raises(ValueError, match="not a coalora quantized base"):
        load_quantized_base(make_model("llama"), out / "adapter_model.safetensors")
