"""Run directories and the user-facing operations on them: run, resume, status.

``start_run`` checks everything it can before writing anything (:mod:`orchestrator.preflight`: the configuration,
space, model, data, run directory, tracking store and the machine or cluster's resources); then it starts the
workers (which load the model and data) and opens the MLflow run; only then does it create the run directory. So a run that cannot start leaves
nothing behind that would block the next attempt. A run directory is recognised by its ``coalora-run.json``, which
holds the resolved configuration and the run's id, so ``resume`` needs nothing but the directory.

``run`` and ``resume`` hold the directory's lock (:class:`~orchestrator.state.RunLock`) for as long as they run: a
second process on the same directory is refused with the holder's pid. ``status`` and ``export`` only read.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search.pareto import segment_index
from workers.allocator import loaded, preload_library
from workers.worker import WorkerSpec

from .config import ConfigError, RunConfig, build_config
from .preflight import (check_model, check_resources, check_tracking, check_with_model, data_source,
                        preflight, resolve_data, tracking_uri)
from .state import RUN_MARKER, CheckpointStore, Ledger, RunLock, read_marker, write_json_atomic
from .tracking.outbox import OUTBOX_FILE
from .tracking.tracker import Tracker

RUN_FORMAT = 1
LABELS_FILE = "labels.json"


# ---- workers and tracking ------------------------------------------------------------------------------------------
def worker_spec(cfg: RunConfig) -> WorkerSpec:
    baselines = cfg.evaluation.baselines
    methods = ("main",) + (("shared",) if {"shared_lora", "no_theta"} & set(baselines) else ())
    if "no_adapter" in baselines and cfg.adapter.quantizes_residual:  # quant(W) itself, not the base of W − L
        methods += ("bare",)
    return WorkerSpec(
        model=cfg.model.name, data=_data_dict(cfg), space=cfg.load_space().to_dict(), rank=cfg.adapter.rank,
        alpha=cfg.adapter.alpha, init=cfg.adapter.init, kind=cfg.adapter.kind, omega=cfg.adapter.omega,
        seed=cfg.run.seed,
        max_length=cfg.data.max_length,
        train_examples=cfg.data.train_examples, val_examples=cfg.data.val_examples,
        score_examples=cfg.data.score_examples, batch_size=cfg.data.batch_size,
        fisher_examples=cfg.search.fisher_examples, cost_sample=cfg.search.cost_sample, methods=methods,
        threads=max(1, int(cfg.cluster.cpus_per_worker)), reference=cfg.adapter.reference,
        encoder_hidden=cfg.adapter.encoder_hidden, cache_mb=cfg.training.cache_mb,
        low_memory=cfg.training.low_memory, preload=preload_library(cfg.training.allocator),
        quant_method=cfg.quant.method,
        calibration_examples=cfg.quant.calibration_examples, prefit_steps=cfg.adapter.prefit_steps,
        init_iterations=cfg.adapter.init_iterations,
        split_seed=cfg.data.split_seed, device="cuda" if cfg.cluster.gpus_per_worker > 0 else "cpu",
    )


def _data_dict(cfg: RunConfig) -> dict[str, Any]:
    spec, plan = data_source(cfg)
    return {"spec": asdict(spec), "plan": asdict(plan)}


# ---- run / resume ---------------------------------------------------------------------------------------------------
def _read_run(run_dir: Path) -> dict[str, Any]:
    try:
        return read_marker(run_dir, RUN_MARKER, RUN_FORMAT, "run")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_run_config(run_dir: Path) -> RunConfig:
    return build_config(_read_run(run_dir)["config"])


def run_key(run_dir: Path) -> str:
    """The run's id for MLflow: stored in the run directory, so it survives a move (older runs: their path)."""
    return _read_run(run_dir).get("run_uid") or str(Path(run_dir).resolve())


def _executor(cfg: RunConfig, spec: WorkerSpec, address: str | None):
    from .executor import LocalExecutor, RayExecutor

    if cfg.cluster.executor == "local":
        if spec.preload and cfg.training.allocator != "auto" and not loaded(spec.preload):
            warnings.warn(f"training.allocator = {cfg.training.allocator!r} reaches Ray workers only: the local "
                          f"executor trains in this process, started without it (LD_PRELOAD={spec.preload} python "
                          "... would use it)", stacklevel=2)
        return LocalExecutor(spec)
    return RayExecutor(spec, cfg.cluster.workers, cpus=cfg.cluster.cpus_per_worker, gpus=cfg.cluster.gpus_per_worker,
                       max_restarts=cfg.cluster.max_restarts, address=address or cfg.cluster.address,
                       connect_timeout_s=cfg.cluster.connect_timeout_s)


def _open_tracker(cfg: RunConfig, key: str) -> Tracker:
    return Tracker(tracking_uri(cfg), cfg.tracking.experiment, run_key=key, run_name=cfg.run.name or key,
                   timeout_s=cfg.tracking.timeout_s)


def _log_data_input(tracker: Tracker, cfg: RunConfig, n_train: int) -> None:
    """The run's data as an MLflow dataset input: its name, where it is, a content digest and the training rows."""
    from workers.data import read_source

    spec, _ = data_source(cfg)
    rows = read_source(spec)
    kind = "hf" if rows.kind == "hub" else "local"
    tracker.log_dataset(spec.display_name, rows.digest, spec.source, kind, n_train)


def _finish_quietly(tracker: Tracker, status: str) -> None:
    """End the MLflow run as ``status`` without hiding the error that ended the run (the store may be the cause)."""
    try:
        tracker.finish(status)
    except Exception as err:  # noqa: BLE001
        import logging

        logging.getLogger(__name__).warning("could not mark the MLflow run %s: %s", status, err)


def _drive(cfg: RunConfig, run_dir: Path, executor: Any, tracker: Tracker, *, progress: bool,
           repair_ledger: bool = False, started: float) -> list[dict[str, Any]]:
    """Run (or continue) the loop of an existing, locked run directory; ends the MLflow run as it ends."""
    from .loop.driver import Driver, RunContext
    from .tracking.watchdog import Watchdog

    tracker.keep_outbox(run_dir / OUTBOX_FILE)
    print(f"MLflow: {tracker.ui_link()}", file=sys.stderr, flush=True)
    watchdog = Watchdog(tracker.uri, tracker.parent_id, run_dir)
    monitor = tracker.start_system_metrics() if cfg.tracking.system_metrics else None
    try:
        tracker.log_params_once(cfg.to_flat_dict())
        n_train = executor.call("n_train")
        _log_data_input(tracker, cfg, n_train)
        ctx = RunContext(cfg, run_dir, cfg.load_space(), executor.call("numels"), executor.call("row_lengths"),
                         executor.call("no_decay_names"), n_train, executor.call("ternary_names"))
        driver = Driver(ctx, executor, tracker, progress=progress, repair_ledger=repair_ledger)
        ready = time.perf_counter()
        rows = driver.run(executor.call("initial_state", "main"))
        finished = time.perf_counter()
        # Wall times live outside the ledger, which must stay identical between runs with the same seed.
        write_json_atomic(run_dir / "timing.json", {"startup_s": ready - started, "loop_s": finished - ready,
                                                    "step_logging_s": driver.steps.seconds if driver.steps else 0.0,
                                                    "executor": cfg.cluster.executor, "workers": executor.n_workers})
        tracker.finish()
        tracker.settle(cfg.tracking.outage_s)
        return rows
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM/SIGHUP turned into SystemExit by the CLI
        _finish_quietly(tracker, "KILLED")
        raise
    except BaseException:
        _finish_quietly(tracker, "FAILED")
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        watchdog.disarm()


def with_run_name(cfg: RunConfig) -> RunConfig:
    """The configuration with ``run.name`` filled in (run-<UTC timestamp> when the user gave none)."""
    if cfg.run.name:
        return cfg
    name = time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})


def start_run(cfg: RunConfig, *, address: str | None = None, progress: bool = True,
              run_uid: str | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Check, start the workers, open the MLflow run, then create and lock the run directory and run it.
    ``run_uid`` names the run in MLflow (default: a fresh random id)."""
    cfg = with_run_name(cfg)
    run_dir = preflight(cfg, address)
    cfg = resolve_data(cfg)
    started = time.perf_counter()
    uid = run_uid or uuid.uuid4().hex
    with ExitStack() as stack:
        executor = _executor(cfg, worker_spec(cfg), address)
        stack.callback(executor.shutdown)
        check_with_model(cfg, executor.call("numels"), executor.call("row_lengths"))
        tracker = _open_tracker(cfg, uid)
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(RunLock(run_dir))
        except BaseException:  # another `coalora run` of this name holds it: its directory, not ours to remove
            _finish_quietly(tracker, "FAILED")
            raise
        try:
            if (run_dir / RUN_MARKER).exists():  # another `coalora run` of this name got here first
                raise ConfigError(f"run.name = {cfg.run.name!r}: {run_dir} already holds a run")
            write_json_atomic(run_dir / RUN_MARKER, {"format": RUN_FORMAT, "run_uid": uid,
                                                     "config": cfg.model_dump(mode="json")})
            if cfg.data.labels:  # the label map, where a person looks for it (it is in coalora-run.json too)
                write_json_atomic(run_dir / LABELS_FILE, {"id2label": dict(enumerate(cfg.data.labels))})
        except BaseException:
            _finish_quietly(tracker, "FAILED")
            if created and not (run_dir / RUN_MARKER).exists():
                shutil.rmtree(run_dir, ignore_errors=True)  # we hold its lock: nobody else is writing there
            raise
        return run_dir, _drive(cfg, run_dir, executor, tracker, progress=progress, started=started)


def resume_run(run_dir: Path, *, address: str | None = None, progress: bool = True,
               repair_ledger: bool = False) -> list[dict[str, Any]]:
    """Continue a run from its newest valid checkpoint (or return its results if it finished)."""
    run_dir = Path(run_dir).resolve()
    load_run_config(run_dir)  # a clear error for a directory that is not a run, before a lock file is made there
    with ExitStack() as stack:
        stack.enter_context(RunLock(run_dir))
        cfg = load_run_config(run_dir)
        check_model(cfg)
        if resolve_data(cfg) != cfg:
            raise ConfigError(f"data.source = {cfg.data.source!r} no longer reads as it did when the run started "
                              "(columns or labels changed); restore the data or start a new run")
        check_tracking(cfg)
        check_resources(cfg, address)
        started = time.perf_counter()
        executor = _executor(cfg, worker_spec(cfg), address)
        stack.callback(executor.shutdown)
        tracker = _open_tracker(cfg, run_key(run_dir))
        return _drive(cfg, run_dir, executor, tracker, progress=progress, repair_ledger=repair_ledger,
                      started=started)


# ---- status -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunStatus:
    run_dir: Path
    round: int
    rounds: int
    finished: bool
    pool_size: int
    training_set_size: int
    hypervolume: float
    best_per_segment: list[tuple[int, float, float]]  # (segment, best loss, its average bits)


def run_status(run_dir: Path) -> RunStatus:
    run_dir = Path(run_dir).resolve()
    cfg = load_run_config(run_dir)
    ckpt = CheckpointStore(run_dir / "checkpoints").load_latest()
    finished = any(e["kind"] == "done" for e in Ledger(run_dir / "ledger.jsonl").entries())
    if ckpt is None:
        return RunStatus(run_dir, -1, cfg.search.rounds, finished, 0, 0, float("nan"), [])
    space = cfg.load_space()
    pool = np.asarray(ckpt.meta["pool"], dtype=np.int64)
    loss = np.asarray(ckpt.meta["pool_loss"])
    bits = np.atleast_1d(space.encoded_average_bits(pool, ckpt.meta["numels"]))
    seg = segment_index(bits, cfg.search.segments, space.bits_range)
    best = []
    for s in np.unique(seg):
        members = np.flatnonzero(seg == s)
        i = members[np.argmin(loss[members])]
        best.append((int(s), float(loss[i]), float(bits[i])))
    return RunStatus(run_dir, ckpt.round, cfg.search.rounds, finished, len(pool), len(ckpt.meta["training_set"]),
                     float(ckpt.meta["hypervolume"]), best)


def format_status(status: RunStatus) -> str:
    state = "finished" if status.finished else "in progress"
    lines = [
        f"run:            {status.run_dir}",
        f"state:          {state}, round {status.round} of {status.rounds}",
        f"pool size:      {status.pool_size}",
        f"training set:   {status.training_set_size}",
        f"hypervolume:    {status.hypervolume:.4f}",
        "best loss per segment:",
        f"  {'segment':>7}  {'avg bits':>8}  {'loss':>8}",
    ]
    lines += [f"  {s:>7}  {b:>8.3f}  {l:>8.4f}" for s, l, b in status.best_per_segment]
    return "\n".join(lines)
