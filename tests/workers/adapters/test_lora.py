"""The configuration-aware LoRA layer and model wrapping."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search.space import QuantSetting
from workers.adapters.coa import CoAModel
from workers.adapters.lora import CoALoRALinear, wrap_targets
from workers.quant.cache import QuantCache
from workers.quant.blockwise import fake_quantize, quantize
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


def test_quant_cache_is_a_byte_bounded_lru():
    """Entries are packed weights; the budget is bytes; the least recent entry goes first; a matrix larger than
    the whole budget is used but not kept; ``drop`` forgets one matrix's settings only."""
    w = torch.randn(64, 64)
    nf3 = QuantSetting("nf3", 8, "fp32", 64, 256)
    size = quantize(w, NF4).nbytes
    cache = QuantCache(2.5 * size / 2**20)  # room for two NF4-sized entries (nf3 and nf2 are smaller)
    calls = []
    for name, s in [("a", NF4), ("b", NF4), ("a", NF4), ("c", NF4), ("b", NF4)]:
        cache.get(name, s, lambda s=s, name=name: calls.append((name, s)) or quantize(w, s))
    # a hit (3rd); c evicts b (least recent); b quantized again and evicts a
    assert calls == [("a", NF4), ("b", NF4), ("c", NF4), ("b", NF4)]
    assert cache.stats() == {"cache_hits": 1, "cache_misses": 4, "cache_evictions": 2, "cache_hit_rate": 0.2,
                             "cache_mb": 2 * size / 2**20, "cache_entries": 2}
    cache.get("c", nf3, lambda: quantize(w, nf3))
    cache.drop("c")
    assert len(cache) == 1 and cache.nbytes == size
    tiny = QuantCache(0)
    assert torch.equal(tiny.get("a", NF4, lambda: quantize(w, NF4)).codes, quantize(w, NF4).codes) and len(tiny) == 0
    with pytest.raises(ValueError, match="finite number of MB"):
        QuantCache(float("nan"))


def test_layer_requantizes_only_on_cache_miss():
    layer = CoALoRALinear(_linear(), rank=2, alpha=4.0)
    x = torch.randn(1, 40)
    for s in [NF2, NF4, NF2, NF4]:
        layer.setting = s
        layer(x)
    assert layer.cache.misses == 2 and layer.cache.hits == 2


@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 40)])
def test_forward_and_backward_equal_a_dense_fake_quantized_linear(shape):
    """The packed path (decode in forward, decode again in backward) computes what F.linear on the dense
    fake-quantized weight computes, bit for bit, and keeps no dense weight for the backward."""
    base = _linear()
    layer = CoALoRALinear(base, rank=2, alpha=4.0)
    layer.setting = NF4
    dense = fake_quantize(layer.residual, NF4)
    x = torch.randn(*shape, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    expected_x = x.detach().clone().requires_grad_(True)
    expected = F.linear(expected_x, dense, base.bias) + layer.scaling * F.linear(
        F.linear(expected_x, layer.lora_A), layer.lora_B)
    assert torch.equal(y, expected)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    assert torch.equal(x.grad, expected_x.grad)
    assert tuple(dense.shape) not in saved  # only the LoRA factors and activations are kept


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
