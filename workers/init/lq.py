"""The LQ-LoRA decomposition W ≈ Q + L1·L2 (method.md §2.5), implemented faithfully (method.md §6 A10).

Alternate a rank-r SVD of W − Q with Q = quant_c(W − L1·L2) for up to T iterations (default 100, LQ-LoRA's), using
randomized SVD (``torch.svd_lowrank``, q = r + 10 oversampling) and optional Fisher two-sided weighting; stop when
the error rises and return the BEST iterate (the official code returns the worse one it just computed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from search.space import QuantSetting

from ..quant.formats import fake_quantize

OVERSAMPLING = 10
EPS = 1e-12

Quantizer = Callable[[torch.Tensor, QuantSetting], torch.Tensor]


@dataclass
class LQResult:
    """Best iterate: Q (dequantized, = quant_c(W − L1·L2)), L1 (m×r), L2 (r×n), plus the error trajectory."""

    q: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    errors: list[float] = field(default_factory=list)
    best_iteration: int = 0

    @property
    def error(self) -> float:
        return self.errors[self.best_iteration]


def _default_quantizer(weight: torch.Tensor, setting: QuantSetting) -> torch.Tensor:
    return fake_quantize(weight, setting)


def low_rank_factors(
    matrix: torch.Tensor,
    rank: int,
    *,
    randomized: bool = True,
    fisher: torch.Tensor | None = None,
    generator_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (L1 = U√S, L2 = √S Vᵀ) of ``matrix``. With ``fisher``, the two-sided heuristic: SVD of
    w_r ⊙ matrix ⊙ w_c with w_r = √(row-mean F), w_c = √(col-mean F), then L1 /= w_r, L2 /= w_c. The randomized SVD
    draws its test matrix under a forked RNG seeded with ``generator_seed``, so the result is reproducible and the
    global RNG is untouched."""
    target = matrix.float()
    if fisher is not None:
        w_r = fisher.float().mean(dim=1).sqrt().clamp_min(EPS)
        w_c = fisher.float().mean(dim=0).sqrt().clamp_min(EPS)
        target = w_r.unsqueeze(1) * target * w_c.unsqueeze(0)
    if randomized:
        q = min(rank + OVERSAMPLING, *target.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed)
            u, s, v = torch.svd_lowrank(target, q=q, niter=2)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    l1, l2 = u * root, root.unsqueeze(1) * vh
    if fisher is not None:
        l1, l2 = l1 / w_r.unsqueeze(1), l2 / w_c.unsqueeze(0)
    return l1, l2


def lq_decompose(
    weight: torch.Tensor,
    setting: QuantSetting,
    rank: int,
    *,
    iterations: int = 100,
    randomized: bool = True,
    fisher: torch.Tensor | None = None,
    seed: int = 0,
    quantizer: Quantizer = _default_quantizer,
) -> LQResult:
    """Up to ``iterations`` alternations from Q⁽⁰⁾ = 0; stops at the first rise of the (Fisher-weighted, if given)
    Frobenius error and returns the best iterate seen."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    w = weight.detach().float()
    q = torch.zeros_like(w)
    best: LQResult | None = None
    errors: list[float] = []
    for t in range(iterations):
        l1, l2 = low_rank_factors(w - q, rank, randomized=randomized, fisher=fisher, generator_seed=seed + t)
        low = l1 @ l2
        q = quantizer(w - low, setting).float()
        residual = w - low - q
        err = float((residual.square() * fisher).sum().sqrt() if fisher is not None else residual.norm())
        errors.append(err)
        if best is not None and err > errors[best.best_iteration]:
            break  # the error rose: keep the previous (best) iterate
        best = LQResult(q=q, l1=l1, l2=l2, best_iteration=t)
    assert best is not None
    best.errors = errors
    return best
