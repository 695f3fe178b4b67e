"""Training over configurations (method.md §3.5), split so a driver can shard it.

:func:`compute_gradients` is a pure function of (trainable state, batch, configurations) → (loss, gradients):
it substitutes the given tensors into the model with ``torch.func.functional_call`` and never touches the model's
own parameters, so any worker holding the same frozen base can run it as a "fine-tuning shard" and a driver can
average the shards' gradients. :func:`apply_gradients` is the optimizer step on the master copy.

Objective: the loss of a step is the MEAN of the K per-configuration task losses (not their sum, unlike the
official code; method.md §6 A9), so the learning rate does not depend on K.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Iterable, Mapping, Sequence

import torch
from torch.func import functional_call

from search.space import QuantSetting

from .adapters.lora import LoRAModel
from .data import on_device

Configuration = Sequence[QuantSetting]
Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters. ``schedule`` is the decay after a linear warmup: cosine or linear to 0.

    ``lora_lr`` is the peak learning rate of the LoRA factors (``lora_A``/``lora_B``) when they need their own:
    LQ-LoRA starts them from an SVD of the quantization residual, so the rate that trains a zero-initialised
    adapter and a fresh task head throws its non-zero factors off (measured: it collapses to the majority class);
    None gives them ``lr`` like every other tensor.

    ``encoder_lr`` is the peak learning rate of θ (parameters under ``encoder.``): θ has few parameters and each
    moves every adapter at once, so at the LoRA factors' rate its output moves far faster than they do (issue 12
    measured ~30×); None gives it ``lr``."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    total_steps: int = 100
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    configs_per_step: int = 2
    seed: int = 0
    lora_lr: float | None = None
    encoder_lr: float | None = None

    def __post_init__(self) -> None:
        if self.lr < 0 or any(x is not None and x < 0 for x in (self.lora_lr, self.encoder_lr)):
            raise ValueError("learning rates must be >= 0")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {self.schedule!r}")
        if self.total_steps < 1 or self.configs_per_step < 1:
            raise ValueError("total_steps and configs_per_step must be >= 1")


def autocast_for(device: torch.device) -> ContextManager:
    """bf16 autocast where the device runs bf16 natively (CUDA with bf16); full fp32 elsewhere (CPU bf16
    matmuls are slow and would change numerics for no gain)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def sample_configurations(
    pool: Sequence[Configuration], k: int, generator: torch.Generator
) -> list[Configuration]:
    """K distinct configurations drawn uniformly from ``pool`` (all of them if K ≥ |pool|), from an explicit
    generator so a run is reproducible from its seed alone."""
    if not pool:
        raise ValueError("the configuration pool is empty")
    order = torch.randperm(len(pool), generator=generator)[: min(k, len(pool))]
    return [pool[int(i)] for i in order]


def compute_gradients(
    model: LoRAModel,
    state: Mapping[str, torch.Tensor],
    batch: Batch,
    configurations: Sequence[Configuration],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The task loss of each configuration on the same batch (a (K,) tensor; the step's loss is their mean), and
    the gradient of the mean w.r.t. every tensor of ``state``. One backward per configuration (memory of one
    configuration at a time); gradients are summed with weight 1/K so the result is the gradient of the mean."""
    if not configurations:
        raise ValueError("need at least one configuration")
    leaves = {n: t.detach().requires_grad_(True) for n, t in state.items()}
    grads = {n: torch.zeros_like(t) for n, t in leaves.items()}
    device = next(iter(leaves.values())).device
    losses = torch.zeros(len(configurations), device=device)
    weight = 1.0 / len(configurations)
    for k, configuration in enumerate(configurations):
        with autocast_for(device):  # keep only the loss: the outputs (logits, key/value cache) would stay alive
            loss = functional_call(model, leaves, args=(configuration,), kwargs=dict(batch), strict=False).loss
        loss = loss.float()  # into the next configuration's forward otherwise
        parts = torch.autograd.grad(loss * weight, list(leaves.values()), allow_unused=True)
        for (name, _), g in zip(leaves.items(), parts):
            if g is not None:
                grads[name] += g
        losses[k] = loss.detach()
    return losses, grads


LORA_FACTORS: tuple[str, ...] = ("lora_A", "lora_B")
"""Parameter-name leaves of the LoRA factors, the tensors ``TrainConfig.lora_lr`` applies to."""
ENCODER_PREFIX = "encoder."
"""Parameter-name prefix of θ, the tensors ``TrainConfig.encoder_lr`` applies to."""


def learning_rate(name: str, config: TrainConfig) -> float:
    """The peak learning rate of the trainable tensor ``name``."""
    if name.startswith(ENCODER_PREFIX) and config.encoder_lr is not None:
        return config.encoder_lr
    if name.rpartition(".")[2] in LORA_FACTORS and config.lora_lr is not None:
        return config.lora_lr
    return config.lr


def param_groups(
    named: Iterable[tuple[str, torch.Tensor]], no_decay: set[str], config: TrainConfig
) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay except on ``no_decay`` names, and each tensor's own peak rate
    (:func:`learning_rate`). Groups keep first-seen order and empty ones are dropped, so one list of tensors always
    maps to the same optimizer state indices (what a checkpoint relies on)."""
    groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
    for name, tensor in named:
        groups.setdefault((name not in no_decay, learning_rate(name, config)), []).append(tensor)
    return [
        {"params": params, "weight_decay": config.weight_decay if decay else 0.0, "lr": lr}
        for (decay, lr), params in groups.items()
    ]


def build_optimizer(
    model: LoRAModel, config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (no decay on γ, LayerNorm, embeddings and biases; see
    :func:`param_groups`) with linear warmup then cosine or linear decay to 0 at ``total_steps``."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return scheduled_adamw(param_groups(trainable, model.no_decay_names(), config), config)


def scheduled_adamw(
    params: Iterable[Any], config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (tensors, or groups carrying their own rate and decay) at ``config.lr`` and
    ``config.weight_decay``, and its schedule: linear warmup, then cosine or linear decay to 0 (:func:`lr_factor`)."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


def lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress


def apply_gradients(
    model: LoRAModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    grads: Mapping[str, torch.Tensor],
    max_grad_norm: float = 1.0,
) -> float:
    """One optimizer step on the model's trainable parameters from (possibly shard-averaged) gradients; clips the
    global norm first. Returns the pre-clip norm."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(grads):
        raise ValueError(f"gradients for {sorted(set(grads) ^ set(params))} do not match the trainable parameters")
    for name, p in params.items():
        p.grad = grads[name].to(p.device, p.dtype).clone()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return float(norm)


def average_gradients(shards: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of several shards' gradient dicts (equal-size shards ⇒ the gradient of the pooled mean loss)."""
    if not shards:
        raise ValueError("no gradient shards to average")
    return {name: torch.stack([s[name] for s in shards]).mean(0) for name in shards[0]}


def train(
    model: LoRAModel,
    batches: Iterable[Batch],
    pool: Sequence[Configuration],
    config: TrainConfig,
) -> list[float]:
    """Run ``config.total_steps`` steps (cycling over ``batches``), each over ``configs_per_step`` configurations
    sampled from ``pool``. Returns the per-step mean losses."""
    optimizer, scheduler = build_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(p for p in model.parameters() if p.requires_grad).device
    losses: list[float] = []
    model.train()
    while len(losses) < config.total_steps:
        n_before = len(losses)
        for batch in batches:
            batch = on_device(batch, device)
            configurations = sample_configurations(pool, config.configs_per_step, generator)
            step_losses, grads = compute_gradients(model, _state_view(model), batch, configurations)
            apply_gradients(model, optimizer, scheduler, grads, config.max_grad_norm)
            losses.append(float(step_losses.mean()))
            if len(losses) >= config.total_steps:
                break
        if len(losses) == n_before:
            raise ValueError("the batch iterable is empty")
    model.eval()
    return losses


def _state_view(model: LoRAModel) -> dict[str, Any]:
    """The trainable tensors without a copy: ``compute_gradients`` detaches them, so the step stays pure."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
