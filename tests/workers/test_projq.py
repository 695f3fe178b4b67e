"""ProjQ (workers/projq.py): the checks issue 17 and projq.md §5 ask for, on a real MiniLM matrix with real
calibration inputs where they are about real behaviour, and in fp64 where they are about the algebra."""

from __future__ import annotations

import pytest
import torch

from search.space import QuantSetting
from workers.projq import (
    projected_hessian,
    projq_quantize,
    uncorrectable_error,
    whitened_svd_init,
    whitening,
)
from workers.quant import blockwise
from workers.quant.gptq import gptq_quantize

pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 8


@pytest.fixture(scope="module")
def down(minilm_calibration):
    """The down projection (384 × 1536) of block 1 and Σ over its 48 snippets' tokens."""
    w, sigma = minilm_calibration["encoder.layer.1.output.dense"]
    return w, sigma


def test_token_and_weight_space_projected_hessians_agree():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
    error = torch.randn(24, 40, generator=g, dtype=torch.float64)
    sigma = x.T @ x / len(x)
    y, y_inv = whitening(sigma)
    assert torch.allclose(y @ y.T, sigma, rtol=1e-12, atol=1e-12)
    assert torch.allclose(y_inv @ y, torch.eye(40, dtype=torch.float64), atol=1e-10)
    # the released code's form: project the tokens on the complement of the residual's top-r right subspace
    r_tokens = error @ x.T  # out × N
    _, _, vh = torch.linalg.svd(r_tokens, full_matrices=False)
    p = vh[:RANK].T @ vh[:RANK]
    token_form = x.T @ (torch.eye(len(x), dtype=torch.float64) - p) @ x / len(x)
    weight_form = projected_hessian(error, y, RANK)
    assert float((token_form - weight_form).norm() / token_form.norm()) < 1e-10
    # and H_⊥ annihilates the adapter's input directions: A·Σ·Aᵀ = I, H_⊥·Aᵀ = 0
    _, _, vh_w = torch.linalg.svd(error @ y, full_matrices=False)
    a = vh_w[:RANK] @ y_inv
    assert torch.allclose(a @ sigma @ a.T, torch.eye(RANK, dtype=torch.float64), atol=1e-9)
    assert float((weight_form @ a.T).abs().max()) < 1e-9


@pytest.mark.parametrize("code", ["nf2", "nf3"])
def test_uncorrectable_error_ranks_projq_below_gptq_below_rtn(down, code):
    w, sigma = down
    setting = QuantSetting(code, 8, "fp32", 64, 256)
    y, _ = whitening(sigma)

    def j(q: torch.Tensor) -> float:
        return uncorrectable_error(w - q, y, RANK)

    rtn = j(blockwise.fake_quantize(w, setting))
    gptq = j(blockwise.dequantize(gptq_quantize(w, setting, sigma)))
    result = projq_quantize(w, setting, sigma, RANK, iterations=3)
    projq = j(blockwise.dequantize(result.packed))
    assert projq < gptq < rtn, (code, projq, gptq, rtn)
    assert result.uncorrectable[0] == pytest.approx(gptq)
    # every iterate starts from W itself, so J_r never climbs above where it started (the in-place defect made it
    # rise every iteration); the returned one is the best
    assert max(result.uncorrectable[1:]) < result.uncorrectable[0]
    assert projq == pytest.approx(min(result.uncorrectable))


def test_whitened_svd_init_leaves_exactly_the_uncorrectable_error(down):
    w, sigma = down
    setting = QuantSetting("nf3", 8, "fp32", 64, 256)
    q = blockwise.dequantize(projq_quantize(w, setting, sigma, RANK, iterations=1).packed)
    b, a = whitened_svd_init(w, q, sigma, RANK)
    assert b.shape == (384, RANK) and a.shape == (RANK, 1536)
    y, _ = whitening(sigma)
    remaining = float(((w.double() - q.double() - b.double() @ a.double()) @ y).square().sum())
    assert remaining == pytest.approx(uncorrectable_error(w - q, y, RANK), rel=0.02)
    before = float(((w.double() - q.double()) @ y).square().sum())
    assert remaining < 0.9 * before


@pytest.mark.parametrize("rank, iterations", [(0, 3), (RANK, 0)])
def test_no_rank_or_no_iterations_is_plain_gptq(rank, iterations):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(400, 128, generator=g).double()
    sigma = x.T @ x / len(x)
    setting = QuantSetting("nf2", 8, "fp32", 64, 256)
    result = projq_quantize(w, setting, sigma, rank, iterations=iterations)
    assert len(result.uncorrectable) == 1 and result.best == 0
    assert torch.equal(result.packed.codes, gptq_quantize(w, setting, sigma).codes)


def test_bad_input():
    with pytest.raises(ValueError, match="beta"):
        projq_quantize(torch.randn(4, 64), QuantSetting("nf4", 8, "fp32", 64, 256), torch.eye(64), 2, beta=2.0)
