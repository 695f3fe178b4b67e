"""LQ-LoRA decomposition and the baselines on the shared harness."""

import torch

from search.space import QuantSetting
from workers.baselines import compare, lq_lora
from workers.init.lq import low_rank_factors, lq_decompose
from workers.quant.blockwise import fake_quantize
from workers.training import TrainConfig

NF3 = QuantSetting("nf3", 8, "fp32", 64, 256)


def _structured(m: int = 64, n: int = 96, seed: int = 0) -> torch.Tensor:
    """Low-rank signal plus small noise, with a few outlier columns: the case LQ is built for."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) + 0.1 * torch.randn(m, n, generator=g)
    return w


def test_init_reduces_reconstruction_error_vs_plain_quantization():
    w = _structured()
    plain = (w - fake_quantize(w, NF3)).norm()
    result = lq_decompose(w, NF3, rank=8, iterations=20)
    assert result.error < 0.5 * plain
    torch.testing.assert_close(result.q, fake_quantize(w - result.l1 @ result.l2, NF3))
    assert abs((w - result.q - result.l1 @ result.l2).norm() - result.error) < 1e-3


def test_returns_best_iterate_when_error_rises():
    w = _structured()
    calls = []

    def worsening(x, setting):  # good for two iterations, then much worse
        calls.append(1)
        q = fake_quantize(x, setting)
        return q if len(calls) <= 2 else q + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    result = lq_decompose(w, NF3, rank=8, iterations=10, quantizer=worsening)
    assert len(result.errors) == 3 and result.errors[2] > result.errors[1]
    assert result.best_iteration == 1
    assert abs((w - result.q - result.l1 @ result.l2).norm() - result.errors[1]) < 1e-3


def test_fisher_two_sided_weighting_and_randomized_svd_are_reproducible():
    w = _structured()
    fisher = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) ** 4
    a = lq_decompose(w, NF3, rank=8, iterations=5, fisher=fisher, seed=3)
    b = lq_decompose(w, NF3, rank=8, iterations=5, fisher=fisher, seed=3)
    assert torch.equal(a.l1, b.l1)
    plain = float(((w - fake_quantize(w, NF3)).square() * fisher).sum().sqrt())
    assert a.error < plain
    # the exact and randomized SVDs agree on a matrix of rank ≤ r
    exact = low_rank_factors(w, 4, randomized=False)
    rand = low_rank_factors(w, 4, randomized=True)
    torch.testing.assert_close(exact[0] @ exact[1], rand[0] @ rand[1], rtol=0, atol=2e-2)


def test_lq_lora_model_starts_from_the_decomposition(space, make_model, make_batch):
    model = make_model("llama")
    n = len([m for m in model.modules() if isinstance(m, torch.nn.Linear)]) - 1  # minus lm_head
    coa = lq_lora(model, space, [NF3] * n, rank=4, alpha=8.0, iterations=5)
    for layer in coa.layers:
        recon = layer.quantized_weight(NF3) + layer.scaling * layer.lora_B @ layer.lora_A
        plain = (layer.weight - fake_quantize(layer.weight, NF3)).norm()
        assert (layer.weight - recon).norm() < plain


def test_compare_runs_every_method(space, pool, make_model, make_batch):
    configs = [[s] * 12 for s in pool]
    results = compare(
        lambda: make_model("bert"), space, configs, configs[:2], [make_batch("bert")], [make_batch("bert", seed=1)],
        TrainConfig(lr=1e-2, total_steps=2), rank=4, alpha=8.0, lq_iterations=3,
    )
    assert set(results) == {"coa-lora", "qlora", "lq-lora", "shared-lora", "no-adapter"}
    assert all(len(v) == 2 and 0.0 <= v[0]["accuracy"] <= 1.0 for v in results.values())
