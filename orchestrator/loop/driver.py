"""The CoA-LoRA loop (design.md "Data flow of one run"), durable and resumable.

    round 0   sensitivity → ILP initial pool → score the pool                      → checkpoint 0
    round r   train (K configurations per step, shards on every worker)
              re-score the pool with the current adapters + θ on the fixed scoring subset
              propose q candidates (BoTorch) → evaluate them in parallel → segmented Pareto training set
                                                                                     → checkpoint r
    final     CoA-LoRA, baselines and no-adapter on the target budgets' ILP configurations (the same ones for
              every method) and on unseen configurations (orchestrator/loop/finish.py)

Determinism: every random choice is drawn from a generator seeded by (seed, purpose, step), never from global
state (orchestrator/loop/schedule.py), and checkpoints hold every tensor and the ledger length at the round boundary. A
resume truncates the ledger to that length and replays from there, so it writes the same ledger, pool, training set
and proposals as an uninterrupted run. Worker calls are pure functions of their arguments, so retried calls cannot double-count.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from search.allocation import budget_grid, initial_pool
from search.hypervolume import normalized_hypervolume
from search.pareto import segment_edges, segment_index
from search.searcher import ParetoSearcher
from search.space import SearchSpace
from workers.quant.cache import merge_cache_stats
from workers.init.lq import SHARED_LQ_INIT
from workers.init.projq import SHARED_INIT
from workers.training import lr_factor

from . import report
from ..config import RunConfig
from ..executor import Executor
from ..faults import commit_point
from .finish import EXAMPLES_FILE, Finish, write_final
from .optim import MasterState, train_config, weighted_mean
from .schedule import data_shards, key, step_configurations
from ..state import LEDGER_COPY, Checkpoint, CheckpointStore, Ledger, canonical_json, write_atomic
from ..tracking.tracker import StepLog, Tracker

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message names where. Nothing non-finite is recorded."""


class LedgerMismatch(ValueError):
    """The ledger no longer holds what the newest checkpoint says it held: entries were lost or changed."""


@dataclass
class RunContext:
    config: RunConfig
    run_dir: Path
    space: SearchSpace
    numels: list[int]
    row_lengths: list[int]
    no_decay: set[str]
    n_train: int
    ternary: set[str] = frozenset()  # trainable tensors t-SignSGD steps (LoTA's factors), the rest AdamW

    @property
    def allowed(self) -> np.ndarray:
        """(N, n_settings): the settings each target matrix can take (see :meth:`SearchSpace.allowed`)."""
        return self.space.allowed(self.row_lengths)


class Driver:
    """Runs (or resumes) one coalora run in ``run_dir`` with worker calls going through ``executor``."""

    def __init__(self, ctx: RunContext, executor: Executor, tracker: Tracker | None, progress: bool = True,
                 repair_ledger: bool = False):
        self.ctx, self.cfg, self.ex, self.tracker = ctx, ctx.config, executor, tracker
        self.steps = StepLog(tracker) if tracker is not None else None
        self.repair_ledger = repair_ledger
        self.ledger = Ledger(ctx.run_dir / "ledger.jsonl")
        self.store = CheckpointStore(ctx.run_dir / "checkpoints")
        self.progress = progress
        self.train_config = train_config(self.cfg)
        self.master: MasterState | None = None
        self.costs: np.ndarray | None = None
        self.pool: list[np.ndarray] = []
        self.training_set: list[np.ndarray] = []
        self.loss_ref: float = 1.0
        self.round = 0

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="it", disable=not self.progress, leave=False, dynamic_ncols=True)

    def _put(self, value: Any) -> Any:
        put = getattr(self.ex, "put", None)
        return put(value) if put else value

    def _searcher(self) -> ParetoSearcher:
        return ParetoSearcher(self.ctx.space, self.ctx.numels, self.cfg.run.seed, segments=self.cfg.search.segments,
                              row_lengths=self.ctx.row_lengths)

    def _score_all(self, configs: list[np.ndarray], state: dict[str, torch.Tensor], desc: str) -> list[float]:
        ref = self._put(state)
        with self._bar(len(configs), desc) as bar:
            losses = [float(v) for v in self.ex.map("score", [("main", ref, x) for x in configs])]
            bar.update(len(configs))
        for x, loss in zip(configs, losses):
            if not math.isfinite(loss):
                raise DivergenceError(f"{desc}: scoring loss = {loss} for configuration {self._describe(x)}; "
                                      f"{self._advice()}")
        return losses

    def _describe(self, x: np.ndarray) -> str:
        bits = float(self.ctx.space.encoded_average_bits(np.asarray(x), self.ctx.numels))
        return f"{key(x)} ({bits:.3f} bits)"

    def _advice(self) -> str:
        return (f"the adapter diverged at training.lr = {self.cfg.training.lr:g}; start a new run with a lower "
                "training.lr (resuming this one repeats the same steps)")

    def _shards(self, step: int) -> list[list[int]]:
        """Global ``step``'s training examples, one shard per worker; every method sees the same data order."""
        return data_shards(self.cfg.run.seed, self.ctx.n_train, self.cfg.data.batch_size, step, self.ex.n_workers)

    # ---- round 0 --------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        n = len(self.ctx.numels)
        chunks = [list(c) for c in np.array_split(np.arange(n), self.ex.n_workers) if len(c)]
        with self._bar(1, "sensitivity (Fisher + cost table)") as bar:
            rows = self.ex.map("cost_rows", [(c,) for c in chunks])
            bar.update(1)
        self.costs = np.concatenate(rows)
        budgets = budget_grid(cfg.search.budget_min, cfg.search.budget_max, cfg.search.initial_budgets)
        self.pool = initial_pool(self.ctx.space, self.costs, self.ctx.numels, budgets)
        self.ledger.append("initial_pool", configs=[key(x) for x in self.pool])
        if cfg.adapter.init == SHARED_INIT:
            self._shared_init()
        elif cfg.adapter.init == SHARED_LQ_INIT:  # built into every worker's replicas: only its figures to log
            self._log_init(SHARED_LQ_INIT, self.ex.call("init_stats"))
        state = self.master.state()
        losses = self._score_all(self.pool, state, "score initial pool")
        self.loss_ref = float(max(losses)) * 1.1
        for x, loss in zip(self.pool, losses):
            self.ledger.append("result", round=0, config=key(x), loss=loss, phase="initial")
        commit_point("pool_scored")
        searcher = self._searcher()
        searcher.tell(zip(self.pool, losses))
        self.training_set = searcher.training_set()
        self._end_round(0, losses, train_loss=float("nan"))

    def _shared_init(self) -> None:
        """``adapter.init: projq-shared``: CoA-LoRA starts from the initial pool's shared error subspace, θ fitted
        to each pool member's correction; the step-0 compensation errors go to the ledger and MLflow."""
        with self._bar(1, "projq-shared init (error subspace + θ fit)") as bar:
            initial, stats = self.ex.call("shared_init", "main", self.pool)
            bar.update(1)
        self.master = MasterState(initial, self.ctx.no_decay, self.train_config, self.ctx.ternary)
        self._log_init(SHARED_INIT, stats)

    def _log_init(self, method: str, stats: dict[str, float]) -> None:
        """A data-dependent init's step-0 figures, in the ledger and MLflow."""
        self.ledger.append("init", method=method, **stats)
        if self.tracker is not None:
            self.tracker.log_metrics(stats, step=0)

    # ---- round r --------------------------------------------------------------------------------------------------
    def _train(self, r: int) -> float:
        cfg, t = self.cfg, self.cfg.training
        losses = []
        with self._bar(t.steps_per_round, f"round {r}: train") as bar:
            for j in range(t.steps_per_round):
                started = time.perf_counter()
                step = (r - 1) * t.steps_per_round + j
                configs = step_configurations(self.training_set, step, seed=cfg.run.seed, k=t.configs_per_step,
                                              sampling=t.config_sampling, space=self.ctx.space,
                                              numels=self.ctx.numels)
                shards = self._shards(step)
                ref = self._put(self.master.state())
                results = self.ex.map("gradients", [("main", ref, s, configs) for s in shards])
                loss, grads, per_config = weighted_mean(results)
                self._check_finite(loss, grads, r, j, step, configs)
                norm = self.master.step(grads)
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                self._log_step(step, loss, configs, per_config, norm, sum(len(s) for s in shards),
                               time.perf_counter() - started)
        if self.steps is not None:
            self.steps.flush()
        mean = float(np.mean(losses))
        self.ledger.append("trained", round=r, steps=len(losses), mean_loss=mean, last_loss=losses[-1], losses=losses)
        commit_point("trained")
        return mean

    def _log_step(self, step: int, loss: float, configs: list[np.ndarray], per_config: list[float], grad_norm: float,
                  examples: int, seconds: float) -> None:
        """The step's training loss (mean over its K configurations, and per whole-bit bucket of their average bits:
        ``train/loss_2bit`` is [2, 3) bits), pre-clip gradient norm, the learning rate of each parameter group as
        the schedule set it for this step, and throughput, keyed by the global step."""
        if self.steps is None:
            return
        t = self.cfg.training
        factor = lr_factor(step, self.train_config)
        values = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": t.lr * factor,
                  "train/step_time_s": seconds, "train/examples_per_s": examples / max(seconds, 1e-9)}
        for name, peak in (("lora_lr", t.lora_lr), ("encoder_lr", t.encoder_lr)):
            if peak is not None:
                values[f"train/{name}"] = peak * factor
        bits = np.atleast_1d(self.ctx.space.encoded_average_bits(np.stack(configs), self.ctx.numels))
        buckets: dict[int, list[float]] = {}
        for b, value in zip(bits, per_config):
            buckets.setdefault(int(math.floor(b)), []).append(value)
        values.update({f"train/loss_{b}bit": float(np.mean(v)) for b, v in buckets.items()})
        self.steps.add(step, values)

    def _check_finite(self, loss: float, grads: dict[str, torch.Tensor], r: int, j: int, step: int,
                      configs: list[np.ndarray]) -> None:
        """Stop at the step where training diverges, before the bad update is applied or anything is recorded."""
        bad = [n for n, g in grads.items() if not bool(torch.isfinite(g).all())]
        if math.isfinite(loss) and not bad:
            return
        what = f"loss = {loss}" if not math.isfinite(loss) else f"loss = {loss:.4g} but non-finite gradients in {bad[:3]}"
        raise DivergenceError(
            f"training diverged in round {r}, step {j + 1} of {self.cfg.training.steps_per_round} (global step "
            f"{step + 1}): {what} on configurations {', '.join(self._describe(x) for x in configs)}; {self._advice()}")

    def _search_round(self, r: int, train_loss: float) -> None:
        state = self.master.state()
        losses = self._score_all(self.pool, state, f"round {r}: re-score pool")
        for x, loss in zip(self.pool, losses):
            self.ledger.append("result", round=r, config=key(x), loss=loss, phase="rescore")
        searcher = self._searcher()
        searcher.tell(zip(self.pool, losses))
        with self._bar(1, f"round {r}: propose") as bar:
            proposals = searcher.propose(self.cfg.search.proposals_per_round)
            bar.update(1)
        self.ledger.append("proposed", round=r, configs=[key(x) for x in proposals])
        commit_point("proposed")
        new_losses = self._score_all(proposals, state, f"round {r}: evaluate candidates")
        for x, loss in zip(proposals, new_losses):
            self.ledger.append("result", round=r, config=key(x), loss=loss, phase="candidate")
        commit_point("evaluated")
        searcher.tell(zip(proposals, new_losses))
        self.pool = self.pool + list(proposals)
        self.training_set = searcher.training_set()
        self._end_round(r, losses + new_losses, train_loss, n_new=len(new_losses))

    def _end_round(self, r: int, losses: list[float], train_loss: float, n_new: int = 0) -> None:
        """Record the round (ledger, MLflow, artifacts) and checkpoint it; the last ``n_new`` pool members are this
        round's proposals."""
        space, numels = self.ctx.space, self.ctx.numels
        bits = np.atleast_1d(space.encoded_average_bits(np.stack(self.pool), numels))
        loss = np.asarray(losses, dtype=np.float64)
        selected = np.zeros(len(self.pool), dtype=bool)
        chosen = {x.tobytes() for x in self.training_set}
        for i, x in enumerate(self.pool):
            selected[i] = x.tobytes() in chosen
        hv = normalized_hypervolume(bits, np.minimum(loss, self.loss_ref), space.bits_range, (0.0, self.loss_ref))
        self.ledger.append(
            "round_end", round=r, pool=len(self.pool), training_set=[key(x) for x in self.training_set],
            hypervolume=hv, train_loss=None if np.isnan(train_loss) else train_loss,
        )
        self.round = r
        # Track before the checkpoint: a crash in between replays the round, and re-logging is idempotent.
        new = np.arange(len(self.pool)) >= len(self.pool) - n_new
        self._track_round(r, bits, loss, selected, new, hv, train_loss)
        self._checkpoint(r, bits, loss, selected, hv)

    # ---- persistence ----------------------------------------------------------------------------------------------
    def _checkpoint(self, r: int, bits: np.ndarray, loss: np.ndarray, selected: np.ndarray, hv: float) -> None:
        params, opt_tensors, opt_meta = self.master.to_tensors()
        meta = {
            "round": r,
            "ledger_len": len(self.ledger.entries()),
            "optimizer": opt_meta,
            "loss_ref": self.loss_ref,
            "pool": [x.tolist() for x in self.pool],
            "pool_loss": loss.tolist(),
            "training_set": [x.tolist() for x in self.training_set],
            "hypervolume": hv,
            "numels": list(self.ctx.numels),
        }
        tensors = {"trainable": params, "optimizer": opt_tensors, "costs": {"costs": torch.from_numpy(self.costs)}}
        self.store.save(r, tensors, meta, files={LEDGER_COPY: self.ledger.path.read_bytes()})
        commit_point("checkpoint")

    def _check_ledger(self, ckpt: Checkpoint) -> None:
        """The ledger must still begin with the entries the checkpoint covers. If it does not (deleted, truncated,
        edited, or corrupt inside the covered part), refuse, or with ``repair_ledger`` restore the checkpoint's copy
        (the damaged file is kept beside it). Damage after the covered part is harmless: that part is replayed."""
        n = int(ckpt.meta["ledger_len"])
        copy = ckpt.path / LEDGER_COPY
        expected = copy.read_text() if copy.exists() else None
        text = self.ledger.path.read_text(errors="replace") if self.ledger.path.exists() else ""
        lines = text.split("\n")
        complete = len(lines) > n  # n newline-terminated lines exist
        head = "".join(line + "\n" for line in lines[:n]) if complete else None
        if head is not None and (expected is None or head == expected):
            return
        found = sum(1 for line in lines if line)
        problem = (f"{self.ledger.path} holds {found} line(s) but checkpoint round {ckpt.round} covers {n} entries"
                   if head is None else
                   f"the first {n} entries of {self.ledger.path} differ from those checkpoint round {ckpt.round} covers")
        if not self.repair_ledger:
            raise LedgerMismatch(
                f"{problem}: the ledger lost or changed entries since that checkpoint. Nothing was changed. To "
                f"continue from the checkpoint with its own copy of the ledger, run `coalora resume "
                f"{self.ctx.run_dir} --repair-ledger` (the current file is kept as ledger.jsonl.bak-<time>).")
        if expected is None:
            raise LedgerMismatch(f"{problem}, and checkpoint round {ckpt.round} holds no copy of the ledger to "
                                 "restore it from")
        if self.ledger.path.exists():
            backup = self.ledger.path.with_name(f"ledger.jsonl.bak-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.copy2(self.ledger.path, backup)
            log.warning("ledger: %s; kept the damaged file as %s", problem, backup)
        write_atomic(self.ledger.path, expected.encode())

    def restore(self, ckpt: Checkpoint) -> None:
        """Load ``ckpt`` (the newest valid checkpoint) and cut the ledger back to what it covers."""
        self.master.load(ckpt.tensors["trainable"], ckpt.tensors.get("optimizer", {}), ckpt.meta["optimizer"])
        self.costs = ckpt.tensors["costs"]["costs"].numpy().astype(np.float64)
        self.pool = [np.asarray(x, dtype=np.int64) for x in ckpt.meta["pool"]]
        self.training_set = [np.asarray(x, dtype=np.int64) for x in ckpt.meta["training_set"]]
        self.loss_ref = float(ckpt.meta["loss_ref"])
        self.round = ckpt.round
        self.ledger.truncate_to(int(ckpt.meta["ledger_len"]))

    # ---- tracking -------------------------------------------------------------------------------------------------
    def _track_round(self, r: int, bits: np.ndarray, loss: np.ndarray, selected: np.ndarray, new: np.ndarray,
                     hv: float, train_loss: float) -> None:
        out = self.ctx.run_dir / "artifacts" / f"round-{r:04d}"
        all_edges = segment_edges(self.cfg.search.segments, self.ctx.space.bits_range)
        width = float(all_edges[1] - all_edges[0])
        edges = [float(e) for e in all_edges if bits.min() - width <= e <= bits.max() + width]  # where the pool is
        report.pareto_plot(bits, loss, selected, out / "pareto.png",
                           f"round {r}: pool and training set (hypervolume {hv:.3f})", new=new, edges=edges,
                           segments=self.cfg.search.segments)
        seg = segment_index(bits, self.cfg.search.segments, self.ctx.space.bits_range)
        rows = [
            {"config": key(x), "avg_bits": float(b), "loss": float(l), "segment": int(s), "training_set": bool(t)}
            for x, b, l, s, t in sorted(zip(self.pool, bits, loss, seg, selected), key=lambda z: z[1])
        ]
        (out / "pareto.md").write_text(report.markdown_table(rows, ["avg_bits", "loss", "segment", "training_set", "config"]))
        history = [(e["round"], e["hypervolume"]) for e in self.ledger.entries() if e["kind"] == "round_end"]
        progress = report.hypervolume_plot(*zip(*history), self.ctx.run_dir / "artifacts" / "hypervolume.png")
        if self.tracker is None:
            return
        metrics = {"hypervolume": hv, "pool_size": len(self.pool), "training_set_size": len(self.training_set),
                   "best_loss": float(loss.min()),
                   **merge_cache_stats(self.ex.map("cache_stats", [()] * self.ex.n_workers))}
        if self.cfg.adapter.kind == "coa":  # a plain LoRA has no θ to measure
            metrics.update(self.ex.call("theta_spread", self._put(self.master.state()), self.training_set))
        if not np.isnan(train_loss):
            metrics["train_loss"] = train_loss
        self.tracker.log_metrics(metrics, step=r)
        self.tracker.log_artifact(out / "pareto.png", f"rounds/round-{r:04d}")
        self.tracker.log_artifact(out / "pareto.md", f"rounds/round-{r:04d}")
        self.tracker.log_artifact(progress)  # replaced each round: the whole history so far

    # ---- final evaluation -----------------------------------------------------------------------------------------
    def final_evaluation(self) -> list[dict[str, Any]]:
        finish = Finish(self.cfg, self.ctx.space, self.ctx.numels, self.ctx.allowed, self.ex, self.ledger,
                        self.train_config, self._shards, self._bar, self._put,
                        self.ctx.run_dir / "final" / EXAMPLES_FILE)
        return finish.evaluate(self.master.state(), self.costs, self.pool)

    # ---- the whole run --------------------------------------------------------------------------------------------
    def run(self, initial_state: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        self.master = MasterState(initial_state, self.ctx.no_decay, self.train_config, self.ctx.ternary)
        ckpt = self.store.load_latest()
        if ckpt is not None:
            self._check_ledger(ckpt)
            done = [e for e in self.ledger.entries(strict=False) if e["kind"] == "done"]
            if done:
                return json.loads((self.ctx.run_dir / "final" / "evaluation.json").read_text())
            self.restore(ckpt)
        else:  # nothing durable yet: whatever a crashed first attempt logged is discarded
            self.ledger.truncate_to(0)
            self.ledger.append("start", seed=self.cfg.run.seed)
            self._setup()
        for r in range(self.round + 1, self.cfg.search.rounds + 1):
            train_loss = self._train(r)
            self._search_round(r, train_loss)
        rows = self.final_evaluation()
        write_final(self.cfg, self.ctx.run_dir / "final", rows, self.tracker)
        self.ledger.append("done", rounds=self.cfg.search.rounds)
        return rows


def ledger_digest(run_dir: Path) -> str:
    """The ledger's canonical text, for comparing runs."""
    return "\n".join(canonical_json(e) for e in Ledger(run_dir / "ledger.jsonl").entries())

