"""The configuration-aware LoRA layer and model wrapping."""

import math

import pytest
import torch
from torch import nn

from search.space import QuantSetting
from workers.coa_model import CoAModel, wrap_targets
from workers.lora import CoALoRALinear, QuantCache
from workers.quant.blockwise import fake_quantize
from workers.registry import ModuleRegistry

NF4 = QuantSetting("nf4", 8, "fp32", 64, 256)
NF2 = QuantSetting("nf2", 8, "fp32", 64, 256)


def _linear(out_f: int = 24, in_f: int = 40) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(in_f, out_f)


def test_forward_matches_formula():
    base = _linear()
    layer = CoALoRALinear(base, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
    m = torch.eye(4) + 0.1 * torch.randn(4, 4)
    layer.setting, layer.mixing = NF4, m
    x = torch.randn(3, 5, 40)
    w_q = fake_quantize(base.weight.detach(), NF4)
    expected = x @ w_q.T + base.bias + 2.0 * (x @ layer.lora_A.T @ m.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # folding M into A gives the same output with M = I
    layer.lora_A.data, layer.mixing = layer.folded_A(), None
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_zero_b_init_is_quantized_base_and_kaiming_bound():
    base = _linear()
    layer = CoALoRALinear(base, rank=4, alpha=8.0)
    assert torch.all(layer.lora_B == 0)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(40)
    layer.setting = NF2
    x = torch.randn(2, 40)
    torch.testing.assert_close(layer(x), x @ fake_quantize(base.weight.detach(), NF2).T + base.bias)
    layer.setting = None  # unquantized
    torch.testing.assert_close(layer(x), base(x))


def test_svd_of_w_init_splits_w_into_low_rank_plus_residual():
    base = _linear()
    layer = CoALoRALinear(base, rank=4, alpha=8.0, init="svd_of_W")
    low = layer.scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer.residual + low, base.weight.detach(), rtol=1e-5, atol=1e-5)
    u, s, vh = torch.linalg.svd(base.weight.detach())
    torch.testing.assert_close(low, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)
    layer.setting = NF4
    torch.testing.assert_close(layer.quantized_weight(), fake_quantize(layer.residual, NF4))


def test_quant_cache_is_bounded_lru():
    calls = []
    cache = QuantCache(2)
    for s in [NF2, NF4, NF2, QuantSetting("nf3", 8, "fp32", 64, 256), NF4]:
        cache.get(s, lambda s=s: calls.append(s) or torch.zeros(1))
    # NF2 hit (3rd); nf3 evicts NF4 (least recent); NF4 recomputed
    assert calls == [NF2, NF4, QuantSetting("nf3", 8, "fp32", 64, 256), NF4]
    assert len(cache) == 2 and cache.hits == 1 and cache.misses == 4


def test_layer_requantizes_only_on_cache_miss():
    layer = CoALoRALinear(_linear(), rank=2, alpha=4.0, cache_size=2)
    x = torch.randn(1, 40)
    for s in [NF2, NF4, NF2, NF4]:
        layer.setting = s
        layer(x)
    assert layer.cache.misses == 2 and layer.cache.hits == 2


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama", "qwen2"])
def test_wrapping_all_targets(kind, space, make_model, make_batch):
    model = make_model(kind)
    registry = ModuleRegistry.from_model(model)
    expected = 2 * (6 if kind in ("bert", "roberta") else 7)
    assert len(registry) == expected
    batch = make_batch(kind)
    with torch.no_grad():
        reference = model(**batch).logits
    coa = CoAModel(model, space, rank=4, alpha=8.0)
    assert [type(model.get_submodule(n)) for n in registry.names] == [CoALoRALinear] * expected
    with torch.no_grad():
        out = coa(None, **batch).logits  # unquantized, B = 0: the original model
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in coa.named_parameters() if p.requires_grad}
    assert sum(n.endswith("lora_A") for n in trainable) == expected
    assert any(n.startswith("encoder.") for n in trainable)
    if kind in ("bert", "roberta"):
        assert any(".classifier." in f".{n}" for n in trainable)  # the head trains too
    assert not any(n.endswith(".weight") and "lora" not in n and "encoder" not in n and "classifier" not in n
                   for n in trainable)


def test_wrap_targets_seeded(make_model):
    a = wrap_targets(make_model("llama"), ModuleRegistry.from_model(make_model("llama")), 4, 8.0, seed=3)
    b = wrap_targets(make_model("llama"), ModuleRegistry.from_model(make_model("llama")), 4, 8.0, seed=3)
    assert all(torch.equal(x.lora_A, y.lora_A) for x, y in zip(a, b))
