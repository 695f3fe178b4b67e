"""How much could θ add? An oracle for CoA-LoRA's configuration encoder, on a finished run (issue 12).

θ changes a configuration's adapter only through M, one r×r matrix per target matrix between A and B
(B·M·A). Our benchmarks find θ inert: CoA-LoRA − coa-no-theta stays within a point (docs/theta.md). This bench
asks whether that is θ's training or the room θ has. It takes a finished run's trained state, freezes A, B, the
heads and θ, and fits M itself by Adam on the training examples:

- **per-configuration M**: one M per target matrix for each target configuration alone, started from θ's output
  for that configuration. No network could do better on that configuration with this A and B: it is the most a
  perfect θ could give;
- **shared M** (the control): one M per target matrix for all the targets together, started from the mean of θ's
  outputs, fitted on the same batches with the same number of gradient evaluations per configuration.

With ``--free factors`` the fits also move A and B (every target's LoRA pair, the heads still frozen): the
per-configuration fit is then a LoRA fine-tuned for that configuration from the run's state, the ceiling of any
configuration-aware adapter at this rank and step count, not only of one built on M.

With ``--free theta`` the question is whether θ itself can be trained to reach that room once A and B stop moving:
θ is refitted (everything else frozen) on the run's last training set, K configurations per step drawn as the run
drew them, and judged on the targets and unseen configurations it never trained on, against the control of one
shared M fitted on the same draws (what the same extra steps give without any dependence on the configuration).

per-configuration − shared is what making M (or the adapter) depend on the configuration is worth; shared − the run's own
CoA-LoRA is what further training of M alone is worth (the part any shared adapter could learn as well). Both are
paired on the run's validation examples with 95% intervals over the examples (orchestrator.loop.paired). The run's
own CoA-LoRA is evaluated again first and must reproduce its ledger's final accuracy exactly, or the bench stops.

    .venv/bin/python bench/theta_oracle.py RUN_DIR --steps 60 --lr 3e-3 [--free factors|theta] --out docs/theta/oracle

RUN_DIR is a finished ``coalora run`` of ``adapter.kind: coa`` on a classification or language-modelling task
(bench.accuracy keeps its runs under ``<out>/results/work/``). Writes ``<out>/<run name>[-factors].json`` and prints it
as the last line (one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator.config import ConfigError  # noqa: E402
from orchestrator.loop.paired import paired_difference  # noqa: E402
from orchestrator.loop.schedule import batch_ids, step_configurations, unkey  # noqa: E402
from orchestrator.runs import load_run_config, worker_spec  # noqa: E402
from orchestrator.state import CheckpointStore, Ledger, write_json_atomic  # noqa: E402
from workers.adapters.coa import CoAModel, theta_spread  # noqa: E402
from workers.tasks import evaluate_examples  # noqa: E402
from workers.training import ENCODER_PREFIX  # noqa: E402
from workers.worker import Worker  # noqa: E402

MAIN = "coa-lora"
FREE = {"M": "M", "factors": "A, B, M", "theta": "θ"}
"""What the oracle's fits move (``--free``), and how its rows are named."""
OBJECTIVES = ("mean", "log")
"""What θ's refit minimises each step over its K configurations: the mean of their losses (the run's objective),
or the mean of their logarithms, so that a configuration with a loss four times the others' (a collapsed one)
weighs as much as they do instead of four times more: ∇log L = ∇L / L."""
REPRODUCE_TOLERANCE = 1e-9


# ---- the run ----------------------------------------------------------------------------------------------------
def load_run(run_dir: Path, *, unseen: bool = False) -> tuple[Any, Worker, list[dict[str, Any]]]:
    """(config, a worker holding the run's replica with its last checkpoint's trainable state, the ledger's final
    CoA-LoRA rows of the targets, and of the unseen configurations too with ``unseen``); a clear error for a run
    this bench cannot read."""
    cfg = load_run_config(run_dir)
    if cfg.adapter.kind != "coa":
        raise ConfigError(f"{run_dir} is an adapter.kind {cfg.adapter.kind!r} run: the oracle fits CoA-LoRA's M")
    finals = [r for r in Ledger(run_dir / "ledger.jsonl").entries() if r.get("kind") == "final" and r.get("method") == MAIN]
    targets = [r for r in finals if r["configuration"].startswith("target")]
    targets += [r for r in finals if unseen and not r["configuration"].startswith("target")]
    if not targets:
        raise ConfigError(f"{run_dir} has no final CoA-LoRA rows at its targets: is the run finished?")
    ckpt = CheckpointStore(run_dir / "checkpoints").load_latest()
    if ckpt is None:
        raise ConfigError(f"{run_dir} has no valid checkpoint")
    worker = Worker(replace(worker_spec(cfg), device="cpu", methods=("main",)))
    worker.models["main"].load_trainable_state(ckpt.tensors["trainable"])
    return cfg, worker, targets


# ---- M as the free parameter ------------------------------------------------------------------------------------
def use_mixing(model: CoAModel, table: dict[str, torch.Tensor]) -> None:
    """Make ``model`` take each configuration's M from ``table`` (key: the configuration's settings, as text)
    instead of θ: every evaluation and forward pass of the model then uses the fitted matrices."""
    model.mixing_matrices = lambda settings: table[repr(list(settings))]  # type: ignore[method-assign]


def factor_names(model: CoAModel) -> list[str]:
    """Every target's LoRA pair: what ``--free factors`` fits besides M."""
    return [n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]


@contextmanager
def with_parameters(model: CoAModel, values: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Within the block the model's parameters named in ``values`` (LoRA pairs, θ's tensors; None: none) hold
    those values; the run's are restored after."""
    params = dict(model.named_parameters())
    kept = {n: params[n].detach().clone() for n in (values or {})}
    with torch.no_grad():
        for n, value in (values or {}).items():
            params[n].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, value in kept.items():
                params[n].copy_(value)


def run_batch(worker: Worker, seed: int, batch_size: int, step: int) -> dict[str, torch.Tensor]:
    """The training batch the run itself took at global ``step`` (its seed's permutation of the examples)."""
    return worker.collate([worker.train_items[i] for i in batch_ids(seed, len(worker.train_items), batch_size, step)])


def _adam(model: CoAModel, moved: Sequence[torch.Tensor], step_loss: Callable[[int], torch.Tensor], *, steps: int,
          lr: float, seed: int) -> list[float]:
    """Adam on ``moved`` alone for ``steps`` steps of ``step_loss(step)``, every other trainable tensor of the model
    frozen (and trainable again after), dropout seeded with ``seed``; the step losses."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in moved:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(moved, lr=lr)
    torch.manual_seed(seed)  # dropout
    model.train()
    losses: list[float] = []
    try:
        for step in range(steps):
            loss = step_loss(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for p in moved:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return losses


def fit(model: CoAModel, worker: Worker, configurations: Sequence[list], start: torch.Tensor, *, steps: int, lr: float,
        seed: int, batch_size: int, factors: bool = False
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, list[float]]:
    """Adam on one (N, r, r) M from ``start`` (and, with ``factors``, on every LoRA pair from the run's values), the
    other trainable tensors frozen; each step takes the same batch for every configuration of ``configurations``
    and the mean of their losses. Returns M, the fitted pairs (None without ``factors``; the model keeps its own)
    and the step losses."""
    mixing = start.detach().clone().requires_grad_(True)
    params = dict(model.named_parameters())
    moved = factor_names(model) if factors else []

    def step_loss(step: int) -> torch.Tensor:
        batch = run_batch(worker, seed, batch_size, step)
        return torch.stack([_loss(model, settings, mixing, batch) for settings in configurations]).mean()

    with with_parameters(model, {n: params[n].detach() for n in moved}):  # the run's pairs restored after
        losses = _adam(model, [mixing, *(params[n] for n in moved)], step_loss, steps=steps, lr=lr, seed=seed)
        fitted = {n: params[n].detach().clone() for n in moved} if factors else None
    return mixing.detach(), fitted, losses


def training_set(run_dir: Path) -> list[np.ndarray]:
    """The configurations (encoded) the run's last round trained on."""
    rounds = [e for e in Ledger(run_dir / "ledger.jsonl").entries() if e.get("kind") == "round_end"]
    if not rounds or not rounds[-1].get("training_set"):
        raise ConfigError(f"{run_dir}: the ledger records no training set")
    return [np.asarray(unkey(k)) for k in rounds[-1]["training_set"]]


def fit_theta(model: CoAModel, worker: Worker, pool: Sequence[np.ndarray], cfg: Any, *, steps: int, lr: float,
              shared_start: torch.Tensor | None = None, objective: str = "mean"
              ) -> tuple[dict[str, torch.Tensor] | torch.Tensor, list[float]]:
    """Adam on θ's parameters, everything else frozen, or with ``shared_start`` on one (N, r, r) M from it instead
    (the control): each step the ``objective`` (:data:`OBJECTIVES`) of the losses of the K configurations the run's
    own schedule draws from ``pool`` (its seed and sampling) on the run's batches, the same draws for both. Returns
    θ's fitted parameters (or the shared M) and the step losses; the model keeps the run's θ. θ's parameters are
    named as the model names them (``encoder.…``), ready for :func:`with_parameters`."""
    encoder = {n: p for n, p in model.named_parameters() if n.startswith(ENCODER_PREFIX)}
    mixing = None if shared_start is None else shared_start.detach().clone().requires_grad_(True)
    t = cfg.training

    def step_loss(step: int) -> torch.Tensor:
        batch = run_batch(worker, cfg.run.seed, cfg.data.batch_size, step)
        drawn = step_configurations(pool, step, seed=cfg.run.seed, k=t.configs_per_step, sampling=t.config_sampling,
                                    space=worker.space, numels=worker.numels())
        settings = [worker.space.decode(x) for x in drawn]
        per_config = torch.stack([_loss(model, s, model.mixing_matrices(s) if mixing is None else mixing, batch)
                                  for s in settings])
        return (per_config if objective == "mean" else per_config.log()).mean()

    with with_parameters(model, {n: p.detach() for n, p in encoder.items()}):  # the run's θ restored after
        losses = _adam(model, [mixing] if mixing is not None else list(encoder.values()), step_loss, steps=steps,
                       lr=lr, seed=cfg.run.seed)
        fitted = mixing.detach() if mixing is not None else {n: p.detach().clone() for n, p in encoder.items()}
    return fitted, losses


def _loss(model: CoAModel, settings: list, mixing: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.set_configuration(settings, mixing=mixing)
    return model.model(**batch).loss


def _progress(losses: Sequence[float]) -> str:
    return f"training loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no steps: θ's output as is"


class Judged:
    """Each method's value, validation loss (also for classification) and per-example scores on the configurations
    it is judged on, in the order evaluated."""

    def __init__(self, model: CoAModel, worker: Worker, metric: str, methods: Sequence[str]):
        self.model, self.worker, self.metric = model, worker, metric
        self.values: dict[str, list[float]] = {m: [] for m in methods}
        self.losses: dict[str, list[float]] = {m: [] for m in methods}
        self.scores: dict[str, list[np.ndarray]] = {m: [] for m in methods}

    def evaluate(self, method: str, settings: list) -> float:
        """``method``'s value on the configuration ``settings`` (the model as it is now), recorded."""
        metrics, example_scores = evaluate_examples(self.model, settings, self.worker.val_batches)
        self.values[method].append(float(metrics[self.metric]))
        self.losses[method].append(float(metrics["loss"]))
        self.scores[method].append(example_scores.numpy())
        return float(metrics[self.metric])

    def reproduce(self, names: Sequence[str], settings: Sequence[list], rows: Sequence[Mapping[str, Any]]) -> None:
        """The run's own CoA-LoRA on each of its ledger rows, recorded; it must give the ledger's value, or the
        replica is not the run's and nothing fitted on it would mean anything."""
        for name, s, row in zip(names, settings, rows):
            value = self.evaluate(MAIN, s)
            if abs(value - row["metrics"][self.metric]) > REPRODUCE_TOLERANCE:
                raise RuntimeError(f"{name}: the run's CoA-LoRA gives {self.metric} {value} here and "
                                   f"{row['metrics'][self.metric]} in its ledger; the replica is not the run's")


# ---- the comparison ---------------------------------------------------------------------------------------------
def oracle(run_dir: Path, *, steps: int, lr: float, free: str = "M", log=print) -> dict[str, Any]:
    """The comparison above; ``free``: what the fits move, ``"M"`` or ``"factors"`` (A, B and M); θ's refit is
    :func:`refit`."""
    if free not in ("M", "factors"):
        raise ValueError(f"free must be 'M' or 'factors' (θ's refit is refit()), got {free!r}")
    label = FREE[free]
    cfg, worker, target_rows = load_run(run_dir)
    model = worker.models["main"]
    kind = "classification" if cfg.model.task == "classification" else "causal-lm"
    metric = "accuracy" if kind == "classification" else "loss"
    names = [r["configuration"] for r in target_rows]
    settings = [worker.space.decode(unkey(r["config"])) for r in target_rows]
    with torch.no_grad():
        theta = [model.mixing_matrices(s).detach().clone() for s in settings]
    spread = {"theta": theta_spread(model, settings)["theta_spread"]}

    own, shared_name = f"per-configuration {label}", f"shared {label}"
    judged = Judged(model, worker, metric, ["coa-lora", own, shared_name])
    judged.reproduce(names, settings, target_rows)
    evaluate, values, losses, scores = judged.evaluate, judged.values, judged.losses, judged.scores
    t0 = time.perf_counter()
    fitted, curves = [], {}
    for name, s, start in zip(names, settings, theta):
        m, pairs, curves[name] = fit(model, worker, [s], start, steps=steps, lr=lr, seed=cfg.run.seed,
                                     batch_size=cfg.data.batch_size, factors=free == "factors")
        fitted.append((m, pairs))
        log(f"{own}, {name}: {_progress(curves[name])}")
    m, pairs, curves["shared"] = fit(model, worker, settings, torch.stack(theta).mean(0), steps=steps, lr=lr,
                                     seed=cfg.run.seed, batch_size=cfg.data.batch_size, factors=free == "factors")
    log(f"{shared_name}: {_progress(curves['shared'])}")
    minutes = (time.perf_counter() - t0) / 60
    use_mixing(model, {repr(list(s)): m for s, (m, _) in zip(settings, fitted)})
    spread["per-configuration M"] = theta_spread(model, settings)["theta_spread"]  # the fitted M's, as θ's above
    for method, tables in ((own, fitted), (shared_name, [(m, pairs)] * len(settings))):
        for s, (mixing, factors) in zip(settings, tables):
            use_mixing(model, {repr(list(s)): mixing})
            with with_parameters(model, factors):
                evaluate(method, s)
    del model.mixing_matrices  # θ again

    compared = {f"{own} − {shared_name}": (own, shared_name), f"{shared_name} − coa-lora": (shared_name, "coa-lora"),
                f"{own} − coa-lora": (own, "coa-lora")}
    paired = {title: {**{name: paired_difference([scores[a][i]], [scores[b][i]], kind)
                         for i, name in enumerate(names)},
                      "all targets": paired_difference(scores[a], scores[b], kind)}
              for title, (a, b) in compared.items()}
    return {"bench": "theta_oracle", "run": str(run_dir), "run_name": cfg.run.name, "metric": metric,
            "steps": steps, "lr": lr, "free": free, "rank": cfg.adapter.rank, "targets": names,
            "values": values, "validation_loss": losses, "paired": paired, "fit_minutes": round(minutes, 2),
            "spread": spread,
            "curves": curves}


def refit(run_dir: Path, *, steps: int, lr: float, objective: str = "mean", log=print) -> dict[str, Any]:
    """``--free theta``: θ refitted on the run's training set with A, B and the heads frozen, against one shared M
    fitted on the same draws, both judged (with the run's own CoA-LoRA, which must reproduce) on every target and
    unseen configuration the run evaluated, and on the training configurations themselves ("train i", on the
    held-out examples): a refit that helps there and not elsewhere memorised its configurations."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    cfg, worker, rows = load_run(run_dir, unseen=True)
    model = worker.models["main"]
    kind = "classification" if cfg.model.task == "classification" else "causal-lm"
    metric = "accuracy" if kind == "classification" else "loss"
    names = [r["configuration"] for r in rows]
    settings = [worker.space.decode(unkey(r["config"])) for r in rows]
    pool = training_set(run_dir)
    own, control = "refit θ", "shared M"
    judged = Judged(model, worker, metric, ["coa-lora", own, control])
    judged.reproduce(names, settings, rows)
    evaluate, values, losses, scores = judged.evaluate, judged.values, judged.losses, judged.scores
    pool_settings = [worker.space.decode(x) for x in pool]
    for i, s in enumerate(pool_settings, 1):  # no ledger row to reproduce: the run never judged its training set
        names.append(f"train {i}")
        settings.append(s)
        evaluate("coa-lora", s)
    never_trained = settings[: len(rows)]  # the targets and unseen configurations
    spread = {"theta (training set)": theta_spread(model, pool_settings)["theta_spread"],
              "theta (evaluated)": theta_spread(model, never_trained)["theta_spread"]}
    with torch.no_grad():
        start = torch.stack([model.mixing_matrices(s) for s in pool_settings]).mean(0)
    t0 = time.perf_counter()
    theta, curves_own = fit_theta(model, worker, pool, cfg, steps=steps, lr=lr, objective=objective)
    log(f"{own} on {len(pool)} training configurations: {_progress(curves_own)}")
    shared, curves_shared = fit_theta(model, worker, pool, cfg, steps=steps, lr=lr, shared_start=start,
                                      objective=objective)
    log(f"{control} on the same draws: {_progress(curves_shared)}")
    minutes = (time.perf_counter() - t0) / 60
    with with_parameters(model, theta):
        spread["refit θ (training set)"] = theta_spread(model, pool_settings)["theta_spread"]
        spread["refit θ (evaluated)"] = theta_spread(model, never_trained)["theta_spread"]
        for s in settings:
            evaluate(own, s)
    use_mixing(model, {repr(list(s)): shared for s in settings})
    for s in settings:
        evaluate(control, s)
    del model.mixing_matrices  # θ again

    groups = [(n, [i]) for i, n in enumerate(names)]
    for label, prefix in (("all targets", "target"), ("all unseen", "unseen"), ("all ilp-unseen", "ilp-unseen"),
                          ("all train", "train")):
        members = [i for i, n in enumerate(names) if n.startswith(prefix)]
        if len(members) > 1:
            groups.append((label, members))
    compared = {f"{own} − {control}": (own, control), f"{own} − coa-lora": (own, "coa-lora"),
                f"{control} − coa-lora": (control, "coa-lora")}
    paired = {title: {label: paired_difference([scores[a][i] for i in members], [scores[b][i] for i in members], kind)
                      for label, members in groups}
              for title, (a, b) in compared.items()}
    return {"bench": "theta_oracle", "run": str(run_dir), "run_name": cfg.run.name, "metric": metric,
            "steps": steps, "lr": lr, "free": "theta", "objective": objective, "rank": cfg.adapter.rank, "configurations": names,
            "training_set": len(pool), "values": values, "validation_loss": losses, "paired": paired,
            "fit_minutes": round(minutes, 2), "spread": spread,
            "curves": {own: curves_own, control: curves_shared}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished coalora run of adapter.kind coa")
    ap.add_argument("--steps", type=int, default=60, help="Adam steps per fit (default 60)")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate of M (default 3e-3)")
    ap.add_argument("--free", choices=list(FREE), default="M",
                    help="what the fits move: M alone per target (default), the LoRA pairs too ('factors'), or θ "
                         "itself on the run's training set, judged on configurations it never trained on ('theta')")
    ap.add_argument("--objective", choices=OBJECTIVES, default="mean",
                    help="with --free theta: each step minimises the mean of the K configurations' losses (default) "
                         "or of their logarithms ('log': a collapsed configuration does not outweigh the others)")
    ap.add_argument("--out", type=Path, required=True,
                    help="directory for <run name>[-factors|-theta][-log].json")
    args = ap.parse_args(argv)
    if args.steps < 0 or args.lr <= 0:
        ap.error("--steps must be ≥ 0 and --lr > 0")
    if args.objective != "mean" and args.free != "theta":
        ap.error("--objective goes with --free theta")
    if not (args.run_dir / "ledger.jsonl").exists():
        ap.error(f"{args.run_dir} is not a coalora run directory (no ledger.jsonl)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    log = lambda m: print(m, flush=True)  # noqa: E731
    result = (refit(args.run_dir.resolve(), steps=args.steps, lr=args.lr, objective=args.objective, log=log)
              if args.free == "theta" else
              oracle(args.run_dir.resolve(), steps=args.steps, lr=args.lr, free=args.free, log=log))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.free == "M" else f"-{args.free}") + ("" if args.objective == "mean" else f"-{args.objective}")
    write_json_atomic(args.out / f"{result['run_name']}{suffix}.json", result)
    for label, rows in result["paired"].items():
        unit = 100 if result["metric"] == "accuracy" else 1
        print(label + ": " + ", ".join(f"{k} {v['difference'] * unit:+.2f} [{v['ci95'][0] * unit:+.2f}, "
                                       f"{v['ci95'][1] * unit:+.2f}]" for k, v in rows.items()))
    print("validation loss: " + ", ".join(f"{m} " + " / ".join(f"{x:.4f}" for x in v)
                                          for m, v in result["validation_loss"].items()))
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}))
    return result


if __name__ == "__main__":
    main()
