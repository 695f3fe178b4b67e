"""What every LoTA-QAF variant shares: the ternary factors' start, the ternary move of a code, and t-SignSGD.

Both variants (:mod:`.intk`, the paper's asymmetric INTk groups, and :mod:`.blockwise`, the ``adapter.kind: lota``
of a run over the space's ``int`` codes) compute the same thing on their own grid:

    ΔW = B_T·A_T          integers in [−r, r]
    Ŵ  = sign(ΔW)·1[|ΔW| > ω]·mask      each code moves by at most one step, never off [0, 2^k − 1]

with the gradient passed straight through the threshold (∂Ŵ/∂(ΔW/ω) = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

OMEGA_FRACTION = 0.75
"""Default ω = 0.75·r (the paper's main setting; it plays LoRA's α)."""
INIT_THRESHOLD = 0.75
"""A_T's initial draw is kept where |a| > 0.75·mean|a| (the paper's ternarisation)."""


def ternary_draw(rank: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A_T's start: a normal draw ternarised at ±0.75·mean|a| (B_T starts at 0, so step 0 is the quantized base)."""
    draw = torch.randn(rank, in_features, generator=generator)
    return torch.sign(draw) * (draw.abs() > INIT_THRESHOLD * draw.abs().mean())


def ternary_moves(delta: torch.Tensor, omega: float, can_up: torch.Tensor,
                  can_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ŵ, ΔW/ω) for ΔW = ``delta``: Ŵ's value is the masked ternary move (no gradient); the caller adds
    ``scaled − scaled.detach()`` wherever the move enters, which passes the gradient of ΔW/ω straight through."""
    hard = torch.sign(delta.detach()) * (delta.detach().abs() > omega)
    hard = torch.where(hard > 0, hard * can_up, hard * can_down)
    return hard, delta / omega


@dataclass(frozen=True)
class UpdateSchedule:
    """The fraction of each tensor's entries t-SignSGD may change at a step: ``start`` falling linearly to
    ``middle`` over the first ``decay_share`` of the steps, then linearly to ``end`` (the paper: 5% → 0.1% over
    80% of the steps, then → 0.01%)."""

    total_steps: int
    start: float = 0.05
    middle: float = 0.001
    end: float = 0.0001
    decay_share: float = 0.8

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError("t-SignSGD needs total_steps >= 1")
        if not 1 >= self.start >= self.middle >= self.end >= 0:
            raise ValueError("t-SignSGD fractions must satisfy 1 >= start >= middle >= end >= 0")
        if not 0 < self.decay_share <= 1:
            raise ValueError("decay_share must lie in (0, 1]")

    def fraction(self, step: int) -> float:
        knee = self.decay_share * self.total_steps
        if step < knee:
            return self.start + (self.middle - self.start) * step / knee
        tail = max(self.total_steps - knee, 1.0)
        return self.middle + (self.end - self.middle) * min(1.0, (step - knee) / tail)


class TernarySignSGD(torch.optim.Optimizer):
    """t-SignSGD: x ← clip(x − sign(g), −1, 1) on the ⌊fraction·n⌋ entries of largest |g| (and |g| > τ) of each
    tensor; no learning rate, no momentum, no gradient clipping. Entries stay in {−1, 0, 1}."""

    def __init__(self, params: Iterable[nn.Parameter], schedule: UpdateSchedule, tau: float = 1e-9):
        super().__init__(params, {"tau": tau})
        self.schedule = schedule
        self.param_groups[0]["step"] = 0  # in param_groups so state_dict() carries it

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        fraction = self.schedule.fraction(self.param_groups[0]["step"])
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                count = math.floor(fraction * p.numel())
                if count == 0:
                    continue
                g = p.grad.reshape(-1)
                magnitude, index = g.abs().topk(count)
                index = index[magnitude > group["tau"]]
                flat = p.view(-1)
                flat[index] = (flat[index] - torch.sign(g[index])).clamp_(-1, 1)
        self.param_groups[0]["step"] += 1
