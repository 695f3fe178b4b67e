"""The LQ-LoRA decomposition W ≈ Q + L1·L2 (method.md §2.5), implemented faithfully (method.md §6 A10), and its
form shared by a set of quantization settings (``adapter.init: lq-shared``).

Per setting (:func:`lq_decompose`): alternate a rank-r SVD of W − Q with Q = quant_c(W − L1·L2) for up to T
iterations (default 100, LQ-LoRA's), using randomized SVD (``torch.svd_lowrank``, q = r + 10 oversampling) and optional
Fisher two-sided weighting; stop when the error rises and return the BEST iterate (the official code returns the worse
one it just computed).

Shared (:func:`shared_lq_decompose`): CoA-LoRA serves every configuration from one adapter, so its start must be one
L for all of them: the L that lowers the mean error Σ_c ‖W − L − quant_c(W − L)‖² over a set of settings (one per
code width of the space), found by the same alternation, started from ``svd_of_W``'s L.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch

from search.space import QuantSetting, SearchSpace

from ..quant.formats import fake_quantize

if TYPE_CHECKING:  # the layer module imports nothing from here; typing only
    from ..adapters.lora import LoRAModel

SHARED_LQ_INIT = "lq-shared"
"""``adapter.init``'s name for :func:`apply_shared_lq`."""

OVERSAMPLING = 10
EPS = 1e-12

Quantizer = Callable[[torch.Tensor, QuantSetting], torch.Tensor]


@dataclass(kw_only=True)
class Decomposition:
    """Best iterate of an alternation: L1 (m×r), L2 (r×n), and the error of every iterate computed."""

    l1: torch.Tensor
    l2: torch.Tensor
    errors: list[float] = field(default_factory=list)
    best_iteration: int = 0

    @property
    def error(self) -> float:
        return self.errors[self.best_iteration]


@dataclass(kw_only=True)
class LQResult(Decomposition):
    """:func:`lq_decompose`'s best iterate, with its Q (dequantized, = quant_c(W − L1·L2))."""

    q: torch.Tensor


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


def shared_lq_decompose(
    weight: torch.Tensor,
    settings: list[QuantSetting],
    rank: int,
    *,
    iterations: int = 10,
    fisher: torch.Tensor | None = None,
    seed: int = 0,
    quantizer: Quantizer = _default_quantizer,
) -> Decomposition:
    """One L = L1·L2 for every setting of ``settings``, from L⁽⁰⁾ = rank-r SVD of W (``svd_of_W``): each iteration
    quantizes W − L under every setting, E_c = W − L − quant_c(W − L), and moves to L ← rank-r SVD of L + Σ_c E_c.
    Stops at the first rise of the mean error and returns the best iterate seen (never worse than ``svd_of_W``); its
    errors are root-mean-square over the settings.
    With ``fisher`` (the matrix's diagonal Fisher) the errors and the SVDs are weighted as in :func:`lq_decompose`.

    Why the sum: given the Q_c, the exact minimiser of Σ_c ‖W − Q_c − L‖² is the SVD of L + mean_c E_c, a step of
    1/|settings| of the one LQ-LoRA takes for a single setting; on MiniLM's matrices with four code widths it had not
    converged after 30 iterations. The sum is LQ-LoRA's own step for one setting, and converged in about 8 (mean
    error 9.76 → 8.92 on a down projection, against 9.48 after 12 with the mean step; the best-iterate rule guards an
    overshoot)."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not settings:
        raise ValueError("a shared decomposition needs at least one setting")
    w = weight.detach().float()
    weights = None if fisher is None else fisher.float()
    l1, l2 = low_rank_factors(w, rank, fisher=weights, generator_seed=seed)
    best: Decomposition | None = None
    errors: list[float] = []
    for t in range(iterations):
        target = w - l1 @ l2
        total_error = torch.zeros_like(w)
        squared = 0.0
        for setting in settings:
            error = target - quantizer(target, setting).float()
            total_error += error
            squared += float((error.square() * weights).sum() if weights is not None else error.square().sum())
        errors.append((squared / len(settings)) ** 0.5)
        if best is not None and errors[-1] > errors[best.best_iteration]:
            break  # the mean error rose: keep the previous (best) iterate
        best = Decomposition(l1=l1, l2=l2, best_iteration=t)
        if t + 1 < iterations:
            l1, l2 = low_rank_factors(l1 @ l2 + total_error, rank, fisher=weights, generator_seed=seed + t + 1)
    assert best is not None
    best.errors = errors
    return best


def code_settings(space: SearchSpace, row_length: int) -> list[QuantSetting]:
    """The settings ``lq-shared`` decomposes a matrix for: one per code of ``space`` (its bit-widths), each with the
    middle value of every other field, among those the matrix can take (a llama.cpp type needs whole blocks per row).
    The ILP picks blocks and scales later, from a cost table measured on W − L, so L is fixed before the search."""
    fields = space.to_dict()
    middle = {f: values[len(values) // 2] for f, values in fields.items() if f != "code"}
    allowed = {s for s, ok in zip(space.settings, space.allowed([row_length])[0]) if ok}
    return [s for s in (QuantSetting(code, **middle) for code in fields["code"]) if s in allowed]


def apply_shared_lq(models: Sequence["LoRAModel"], space: SearchSpace, rank: int, *, iterations: int = 10,
                    fisher: Mapping[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, float]:
    """``adapter.init: lq-shared``: for every target matrix, :func:`shared_lq_decompose` over its
    :func:`code_settings`, adopted by the same layer of each of ``models`` (replicas of one frozen base): A, B from
    L1, L2 and the base quant(W − L1·L2) for every configuration. Computed once per matrix whatever the number of
    replicas; deterministic in ``seed`` (and ``fisher``), so every worker of a run finds the same L. ``fisher``:
    matrix name → its diagonal Fisher, the weights of the errors (a run passes the one its ILP cost table uses: on
    SmolLM2 the Fisher-weighted L started every configuration tried closer to the unquantized model than the plain
    one, docs/theta.md). Returns, averaged over the matrices, the root-mean-square error over the settings relative to
    quantizing W itself (lq_shared/error_ratio, weighted as the decomposition is) and the iterate kept
    (lq_shared/best_iteration)."""
    if not models:
        raise ValueError("apply_shared_lq needs at least one model")
    ratios, kept = [], []
    for i, layer in enumerate(models[0].layers):
        settings = code_settings(space, layer.in_features)
        weights = None if fisher is None else fisher[layer.name].float()
        result = shared_lq_decompose(layer.weight, settings, rank, iterations=iterations, fisher=weights,
                                     seed=seed + 1000 * i)
        w = layer.weight.detach().float()
        plain = sum(float((w - fake_quantize(w, s)).square().mul(1.0 if weights is None else weights).sum())
                    for s in settings) / len(settings)
        ratios.append(result.error / max(plain ** 0.5, EPS))
        kept.append(result.best_iteration)
        for model in models:
            model.layers[i].set_decomposition(result.l1, result.l2)
    return {"lq_shared/error_ratio": sum(ratios) / len(ratios), "lq_shared/best_iteration": sum(kept) / len(kept)}
