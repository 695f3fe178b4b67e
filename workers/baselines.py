"""Baselines on the same harness as CoA-LoRA (method.md §5.2): the same wrapped layers, data, trainer and
evaluation, so only the method differs.

- QLoRA: one plain LoRA (B = 0) per configuration, trained on that configuration only.
- LQ-LoRA: one LoRA per configuration initialised by the faithful LQ decomposition (workers/init/lq.py: T ≤ 100, best
  iterate, randomized SVD, optional Fisher); its base is Q = quant_c(W − L1·L2) and A, B = L2/√s, L1/√s.
- QLoRA with ProjQ's init: one LoRA per configuration whose base codes are ProjQ's (noise shaped under each matrix's
  calibration statistics Σ, workers/init/projq.py) and whose B, A are the whitened-SVD correction of what remains.
- Shared-LoRA: one plain LoRA (θ disabled, M = I) trained over the training configurations, one drawn per step.
- No adapter: the quantized base alone (``evaluate(..., adapter=False)``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from search.space import QuantSetting, SearchSpace

from .adapters.coa import CoAModel
from .adapters.lora import Init, LoRAModel
from .init.lq import lq_decompose
from .init.projq import projq_quantize, whitened_svd_init, whitening
from .quant.formats import dequantize, quantize
from .quant.cache import DEFAULT_CACHE_MB
from .tasks import evaluate
from .training import TrainConfig, train

Configuration = Sequence[QuantSetting]
Batch = Mapping[str, torch.Tensor]
METHODS: tuple[str, ...] = ("coa-lora", "qlora", "lq-lora", "shared-lora", "no-adapter")


def plain_lora(model: nn.Module, space: SearchSpace, *, rank: int, alpha: float, seed: int = 0,
               init: Init = "zero_B", cache_mb: float = DEFAULT_CACHE_MB) -> LoRAModel:
    """The wrapped model with θ disabled (M = I); B = 0 by default (QLoRA). Shared-LoRA and coa-no-theta take
    CoA-LoRA's own ``init``, so the comparison isolates θ."""
    return LoRAModel(model, space, rank=rank, alpha=alpha, init=init, seed=seed, cache_mb=cache_mb)


def lq_lora(
    model: nn.Module,
    space: SearchSpace,
    configuration: Configuration,
    *,
    rank: int,
    alpha: float,
    iterations: int = 100,
    fisher: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> LoRAModel:
    """A plain LoRA model bound to ``configuration`` whose every layer starts from its LQ decomposition."""
    coa = plain_lora(model, space, rank=rank, alpha=alpha, seed=seed)
    settings = coa.resolve(configuration)
    for i, (layer, setting) in enumerate(zip(coa.layers, settings)):
        f = None if fisher is None else fisher[layer.name]
        result = lq_decompose(layer.weight, setting, rank, iterations=iterations, fisher=f, seed=seed + i)
        layer.set_decomposition(result.l1, result.l2)
    return coa


def projq_lora(
    model: nn.Module,
    space: SearchSpace,
    configuration: Configuration,
    covariances: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    iterations: int = 5,
    seed: int = 0,
) -> LoRAModel:
    """A plain LoRA model bound to ``configuration`` with ProjQ's per-configuration init (projq.md §3): each layer's
    codes for its setting come from :func:`projq_quantize` under its Σ (``covariances``) and are pinned, and
    s·B·A is the whitened-SVD correction of W − Q, so at step 0 the remaining output error is J_r(Q)."""
    lora = plain_lora(model, space, rank=rank, alpha=alpha, seed=seed)
    for layer, setting in zip(lora.layers, lora.resolve(configuration)):
        sigma = covariances[layer.name]
        result = projq_quantize(layer.weight, setting, sigma, rank, iterations=iterations, name=layer.name)
        b, a = whitened_svd_init(layer.weight, dequantize(result.packed), sigma, rank)
        root = layer.scaling ** 0.5
        layer.pin(setting, result.packed)
        with torch.no_grad():
            layer.lora_A.copy_(a / root)
            layer.lora_B.copy_(b / root)
    return lora


def compensation_error(lora: LoRAModel, configuration: Configuration,
                       covariances: Mapping[str, torch.Tensor]) -> float:
    """The step-0 error-compensation loss of an initialised model on ``configuration``: per matrix,
    ‖(W − Q − s·B·A)·Y‖² (Y·Yᵀ = Σ, the calibration inputs' statistics) over round-to-nearest's uncorrected
    ‖(W − Q_rtn)·Y‖², averaged over matrices. 1.0 is QLoRA's start (RTN codes, B = 0); a lower value starts
    closer to the full-precision layer on the inputs it will see. M = I (a plain LoRA's, or θ switched off)."""
    ratios = []
    for layer, setting in zip(lora.layers, lora.resolve(configuration)):
        y, _ = whitening(covariances[layer.name])
        w = layer.weight.detach().double()
        adapter = layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
        left = (w - layer.quantized_weight(setting).double() - adapter) @ y
        rtn = (w - dequantize(quantize(layer.weight.detach(), setting, name=layer.name)).double()) @ y
        ratios.append(float(left.square().sum() / rtn.square().sum().clamp(min=torch.finfo(torch.float64).tiny)))
    return sum(ratios) / len(ratios)


def train_per_configuration(
    coa: LoRAModel, configuration: Configuration, batches: Iterable[Batch], config: TrainConfig
) -> list[float]:
    """Train ``coa`` on one configuration only (QLoRA, LQ-LoRA)."""
    return train(coa, batches, [list(configuration)], _with_k(config, 1))


def train_shared(
    coa: LoRAModel, configurations: Sequence[Configuration], batches: Iterable[Batch], config: TrainConfig
) -> list[float]:
    """Shared-LoRA: one configuration drawn uniformly per step (method.md §5.2)."""
    return train(coa, batches, [list(c) for c in configurations], _with_k(config, 1))


def compare(
    model_factory: Callable[[], nn.Module],
    space: SearchSpace,
    train_configurations: Sequence[Configuration],
    eval_configurations: Sequence[Configuration],
    train_batches: Iterable[Batch],
    eval_loader: Iterable[Batch],
    config: TrainConfig,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    methods: Sequence[str] = METHODS,
    lq_iterations: int = 100,
) -> dict[str, list[dict[str, float]]]:
    """Metrics of each method at each evaluation configuration. ``model_factory`` returns a fresh fp32 model;
    per-configuration methods get one fresh model per evaluation configuration, trained for the same number of
    steps as the shared methods."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; allowed: {list(METHODS)}")
    results: dict[str, list[dict[str, float]]] = {}
    if "coa-lora" in methods:
        coa = CoAModel(model_factory(), space, rank=rank, alpha=alpha, seed=config.seed)
        train(coa, train_batches, [list(c) for c in train_configurations], config)
        results["coa-lora"] = [evaluate(coa, c, eval_loader) for c in eval_configurations]
    if "shared-lora" in methods:
        shared = plain_lora(model_factory(), space, rank=rank, alpha=alpha, seed=config.seed)
        train_shared(shared, train_configurations, train_batches, config)
        results["shared-lora"] = [evaluate(shared, c, eval_loader) for c in eval_configurations]
    if "no-adapter" in methods:
        bare = plain_lora(model_factory(), space, rank=rank, alpha=alpha, seed=config.seed)
        results["no-adapter"] = [evaluate(bare, c, eval_loader, adapter=False) for c in eval_configurations]
    for method in ("qlora", "lq-lora"):
        if method not in methods:
            continue
        results[method] = []
        for c in eval_configurations:
            if method == "qlora":
                per = plain_lora(model_factory(), space, rank=rank, alpha=alpha, seed=config.seed)
            else:
                per = lq_lora(model_factory(), space, c, rank=rank, alpha=alpha, iterations=lq_iterations,
                              seed=config.seed)
            train_per_configuration(per, c, train_batches, config)
            results[method].append(evaluate(per, c, eval_loader))
    return results


def _with_k(config: TrainConfig, k: int) -> TrainConfig:
    return TrainConfig(**{**config.__dict__, "configs_per_step": k})

