"""``adapter.init: lq-shared`` (workers/init/lq.py): one L for a set of settings, checked on a real MiniLM matrix
(issue 12: a residual-aware init lowers ‖W − Q_C − L‖ against zero-init for every C of a set)."""

from __future__ import annotations

import pytest
import torch

from search.space import QuantSetting, SearchSpace
from workers.baselines import plain_lora
from workers.init.lq import apply_shared_lq, code_settings, lq_decompose, shared_lq_decompose
from workers.quant.formats import fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 8


@pytest.fixture(scope="module")
def down(minilm_calibration) -> torch.Tensor:
    """The down projection (384 × 1536) of MiniLM's block 1."""
    return minilm_calibration["encoder.layer.1.output.dense"][0]


def _error(w: torch.Tensor, low: torch.Tensor, setting: QuantSetting) -> float:
    return float((w - low - fake_quantize(w - low, setting)).norm())


def test_one_l_lowers_every_setting_s_error_and_the_alternation_beats_its_first_iterate(down):
    settings = code_settings(SearchSpace.default(), down.shape[1])
    result = shared_lq_decompose(down, settings, RANK, iterations=6)
    low = result.l1 @ result.l2
    for setting in settings:  # against zero-init, whose error is W's own quantization error
        assert _error(down, low, setting) < _error(down, torch.zeros_like(down), setting), setting
    # the kept iterate is the best seen; the first is svd_of_W's L (Q = 0), so the mean never ends above it
    assert result.error == min(result.errors) and result.error <= result.errors[0]
    mean = (sum(_error(down, low, s) ** 2 for s in settings) / len(settings)) ** 0.5
    assert mean == pytest.approx(result.error, rel=1e-5)
    again = shared_lq_decompose(down, settings, RANK, iterations=6)
    assert torch.equal(again.l1, result.l1) and torch.equal(again.l2, result.l2)  # seeded randomized SVD


def test_one_setting_is_lq_lora_and_the_shared_l_serves_the_set_better_than_one_setting_s(down):
    """With one setting the shared alternation is LQ-LoRA's, iterate for iterate (to float rounding); over the code widths its L has a
    lower mean error than the L decomposed for nf2 alone, at the same number of iterations."""
    settings = code_settings(SearchSpace.default(), down.shape[1])
    nf2 = [s for s in settings if s.code == "nf2"]
    alone = shared_lq_decompose(down, nf2, RANK, iterations=6, seed=3)
    lq = lq_decompose(down, nf2[0], RANK, iterations=6, seed=3)
    assert alone.errors == pytest.approx(lq.errors, rel=1e-3) and alone.best_iteration == lq.best_iteration
    low, lq_low = alone.l1 @ alone.l2, lq.l1 @ lq.l2  # a rounding difference can flip a code, so not bit for bit
    assert float((low - lq_low).norm() / lq_low.norm()) < 5e-2  # measured 1.9%
    shared = shared_lq_decompose(down, settings, RANK, iterations=6)
    mean = {name: sum(_error(down, r.l1 @ r.l2, s) ** 2 for s in settings)
            for name, r in (("alone", alone), ("shared", shared))}
    assert mean["shared"] < mean["alone"]


def test_weights_steer_the_decomposition_and_uniform_weights_change_nothing(down, minilm_calibration):
    """Weighted by the matrix's input energy per column (diag Σ, the Fisher's input factor), the shared L lowers
    every setting's weighted error against zero-init, and the mean of them against the unweighted L's."""
    settings = code_settings(SearchSpace.default(), down.shape[1])
    plain = shared_lq_decompose(down, settings, RANK, iterations=4)
    uniform = shared_lq_decompose(down, settings, RANK, iterations=4, fisher=torch.ones_like(down))
    assert torch.equal(plain.l1, uniform.l1) and plain.errors == pytest.approx(uniform.errors, rel=1e-6)
    sigma = minilm_calibration["encoder.layer.1.output.dense"][1]
    fisher = torch.ones(down.shape[0], 1) * sigma.diagonal().float().unsqueeze(0)
    weighted = shared_lq_decompose(down, settings, RANK, iterations=4, fisher=fisher)

    def weighted_error(result, setting):
        target = down - result.l1 @ result.l2
        return float(((target - fake_quantize(target, setting)).square() * fisher).sum())

    for setting in settings:  # weighted by F, each setting's error falls below zero-init's, and below the plain L's
        zero = float(((down - fake_quantize(down, setting)).square() * fisher).sum())
        assert weighted_error(weighted, setting) < zero, setting
    assert sum(weighted_error(weighted, s) for s in settings) < sum(weighted_error(plain, s) for s in settings)


def test_code_settings_take_one_setting_per_code_and_only_those_a_matrix_can_take():
    settings = code_settings(SearchSpace.default(), 384)
    assert [s.code for s in settings] == ["nf2", "nf3", "nf4", "nf8"]
    assert {(s.scale_bits, s.scale2_format, s.block0, s.block1) for s in settings} == {(4, "fp16", 32, 64)}
    gguf = SearchSpace.from_dict({"code": ["q4_0", "q4_k", "q8_0"]})
    assert [s.code for s in code_settings(gguf, 96)] == ["q4_0", "q8_0"]  # q4_k needs rows of 256
    assert [s.code for s in code_settings(gguf, 512)] == ["q4_0", "q4_k", "q8_0"]


def test_bad_arguments_are_refused(down):
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        shared_lq_decompose(down, code_settings(SearchSpace.default(), 1536), RANK, iterations=0)
    with pytest.raises(ValueError, match="at least one setting"):
        shared_lq_decompose(down, [], RANK)


def test_every_replica_adopts_the_same_decomposition(make_model, space):
    """apply_shared_lq computes each matrix's L once and gives it to every replica: the same B·A and the same
    base quant(W − L) on each, and the model at step 0 is quant(W − L) + L."""
    replicas = [plain_lora(make_model("bert"), space, rank=4, alpha=8.0, seed=s) for s in (0, 1)]
    fisher = {layer.name: torch.rand_like(layer.weight) for layer in replicas[0].layers}
    stats = apply_shared_lq(replicas, space, 4, iterations=3, fisher=fisher)
    assert 0 < stats["lq_shared/error_ratio"] < 1 and 0 <= stats["lq_shared/best_iteration"] < 3
    for a, b in zip(replicas[0].layers, replicas[1].layers):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
        assert torch.equal(a.residual, b.residual)
        low = a.scaling * a.lora_B @ a.lora_A
        torch.testing.assert_close(a.residual + low, a.weight, atol=1e-5, rtol=0)
