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

per-configuration − shared is what making M (or the adapter) depend on the configuration is worth; shared − the run's own
CoA-LoRA is what further training of M alone is worth (the part any shared adapter could learn as well). Both are
paired on the run's validation examples with 95% intervals over the examples (orchestrator.loop.paired). The run's
own CoA-LoRA is evaluated again first and must reproduce its ledger's final accuracy exactly, or the bench stops.

    .venv/bin/python bench/theta_oracle.py RUN_DIR --steps 60 --lr 3e-3 [--free factors] --out docs/theta/oracle

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
from typing import Any, Iterator, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator.config import ConfigError  # noqa: E402
from orchestrator.loop.paired import paired_difference  # noqa: E402
from orchestrator.loop.schedule import batch_ids, unkey  # noqa: E402
from orchestrator.runs import load_run_config, worker_spec  # noqa: E402
from orchestrator.state import CheckpointStore, Ledger, write_json_atomic  # noqa: E402
from workers.adapters.coa import CoAModel, theta_spread  # noqa: E402
from workers.tasks import evaluate_examples  # noqa: E402
from workers.worker import Worker  # noqa: E402

MAIN = "coa-lora"
FREE = {"M": "M", "factors": "A, B, M"}
"""What the oracle's fits move (``--free``), and how its rows are named."""
REPRODUCE_TOLERANCE = 1e-9


# ---- the run ----------------------------------------------------------------------------------------------------
def load_run(run_dir: Path) -> tuple[Any, Worker, list[dict[str, Any]]]:
    """(config, a worker holding the run's replica with its last checkpoint's trainable state, the ledger's final
    CoA-LoRA rows of the targets); a clear error for a run this bench cannot read."""
    cfg = load_run_config(run_dir)
    if cfg.adapter.kind != "coa":
        raise ConfigError(f"{run_dir} is an adapter.kind {cfg.adapter.kind!r} run: the oracle fits CoA-LoRA's M")
    targets = [r for r in Ledger(run_dir / "ledger.jsonl").entries()
               if r.get("kind") == "final" and r.get("method") == MAIN and r["configuration"].startswith("target")]
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
def with_factors(model: CoAModel, factors: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Within the block the model's LoRA pairs are ``factors`` (None: as they are); restored after."""
    params = dict(model.named_parameters())
    kept = {n: params[n].detach().clone() for n in (factors or {})}
    with torch.no_grad():
        for n, value in (factors or {}).items():
            params[n].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, value in kept.items():
                params[n].copy_(value)


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
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    torch.manual_seed(seed)  # dropout
    model.train()
    losses = []
    with with_factors(model, {n: params[n].detach() for n in moved}):  # the run's pairs restored after
        for n in moved:
            params[n].requires_grad_(True)
        optimizer = torch.optim.Adam([mixing, *(params[n] for n in moved)], lr=lr)
        try:
            for step in range(steps):
                batch = worker.collate([worker.train_items[i] for i in
                                        batch_ids(seed, len(worker.train_items), batch_size, step)])
                loss = torch.stack([_loss(model, settings, mixing, batch) for settings in configurations]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            fitted = {n: params[n].detach().clone() for n in moved} if factors else None
        finally:
            for p in params.values():
                p.requires_grad_(False)
            for p in frozen:
                p.requires_grad_(True)
            model.eval()
    return mixing.detach(), fitted, losses


def _loss(model: CoAModel, settings: list, mixing: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.set_configuration(settings, mixing=mixing)
    return model.model(**batch).loss


def _progress(losses: Sequence[float]) -> str:
    return f"training loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no steps: θ's output as is"


# ---- the comparison ---------------------------------------------------------------------------------------------
def oracle(run_dir: Path, *, steps: int, lr: float, free: str = "M", log=print) -> dict[str, Any]:
    """The comparison above; ``free``: what the fits move, ``"M"`` or ``"factors"`` (A, B and M)."""
    if free not in FREE:
        raise ValueError(f"free must be one of {list(FREE)}, got {free!r}")
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

    def evaluate(method: str, s: list) -> float:
        """``method``'s value on configuration ``s``, its validation loss and per-example scores recorded."""
        metrics, example_scores = evaluate_examples(model, s, worker.val_batches)
        values[method].append(float(metrics[metric]))
        losses[method].append(float(metrics["loss"]))
        scores[method].append(example_scores.numpy())
        return float(metrics[metric])

    own, shared_name = f"per-configuration {label}", f"shared {label}"
    scores: dict[str, list[np.ndarray]] = {"coa-lora": [], own: [], shared_name: []}
    values: dict[str, list[float]] = {k: [] for k in scores}
    losses: dict[str, list[float]] = {k: [] for k in scores}  # validation loss, also for classification
    for name, s, row in zip(names, settings, target_rows):  # the run's own CoA-LoRA, which must reproduce
        value = evaluate("coa-lora", s)
        if abs(value - row["metrics"][metric]) > REPRODUCE_TOLERANCE:
            raise RuntimeError(f"{name}: the run's CoA-LoRA gives {metric} {value} here and {row['metrics'][metric]} "
                               "in its ledger; the replica is not the run's")
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
            with with_factors(model, factors):
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished coalora run of adapter.kind coa")
    ap.add_argument("--steps", type=int, default=60, help="Adam steps per fit (default 60)")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate of M (default 3e-3)")
    ap.add_argument("--free", choices=list(FREE), default="M",
                    help="what the fits move: M alone (default) or the LoRA pairs too ('factors')")
    ap.add_argument("--out", type=Path, required=True, help="directory for <run name>[-factors].json")
    args = ap.parse_args(argv)
    if args.steps < 0 or args.lr <= 0:
        ap.error("--steps must be ≥ 0 and --lr > 0")
    if not (args.run_dir / "ledger.jsonl").exists():
        ap.error(f"{args.run_dir} is not a coalora run directory (no ledger.jsonl)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    result = oracle(args.run_dir.resolve(), steps=args.steps, lr=args.lr, free=args.free,
                    log=lambda m: print(m, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.free == "M" else f"-{args.free}"
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
