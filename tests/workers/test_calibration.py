"""quant.method = gptq inside the model: calibration statistics, GPTQ codes for every setting, RTN unchanged."""

from __future__ import annotations

import pytest
import torch

from workers.calibration import coa_covariances
from workers.adapters.coa import CoAModel
from workers.quant import blockwise
from workers.quant.gptq import gptq_quantize


def test_covariances_are_the_inputs_second_moment(make_model, make_batch, space):
    model = CoAModel(make_model("bert"), space, rank=4)
    batch = make_batch("bert")
    batch["attention_mask"][:, -3:] = 0  # padding positions are left out
    seen = {}
    layer = model.layers[0]
    handle = layer.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach().clone()))
    with torch.no_grad(), model.adapters_disabled():
        model.set_configuration(None)
        model.model(**batch)
    handle.remove()
    x = seen["x"][batch["attention_mask"].bool()].double()
    sigmas = coa_covariances(model, [batch])
    assert set(sigmas) == set(model.registry.names)
    assert torch.allclose(sigmas[layer.name].double(), x.T @ x / len(x), rtol=1e-5, atol=1e-7)
    assert all(s.shape == (l.in_features, l.in_features) for l, s in zip(model.layers, sigmas.values()))


def test_gptq_codes_for_every_layer_and_rtn_when_cleared(make_model, make_batch, space, pool):
    model = CoAModel(make_model("llama"), space, rank=4)
    batches = [make_batch("llama", seed=s) for s in range(3)]
    sigmas = coa_covariances(model, batches)
    model.set_calibration(sigmas)
    setting = pool[0]  # nf2: where GPTQ and round to nearest differ most
    differs = 0
    for layer in model.layers:
        packed = layer.packed_weight(setting)
        assert torch.equal(packed.codes, gptq_quantize(layer.residual, setting, sigmas[layer.name]).codes)
        differs += not torch.equal(packed.codes, blockwise.quantize(layer.residual, setting).codes)
    assert differs > 0
    model.set_calibration(None)  # back to round to nearest: the cache forgot the GPTQ entries
    for layer in model.layers:
        assert torch.equal(layer.packed_weight(setting).codes, blockwise.quantize(layer.residual, setting).codes)
    with torch.no_grad():
        model.set_calibration(sigmas)
        loss_gptq = float(model([setting] * len(model.layers), **batches[0]).loss)
    assert torch.isfinite(torch.tensor(loss_gptq))


def test_gptq_refuses_llama_cpp_types():
    from search.space import QuantSetting
    from workers.quant.formats import quantize

    with pytest.raises(ValueError, match="llama.cpp type"):
        quantize(torch.randn(4, 256), QuantSetting("q4_k"), name="m", hessian=torch.eye(256))
