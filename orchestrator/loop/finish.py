"""The run's last phase: the configurations every method is judged on, the baselines trained on the run's own
schedule, every method evaluated on the same validation examples, and the final table.

    configurations   the targets' ILP configurations (identical for every method) + seeded unseen ones
    baselines        Shared-LoRA (one target per step) and coa-no-theta (CoA-LoRA's steps replayed with M = I)
    evaluate         the run's adapter (CoA-LoRA, or one plain LoRA with adapter.kind = lora), the baselines and
                     no-adapter on every configuration → ledger "final" entries, and every example's scores
                     (final/examples.safetensors)
    write            final/evaluation.json and .md with the paired differences (final/paired.json), the training
                     loss curves (final/curves.json, .png), and one MLflow child run per method
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load, save
from tqdm import tqdm

from search.allocation import flat_to_encoded, solve_allocation
from search.space import SearchSpace
from workers.init.projq import SHARED_INIT
from workers.training import TrainConfig

from . import paired, report
from ..config import ConfigError, RunConfig
from ..executor import Executor
from ..faults import commit_point
from .optim import MasterState, weighted_mean
from .schedule import PURPOSE_SHARED, PURPOSE_UNSEEN, PURPOSE_UNSEEN_ILP, key, seeded, step_configurations, unkey
from ..state import Ledger, finite_or_none, write_atomic, write_json_atomic
from ..tracking.tracker import Tracker

RUN_METHOD: dict[str, str] = {"coa": "coa-lora", "lora": "lora", "lota": "lota"}
"""The final table's name for the run's own adapter, by ``adapter.kind``."""
EXAMPLES_FILE = "examples.safetensors"
"""Per-example scores of every (method, configuration) in final/, keyed "method|configuration"."""
CURVES_FILE = "curves.json"
"""Training loss per optimizer step of the run's adapter and of each baseline the run trains, in final/."""
MAX_NEAR_MISSES = 1000
"""Repeated draws of an unseen configuration in the 2.5-6 bit band before drawing from the whole space instead."""
MAX_ILP_MISSES = 100
"""Budgets drawn in a row whose ILP allocation was already evaluated before settling for fewer ILP-unseen
configurations (a small model's ILP gives few distinct allocations over the pool's budget range)."""
ILP_UNSEEN = "ilp-unseen"
"""Name prefix of the configurations drawn like the pool (``evaluation.unseen_ilp``)."""


def check_unseen_feasible(space: SearchSpace, allowed: np.ndarray, n_seen: int, unseen: int) -> None:
    """Refuse ``evaluation.unseen`` when the space has fewer distinct configurations than the pool, the targets
    and the unseen ones need together (a tiny space on a tiny model): drawing would never end. ``allowed``: the
    (N, n_settings) settings each matrix can take."""
    free = math.prod(int(c) for c in allowed.sum(axis=1)) - n_seen
    if unseen > free:
        raise ConfigError(f"evaluation.unseen = {unseen}: the space has only {max(free, 0)} configuration(s) besides "
                          f"the {n_seen} already used ({space.n_settings} settings per matrix, fewer where a "
                          f"matrix's rows do not fit a type; {len(allowed)} matrices)")


def _draw_near(g: np.random.Generator, near: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """One flat setting per matrix from ``near``, within the matrix's domain (its whole domain when ``near`` holds
    none of it). With every setting allowed this is one vectorised draw, the same as before domains existed."""
    if allowed.all():
        return g.choice(near, size=len(allowed))
    out = []
    for row in allowed:
        options = near[row[near]]
        out.append(g.choice(options if options.size else np.flatnonzero(row)))
    return np.asarray(out, dtype=np.int64)


def evaluation_configurations(cfg: RunConfig, space: SearchSpace, costs: np.ndarray, numels: list[int],
                              allowed: np.ndarray, pool: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """The targets' ILP configurations (identical for every method), seeded unseen configurations of random
    per-matrix settings (average bits drawn in [2.5, 6], then a setting near it for every matrix, within its
    ``allowed`` domain) and, with ``evaluation.unseen_ilp``, unseen configurations drawn like the pool
    (:func:`_ilp_unseen`); never a pool member or a target."""
    out = [(f"target {t:g}", flat_to_encoded(space, solve_allocation(space, costs, numels, t)))
           for t in cfg.evaluation.targets]
    g = np.random.default_rng(np.random.SeedSequence([cfg.run.seed, PURPOSE_UNSEEN]))
    bits = space.setting_bits
    seen = {x.tobytes() for x in pool} | {x.tobytes() for _, x in out}
    wanted = len(cfg.evaluation.targets) + cfg.evaluation.unseen
    check_unseen_feasible(space, allowed, len(seen), cfg.evaluation.unseen)
    lo, hi = max(2.5, space.bits_range[0]), min(6.0, space.bits_range[1])
    misses = 0
    while len(out) < wanted:
        beta = g.uniform(lo, hi)
        near = np.flatnonzero(np.abs(bits - beta) <= 0.75)
        if misses >= MAX_NEAR_MISSES or not len(near):  # the bit band is exhausted: draw from the whole space
            near = np.arange(len(bits))
        flat = _draw_near(g, near, allowed)
        x = flat_to_encoded(space, flat)
        if x.tobytes() in seen:
            misses += 1
            continue
        seen.add(x.tobytes())
        out.append((f"unseen {len(out) - len(cfg.evaluation.targets) + 1}", x))
    return out + _ilp_unseen(cfg, space, costs, numels, seen)


def _ilp_unseen(cfg: RunConfig, space: SearchSpace, costs: np.ndarray, numels: list[int],
                seen: set[bytes]) -> list[tuple[str, np.ndarray]]:
    """``evaluation.unseen_ilp`` configurations drawn the way the pool is built, at budgets the pool did not use:
    the ILP allocation at a seeded random budget in [search.budget_min, search.budget_max], never a configuration
    already evaluated or trained on. Fewer (with a warning) when the ILP has no more distinct allocations there."""
    wanted = cfg.evaluation.unseen_ilp
    g = np.random.default_rng(np.random.SeedSequence([cfg.run.seed, PURPOSE_UNSEEN_ILP]))
    out: list[tuple[str, np.ndarray]] = []
    misses = 0
    while len(out) < wanted and misses < MAX_ILP_MISSES:
        x = flat_to_encoded(space, solve_allocation(space, costs, numels,
                                                    g.uniform(cfg.search.budget_min, cfg.search.budget_max)))
        if x.tobytes() in seen:
            misses += 1
            continue
        misses = 0
        seen.add(x.tobytes())
        out.append((f"{ILP_UNSEEN} {len(out) + 1}", x))
    if len(out) < wanted:
        warnings.warn(f"evaluation.unseen_ilp = {wanted}: the ILP gives only {len(out)} allocation(s) in "
                      f"[{cfg.search.budget_min}, {cfg.search.budget_max}] bits besides the pool and the targets; "
                      "evaluating those", stacklevel=2)
    return out


@dataclass
class Finish:
    """The final phase of one run. ``bar`` makes a progress bar, ``put`` shares a value with the workers once."""

    cfg: RunConfig
    space: SearchSpace
    numels: list[int]
    allowed: np.ndarray  # (N, n_settings): the settings each target matrix can take
    executor: Executor
    ledger: Ledger
    train_config: TrainConfig
    shards: Callable[[int], list[list[int]]]  # a step's training examples, one shard per worker (the run's order)
    bar: Callable[[int, str], tqdm]
    put: Callable[[Any], Any]
    examples_path: Path  # where every example's scores go (final/examples.safetensors)
    curves: dict[str, list[float]] = field(default_factory=dict)  # method → training loss per step, as trained here

    def _initial_state(self) -> dict[str, torch.Tensor]:
        """The θ-free replica's start, by CoA-LoRA's init: with projq-shared, over the same initial pool (the
        ledger's, so a resumed run rebuilds the same start)."""
        if self.cfg.adapter.init != SHARED_INIT:
            return self.executor.call("initial_state", "shared")
        (entry,) = [e for e in self.ledger.entries(strict=False) if e["kind"] == "initial_pool"]
        return self.executor.call("shared_init", "shared", [unkey(k) for k in entry["configs"]])[0]

    def _train_plain(self, method: str, desc: str, steps: int,
                     configurations_of: Callable[[int], list[np.ndarray]]) -> dict[str, torch.Tensor]:
        """The θ-free replica trained for ``steps`` steps on the run's data order and learning-rate schedule, with
        step ``s``'s configurations from ``configurations_of(s)``; its loss per step kept in ``curves[method]``."""
        init = self._initial_state()
        master = MasterState(init, {n for n in init if n.endswith("bias")}, self.train_config)
        losses = []
        with self.bar(steps, desc) as bar:
            for step in range(steps):
                ref, configs = self.put(master.state()), configurations_of(step)
                results = self.executor.map("gradients", [("shared", ref, s, configs) for s in self.shards(step)])
                loss, grads, _ = weighted_mean(results)
                master.step(grads)
                losses.append(float(loss))
                bar.update(1)
        self.curves[method] = losses
        return master.state()

    def train_shared(self, targets: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Shared-LoRA: one plain LoRA (θ off, CoA-LoRA's init), one target configuration drawn per step."""
        seed = self.cfg.run.seed

        def one_target(step: int) -> list[np.ndarray]:
            return [targets[int(torch.randint(len(targets), (1,), generator=seeded(seed, PURPOSE_SHARED, step)))]]

        return self._train_plain("shared-lora", "baseline: shared-lora", self.train_config.total_steps, one_target)

    def train_no_theta(self) -> dict[str, torch.Tensor]:
        """coa-no-theta: CoA-LoRA's run replayed step for step (each round's training set as the ledger recorded
        it, the same K configurations per step, the same data and init) with θ off, M = I. The difference to
        CoA-LoRA is what θ adds."""
        t = self.cfg.training
        sets = {e["round"]: [unkey(k) for k in e["training_set"]]
                for e in self.ledger.entries(strict=False) if e["kind"] == "round_end"}

        def replayed(step: int) -> list[np.ndarray]:
            return step_configurations(sets[step // t.steps_per_round], step, seed=self.cfg.run.seed,
                                       k=t.configs_per_step, sampling=t.config_sampling, space=self.space,
                                       numels=self.numels)

        return self._train_plain("coa-no-theta", "ablation: coa-no-theta", self.cfg.search.rounds * t.steps_per_round,
                                 replayed)

    def _write_curves(self) -> None:
        """final/curves.json: the run's loss per step (the ledger's rounds, in order) and each baseline's."""
        run = [v for e in self.ledger.entries(strict=False) if e["kind"] == "trained" for v in e.get("losses", [])]
        curves = {RUN_METHOD[self.cfg.adapter.kind]: run, **self.curves}
        write_json_atomic(self.examples_path.parent / CURVES_FILE, curves)

    def evaluate(self, state: dict[str, torch.Tensor], costs: np.ndarray, pool: list[np.ndarray]) -> list[dict]:
        """Every method on every evaluation configuration, on the same validation examples; one ledger entry each."""
        configs = evaluation_configurations(self.cfg, self.space, costs, self.numels, self.allowed, pool)
        targets = [x for name, x in configs if name.startswith("target")]
        baselines = self.cfg.evaluation.baselines
        methods: dict[str, tuple[str, Any, bool]] = {RUN_METHOD[self.cfg.adapter.kind]: ("main", state, True)}
        if "no_adapter" in baselines:  # quant(W) alone: an init that quantizes W − L has its own zero-B replica
            methods["no-adapter"] = ("bare" if self.cfg.adapter.quantizes_residual else "main", None, False)
        if "shared_lora" in baselines:
            methods["shared-lora"] = ("shared", self.train_shared(targets), True)
        if "no_theta" in baselines:
            methods["coa-no-theta"] = ("shared", self.train_no_theta(), True)
        self._write_curves()
        calls, labels = [], []
        for method, (replica, st, adapter) in methods.items():
            ref = self.put(st) if st is not None else None
            for name, x in configs:
                calls.append((replica, ref, x, adapter))
                labels.append((method, name, x))
        with self.bar(len(calls), "final evaluation") as bar:
            results = self.executor.map("evaluate_examples", calls)
            bar.update(len(calls))
        examples = {f"{method}|{name}": scores.contiguous() for (method, name, _), (_, scores) in zip(labels, results)}
        write_atomic(self.examples_path, save(examples))
        rows = []
        for (method, name, x), (metrics, _) in zip(labels, results):
            bits = float(self.space.encoded_average_bits(x, self.numels))
            metrics = finite_or_none(dict(metrics))  # a collapsed configuration's perplexity may overflow
            rows.append({"method": method, "configuration": name, "avg_bits": bits, **metrics})
            self.ledger.append("final", method=method, configuration=name, config=key(x), avg_bits=bits,
                               metrics=metrics)
        commit_point("final")
        return rows


def write_final(cfg: RunConfig, out: Path, rows: list[dict[str, Any]], tracker: Tracker | None) -> None:
    """final/evaluation.json, .md and .png and the training loss curves (curves.png, from curves.json) under
    ``out``; in MLflow, those and one child run per method."""
    metric = "accuracy" if cfg.model.task == "classification" else "perplexity"
    write_json_atomic(out / "evaluation.json", rows)
    saved = load((out / EXAMPLES_FILE).read_bytes())  # keyed "method|configuration", in no particular order
    scores = {(r["method"], r["configuration"]): saved[f"{r['method']}|{r['configuration']}"].numpy() for r in rows}
    differences = paired.paired_table(scores, RUN_METHOD[cfg.adapter.kind],
                                      "classification" if metric == "accuracy" else "causal-lm")
    write_json_atomic(out / "paired.json", differences)
    columns = ["method", "configuration", "avg_bits", metric, "loss"]
    (out / "evaluation.md").write_text(report.markdown_table(rows, columns) + "\n\n" + paired.markdown(differences))
    report.evaluation_plot(rows, metric, out / "evaluation.png")
    curves = json.loads((out / CURVES_FILE).read_text())
    report.loss_curves_plot({m: c for m, c in curves.items() if c}, out / "curves.png",
                            f"training loss per step ({cfg.run.name})")
    if tracker is None:
        return
    for name in ("evaluation.png", "evaluation.md", "evaluation.json", "paired.json", CURVES_FILE, "curves.png"):
        tracker.log_artifact(out / name, "final")
    by_method: dict[str, dict[str, float]] = {}
    for row in rows:
        tag = row["configuration"].replace(" ", "_")
        by_method.setdefault(row["method"], {})[f"{tag}.{metric}"] = row[metric]
    for method, metrics in by_method.items():
        means = [v for k, v in metrics.items() if k.startswith("target") and v is not None]
        metrics[f"mean_target_{metric}"] = float(np.mean(means)) if means else float("nan")
        tracker.log_metrics(metrics, step=cfg.search.rounds, child=method)
        tracker.end_child(method)
