"""The driver's master copy of the trainable tensors and its optimizers.

Workers compute gradient shards; the driver averages them and steps AdamW here (t-SignSGD for LoTA's ternary
factors, ``adapter.kind: lota``), then ships the new state with the next calls. The whole optimizer state
round-trips through safetensors + JSON (no pickles), so a resumed run takes exactly the step an uninterrupted one
would have.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch

from workers.adapters.lota.ternary import TernarySignSGD, UpdateSchedule
from workers.training import TrainConfig, param_groups, scheduled_adamw

from ..config import RunConfig


def train_config(cfg: RunConfig, **changes: Any) -> TrainConfig:
    """The optimisation settings of a run: its whole schedule spans rounds × steps_per_round steps. ``changes``
    override fields (a per-configuration baseline trains one configuration per step, for example)."""
    t = cfg.training
    config = TrainConfig(
        lr=t.lr, lora_lr=t.lora_lr, encoder_lr=t.encoder_lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
        total_steps=max(1, cfg.search.rounds * t.steps_per_round), max_grad_norm=t.grad_clip,
        configs_per_step=t.configs_per_step, seed=cfg.run.seed,
    )
    return replace(config, **changes)


class MasterState:
    """Trainable tensors as leaf parameters + AdamW with warmup/decay (no decay on ``no_decay`` names); the
    ``ternary`` names (LoTA's factors) are stepped by t-SignSGD over the whole schedule instead, unclipped."""

    def __init__(self, state: Mapping[str, torch.Tensor], no_decay: set[str], config: TrainConfig,
                 ternary: set[str] = frozenset()):
        self.config = config
        self.params = {n: torch.nn.Parameter(t.detach().clone().float()) for n, t in sorted(state.items())}
        unknown = set(ternary) - set(self.params)
        if unknown:
            raise ValueError(f"ternary tensors not in the trainable state: {sorted(unknown)[:3]}")
        dense = [(n, p) for n, p in self.params.items() if n not in ternary]
        self.dense = [p for _, p in dense]
        # a LoTA causal LM trains its ternary factors alone: then no AdamW (torch refuses an empty one)
        self.optimizer, self.scheduler = (scheduled_adamw(param_groups(dense, no_decay, config), config) if dense
                                          else (None, None))
        self.ternary = (TernarySignSGD([self.params[n] for n in sorted(ternary)], UpdateSchedule(config.total_steps))
                        if ternary else None)
        # the optimizer numbers tensors in group order, not name order: name its state slots by that order
        by_id = {id(p): n for n, p in self.params.items()}
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        self._slot_names = [by_id[id(p)] for g in groups for p in g["params"]]

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def step(self, grads: Mapping[str, torch.Tensor]) -> float:
        """Clip the AdamW tensors' global norm, step, advance the schedule; returns the pre-clip norm of every
        gradient (the ternary ones included)."""
        if set(grads) != set(self.params):
            raise ValueError(f"gradient keys differ from the trainable state: {sorted(set(grads) ^ set(self.params))}")
        for n, p in self.params.items():
            p.grad = grads[n].to(p.dtype).clone()
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params.values()])
        if self.optimizer is not None:
            torch.nn.utils.clip_grad_norm_(self.dense, self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        if self.ternary is not None:
            self.ternary.step()
        for p in self.params.values():
            p.grad = None
        return float(norm)

    # ---- persistence -------------------------------------------------------------------------------------------
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """(parameters, optimizer tensors, optimizer JSON)."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        if self.optimizer is not None:
            opt = self.optimizer.state_dict()
            for idx, slot in opt["state"].items():
                for key, value in slot.items():
                    tensors[f"{self._slot_names[idx]}::{key}"] = torch.as_tensor(value)
            meta["param_groups"] = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
            meta["scheduler"] = self.scheduler.state_dict()["last_epoch"]
        if self.ternary is not None:
            meta["ternary_step"] = self.ternary.param_groups[0]["step"]
        return self.state(), tensors, meta

    def load(self, params: Mapping[str, torch.Tensor], opt_tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        if set(params) != set(self.params):
            raise ValueError("checkpoint parameters do not match this run's trainable state")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(params[n])
        if self.ternary is not None:
            self.ternary.param_groups[0]["step"] = int(meta["ternary_step"])
        if self.optimizer is None:
            return
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in opt_tensors.items():
            name, _, slot = key.rpartition("::")
            state.setdefault(self._slot_names.index(name), {})[slot] = value.clone()
        self.optimizer.load_state_dict({"state": state, "param_groups": list(meta["param_groups"])})
        self.scheduler.last_epoch = int(meta["scheduler"])
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # type: ignore[attr-defined]


def weighted_mean(
    shards: Sequence[tuple[Sequence[float], Mapping[str, torch.Tensor], int]],
) -> tuple[float, dict[str, torch.Tensor], list[float]]:
    """Combine (per-configuration losses, grads, n_examples) shards into the full batch's mean loss, gradient and
    per-configuration losses; shards are summed in call order, so the result does not depend on which worker
    finished first."""
    total = sum(n for _, _, n in shards)
    k = len(shards[0][0])
    per_config = [sum(losses[i] * n for losses, _, n in shards) / total for i in range(k)]
    names = shards[0][1].keys()
    grads = {name: sum(g[name] * (n / total) for _, g, n in shards) for name in names}
    return sum(per_config) / k, grads, per_config  # type: ignore[return-value]
