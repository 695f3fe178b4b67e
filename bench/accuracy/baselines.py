"""QLoRA (on RTN codes, on GPTQ codes, with ProjQ's init) and LQ-LoRA once per configuration (and the references:
QLoRA at CoA-LoRA's total budget, LoRA on the unquantized base), on one worker built from the run's own spec, in this
process or spread over Ray actors: every training is a pure function of (method, configuration). Each records its
step-0 error-compensation loss (how much of round-to-nearest's output error its init leaves)."""

from __future__ import annotations

import copy
import sys
import time
import warnings
from dataclasses import replace
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from orchestrator.config import RunConfig
from orchestrator.executor import init_ray
from orchestrator.loop.optim import MasterState, train_config, weighted_mean
from orchestrator.runs import worker_spec
from orchestrator.loop.schedule import batch_ids
from workers.adapters.lora import LoRAModel
from workers.allocator import actor_options, preload_library
from workers.baselines import lq_lora, projq_lora
from workers.fisher import layer_fisher
from workers.training import TrainConfig
from workers.worker import Worker, build_task


class Outcome(NamedTuple):
    """One per-configuration training: validation metrics and per-example scores, the training loss per step, the
    seconds spent training (an LQ-LoRA / ProjQ init included) and evaluating, and the step-0 compensation error
    (None on the unquantized base)."""

    metrics: dict[str, float]
    scores: torch.Tensor
    losses: list[float]
    train_s: float
    eval_s: float
    init_error: float | None


def equal_budget_steps(total_steps: int, targets: int) -> int:
    """qlora-budget's steps per target: the targets share CoA-LoRA's total steps (at least one each)."""
    return max(1, total_steps // targets)


class Baselines:
    """QLoRA and LQ-LoRA on one worker built from the run's own spec: same data, same validation batches, same
    gradient code, same optimizer and data order as the driver's Shared-LoRA loop. QLoRA on GPTQ codes runs on a
    second worker, built the same way with ``quant.method = gptq`` (its Σ from the run's calibration examples)."""

    def __init__(self, cfg: RunConfig, opts: Mapping[str, Any]):
        self.cfg, self.opts = cfg, opts
        self.spec = worker_spec(cfg)
        self.worker = Worker(self.spec)  # holds "main" and "shared" (plain LoRA, B = 0: the QLoRA starting point)
        self.train_config = train_config(cfg, configs_per_step=1)
        self.total_steps = self.train_config.total_steps
        self._base = None
        self._fisher = None
        # now, before any evaluate() loads a trained state: the untrained model's Fisher, as the cost table uses
        self._fisher_weights()
        self._gptq_worker: Worker | None = None

    def _train(self, method: str, init: Mapping[str, torch.Tensor], x: np.ndarray,
               config: TrainConfig | None = None, worker: Worker | None = None
               ) -> tuple[dict[str, torch.Tensor], list[float]]:
        """``config.total_steps`` AdamW steps (default: CoA-LoRA's whole run) on configuration ``x`` alone (None:
        the unquantized base) from ``init``; the driver's batch order. Returns the state and the loss per step."""
        w, cfg = worker or self.worker, self.cfg
        config = config or self.train_config
        master = MasterState(init, w.models[method].no_decay_names(), config)
        losses = []
        for step in range(config.total_steps):
            ids = batch_ids(cfg.run.seed, w.n_train(), cfg.data.batch_size, step)
            loss, grads, _ = weighted_mean([w.gradients(method, master.state(), ids, [x])])
            master.step(grads)
            losses.append(float(loss))
        return master.state(), losses

    def _evaluated(self, method: str, state: Mapping[str, torch.Tensor], x: np.ndarray | None, losses: list[float],
                   train_s: float, init_error: float | None, worker: Worker | None = None) -> Outcome:
        t0 = time.perf_counter()
        metrics, scores = (worker or self.worker).evaluate_examples(method, state, x)
        return Outcome(metrics, scores, losses, train_s, time.perf_counter() - t0, init_error)

    def qlora(self, x: np.ndarray | None, worker: Worker | None = None, config: TrainConfig | None = None) -> Outcome:
        """QLoRA on configuration ``x`` from the worker's built plain LoRA (B = 0)."""
        w = worker or self.worker
        init = w.initial_state("shared")
        init_error = None if x is None else w.compensation_error("shared", init, x)
        t0 = time.perf_counter()
        state, losses = self._train("shared", init, x, config=config, worker=w)
        return self._evaluated("shared", state, x, losses, time.perf_counter() - t0, init_error, w)

    def qlora_budget(self, x: np.ndarray) -> Outcome:
        """QLoRA at equal total budget: the targets share CoA-LoRA's total steps, so each gets total / targets
        steps (at least 1), its warmup shrunk in proportion; everything else as :meth:`qlora`."""
        share = len(self.cfg.evaluation.targets)
        config = replace(self.train_config, total_steps=equal_budget_steps(self.total_steps, share),
                         warmup_steps=self.train_config.warmup_steps // share)
        return self.qlora(x, config=config)

    def lora_fp(self, x: None = None) -> Outcome:
        """The ceiling: plain LoRA (B = 0) trained and evaluated on the unquantized base, as many steps as QLoRA."""
        return self.qlora(None)

    def qlora_gptq(self, x: np.ndarray) -> Outcome:
        """:meth:`qlora` with GPTQ's codes instead of rounding's: same scales and bytes, the same initial adapter
        (same seed), the same steps and data order."""
        if self._gptq_worker is None:
            self._gptq_worker = Worker(replace(self.spec, quant_method="gptq"))
        return self.qlora(x, self._gptq_worker)

    def _fisher_weights(self) -> dict[str, torch.Tensor] | None:
        if not self.opts["lq_fisher"]:
            return None
        if self._fisher is None:  # the cost table's estimate (same examples, full-precision W), on the QLoRA replica
            w = self.worker
            single = [w.collate([item]) for item in w.train_items[: self.spec.fisher_examples]]
            self._fisher = layer_fisher(w.models["shared"], single, self.spec.fisher_examples)
        return self._fisher

    def _fresh_base(self) -> torch.nn.Module:
        """A fresh, unwrapped copy of the base, built exactly as the worker built its own."""
        if self._base is None:
            torch.manual_seed(self.spec.seed)
            self._base = build_task(self.spec).model
        return copy.deepcopy(self._base)

    def _train_initialised(self, build: Callable[[], LoRAModel], x: np.ndarray, lora_lr: float | None) -> Outcome:
        """Train and evaluate the model ``build()`` returns (an init bound to configuration ``x``), its LoRA factors
        at ``lora_lr`` when given; the init's time counts as training."""
        t0 = time.perf_counter()
        model = build()
        model.eval()
        self.worker.models["init"] = model
        try:
            init_error = self.worker.compensation_error("init", None, x)
            config = None if lora_lr is None else replace(self.train_config, lora_lr=float(lora_lr))
            state, losses = self._train("init", model.trainable_state(), x, config)
            return self._evaluated("init", state, x, losses, time.perf_counter() - t0, init_error)
        finally:
            del self.worker.models["init"]

    def lq_lora(self, x: np.ndarray) -> Outcome:
        """LQ-LoRA: the faithful LQ decomposition of each matrix under ``x``, its factors at ``bench.lq_lora_lr``."""
        fisher = self._fisher_weights()
        return self._train_initialised(
            lambda: lq_lora(self._fresh_base(), self.worker.space, self.worker.space.decode(x), rank=self.spec.rank,
                            alpha=self.spec.alpha, iterations=int(self.opts["lq_iterations"]), fisher=fisher,
                            seed=self.spec.seed),
            x, self.opts.get("lq_lora_lr"))

    def qlora_projq(self, x: np.ndarray) -> Outcome:
        """QLoRA with ProjQ's init: codes shaped under the run's calibration Σ, B and A the whitened-SVD correction
        of what remains; then QLoRA's training (the shared rate: the factors start as a correction, as LQ-LoRA's
        do, so ``bench.lq_lora_lr`` applies to them too)."""
        covariances = self.worker.covariances()
        return self._train_initialised(
            lambda: projq_lora(self._fresh_base(), self.worker.space, self.worker.space.decode(x), covariances,
                               rank=self.spec.rank, alpha=self.spec.alpha,
                               iterations=int(self.opts["projq_iterations"]), seed=self.spec.seed),
            x, self.opts.get("lq_lora_lr"))



class BaselineReplica:
    """One process's :class:`Baselines`; ``run`` trains and evaluates one (method, configuration) pair."""

    def __init__(self, cfg_json: Mapping[str, Any], opts: Mapping[str, Any]):
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        self.baselines = Baselines(RunConfig.model_validate(cfg_json), opts)

    def run(self, method: str, x: np.ndarray | None) -> Outcome:
        train = {"qlora": self.baselines.qlora, "qlora-gptq": self.baselines.qlora_gptq,
                 "qlora-projq": self.baselines.qlora_projq, "lq-lora": self.baselines.lq_lora,
                 "qlora-budget": self.baselines.qlora_budget, "lora-fp": self.baselines.lora_fp}
        return train[method](x)



def run_baselines(cfg: RunConfig, opts: Mapping[str, Any], calls: Sequence[tuple[str, str, np.ndarray | None]],
                  log) -> list[Outcome]:
    """Every per-configuration training, in ``calls`` order. With ``cluster.executor = ray`` they spread over
    ``cluster.workers`` Ray actors (``cpus_per_worker`` CPUs each, the same processes budget as the CoA-LoRA run);
    else they run here one after another. Each training is a pure function of (method, configuration): seeded data
    order and initialisation, fixed base; so the numbers do not depend on where or with how many replicas it ran."""
    if cfg.cluster.executor == "local" or cfg.cluster.workers == 1:
        replica = BaselineReplica(cfg.model_dump(mode="json"), opts)
        out = []
        for method, cname, x in calls:
            log(f"[{cfg.run.name}] {method} on {cname}")
            out.append(replica.run(method, x))
        return out
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # bench/ is not installed: ship it by value
    init_ray(cfg.cluster.address, None)  # started by the CoA-LoRA run already unless it ran in-process
    preload = preload_library(cfg.training.allocator)  # the same allocator as the run's workers
    actor = ray.remote(num_cpus=cfg.cluster.cpus_per_worker, num_gpus=cfg.cluster.gpus_per_worker,
                       **actor_options(preload))(BaselineReplica)
    replicas = [actor.remote(cfg.model_dump(mode="json"), dict(opts)) for _ in range(cfg.cluster.workers)]
    try:
        refs = [replicas[i % len(replicas)].run.remote(method, x) for i, (method, _, x) in enumerate(calls)]
        out = []
        for (method, cname, _), ref in zip(calls, refs):
            out.append(ray.get(ref))
            log(f"[{cfg.run.name}] {method} on {cname}: done")
        return out
    finally:
        for r in replicas:
            ray.kill(r)
