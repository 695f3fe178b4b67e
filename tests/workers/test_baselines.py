"""LQ-LoRA decomposition, QLoRA with ProjQ's init, the step-0 compensation error, and the baselines on the shared
harness."""

import pytest
import torch

from search.space import QuantSetting
from workers.baselines import compare, compensation_error, lq_lora, plain_lora, projq_lora
from workers.calibration import coa_covariances
from workers.init.projq import uncorrectable_error, whitening
from workers.quant.formats import dequantize
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


def test_projq_lora_pins_its_codes_starts_at_j_r_and_starts_closest(space, make_model, make_batch):
    """QLoRA with ProjQ's init on a tiny model with real calibration inputs: each layer serves ProjQ's codes for its
    setting (not its round-to-nearest ones), the remaining whitened error after init is J_r of those codes, and the
    step-0 compensation error ranks ProjQ < GPTQ (B = 0) < QLoRA (RTN, B = 0, exactly 1) on 3-bit codes."""
    setting = QuantSetting("nf3", 8, "fp32", 32, 64)
    config = [setting] * 12
    rtn = plain_lora(make_model("bert"), space, rank=4, alpha=8.0)
    covariances = coa_covariances(rtn, [make_batch("bert", batch=8, length=16)])
    projq = projq_lora(make_model("bert"), space, config, covariances, rank=4, alpha=8.0, iterations=3)
    for layer in projq.layers:
        pinned = dequantize(layer.pinned[setting])
        assert torch.equal(layer.quantized_weight(setting), pinned)
        assert not torch.equal(pinned, rtn.get_submodule(f"model.{layer.name}").quantized_weight(setting))
        y, _ = whitening(covariances[layer.name])
        left = (layer.weight.double() - pinned.double()
                - layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()) @ y
        j_r = uncorrectable_error(layer.weight - pinned, y, 4)
        assert float(left.square().sum()) == pytest.approx(j_r, rel=2e-2)
    gptq = plain_lora(make_model("bert"), space, rank=4, alpha=8.0)
    gptq.set_calibration(covariances)
    errors = {name: compensation_error(m, config, covariances) for name, m in
              (("qlora", rtn), ("qlora-gptq", gptq), ("qlora-projq", projq))}
    assert errors["qlora"] == pytest.approx(1.0, abs=1e-12)
    assert errors["qlora-projq"] < errors["qlora-gptq"] < 1.0, errors
    projq.layers[0].set_hessian(None)  # new codes for the residual: the pinned ones no longer hold
    assert projq.layers[0].pinned == {}
