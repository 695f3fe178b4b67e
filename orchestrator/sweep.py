"""``coalora sweep``: a Ray Tune experiment over coalora runs (seeds, ranks, learning rates, ...).

Each Tune trial is one coalora run (:func:`orchestrator.runs.start_run`, or :func:`~orchestrator.runs.resume_run`
when the trial's run directory already holds a run, e.g. after an interrupted sweep or a retried trial), with a
per-trial ``run.name`` and the trial's ``section.key=value`` overrides. The trial reports its final metrics.

A sweep directory holds everything needed to resume it::

    <run.root>/sweeps/<name>/
        sweep.json      the resolved base configuration, the parameter grid, the sweep's MLflow parent run id
        runs/<trial>/   one coalora run directory per trial (``coalora status`` / ``resume`` / ``export`` work)
        storage/tune/   Tune's experiment state (``Tuner.restore(..., resume_unfinished=True)``)
        summary.json    one row per trial: its final metrics or its error

MLflow: one sweep parent run (tags ``coalora.sweep_id`` = the sweep's stored id + ``coalora.role = sweep``), created
once with an explicit ``MlflowClient``; every trial's coalora parent run (keyed by an id derived from the sweep's id
and the trial's name, the ``run_uid`` its run directory then stores) is nested under it (``mlflow.parentRunId``). The trial creates
its coalora parent run itself, before ``start_run``, with exactly the tags :class:`orchestrator.tracking.tracker.Tracker`
looks runs up by, so the Tracker adopts it instead of creating a second one; a resumed or retried trial finds it
again, so no run is ever duplicated. The tracking URI is resolved once, in the sweep driver, and passed to every
trial explicitly: a trial on another node never falls back to a local ``./mlruns`` or a SQLite file of its own.

Resources: each trial reserves one placement group, a bundle for its driver plus one bundle per worker replica
(``cluster.cpus_per_worker`` CPUs and ``cluster.gpus_per_worker`` GPUs each). The replicas' actors are captured
into that group, so concurrent trials never over-pack a GPU beyond what each declared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import ConfigError, RunConfig, build_config, check_safe_name, load_config, parse_override
from .state import RUN_MARKER, read_marker, write_json_atomic
from .tracking.tracker import ROLE_TAG, RUN_ID_TAG, check_reachable, experiment_id, find_or_create_run

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = 1
SWEEP_TAG = "coalora.sweep_id"
TUNE_NAME = "tune"


# ---- the parameter grid -------------------------------------------------------------------------------------------
def parse_param(item: str) -> tuple[str, list[Any]]:
    """``adapter.rank=4,8`` → (``"adapter.rank"``, ``[4, 8]``); each value is validated like an override."""
    if "=" not in item:
        raise ConfigError(f"--param {item!r} must look like section.key=v1,v2,...")
    key, raw = item.split("=", 1)
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"--param {item!r}: no values")
    parsed = [parse_override(f"{key}={v}")[1] for v in values]
    if key.strip() in ("run.name", "run.root", "tracking.uri", "tracking.experiment"):
        raise ConfigError(f"--param {item!r}: {key} is set by the sweep itself and cannot be swept")
    return key.strip(), parsed


def trial_name(overrides: Sequence[str]) -> str:
    """A run name (``[A-Za-z0-9_.-]+``) that says what the trial sets, e.g. ``rank-4_seed-0``."""
    parts = []
    for item in overrides:
        key, value = item.split("=", 1)
        parts.append(f"{key.split('.')[-1]}-{value}")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "", "_".join(parts)) or "trial"
    return name[:120]


def grid(params: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the parameter values, in a fixed order, one entry per trial."""
    keys = list(params)
    trials = []
    for combo in itertools.product(*(params[k] for k in keys)):
        overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in zip(keys, combo)]
        trials.append({"name": trial_name(overrides), "overrides": overrides})
    names = [t["name"] for t in trials]
    if len(set(names)) != len(names):
        for i, t in enumerate(trials):
            t["name"] = f"t{i:03d}_{t['name']}"
    return trials


def _absolute_paths(data: dict[str, Any]) -> dict[str, Any]:
    """Relative paths in the base configuration, resolved against the sweep driver's working directory: trials
    run in other processes (other nodes, Tune's trial directories) where the driver's cwd means nothing."""
    out = {k: dict(v) for k, v in data.items()}
    model = out.get("model", {})
    name = model.get("name")
    if isinstance(name, str) and ("/" in name or name.startswith(".")) and Path(name).exists():
        model["name"] = str(Path(name).resolve())
    space = out.get("search", {}).get("space")
    if isinstance(space, str) and not Path(space).is_absolute() and Path(space).exists():
        out["search"]["space"] = str(Path(space).resolve())
    return out


# ---- resources ----------------------------------------------------------------------------------------------------
def trial_bundles(cfg: RunConfig, driver_cpus: float = 1.0) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: its driver, then one per worker replica (none for ``local``).

    Fractional GPUs must divide one GPU evenly (0.5, 0.25, ...) and whole numbers above one: Ray packs fractions
    onto a GPU until they sum to 1 and never isolates their memory, so an uneven fraction leaves a GPU
    over-committed or stranded."""
    g = cfg.cluster.gpus_per_worker
    if g > 1 and g != int(g):
        raise ConfigError(f"cluster.gpus_per_worker = {g}: above 1 it must be a whole number of GPUs")
    if 0 < g < 1 and abs(round(1 / g) - 1 / g) > 1e-9:
        raise ConfigError(f"cluster.gpus_per_worker = {g}: a fraction must divide one GPU evenly (0.5, 0.25, ...)")
    if cfg.cluster.executor == "local":
        return [{"CPU": max(driver_cpus, cfg.cluster.cpus_per_worker)}]
    worker: dict[str, float] = {"CPU": cfg.cluster.cpus_per_worker}
    if g:
        worker["GPU"] = g
    return [{"CPU": driver_cpus}] + [dict(worker) for _ in range(cfg.cluster.workers)]


# ---- MLflow -------------------------------------------------------------------------------------------------------
def _client(uri: str):
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    return MlflowClient(tracking_uri=uri)


def sweep_parent_run(uri: str, experiment: str, sweep_uid: str, name: str) -> str:
    client = _client(uri)
    return find_or_create_run(client, experiment_id(client, experiment), {SWEEP_TAG: sweep_uid, ROLE_TAG: "sweep"},
                              name)


def trial_uid(sweep_run_id: str, trial: str) -> str:
    """The trial's run id: the same for every attempt of the trial, different for every sweep."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"coalora-sweep:{sweep_run_id}/{trial}").hex


def nest_trial_run(uri: str, experiment: str, run_uid: str, run_name: str, sweep_run_id: str) -> str:
    """The trial's coalora parent run, tagged exactly as :class:`Tracker` finds it, nested under the sweep."""
    client = _client(uri)
    return find_or_create_run(client, experiment_id(client, experiment), {RUN_ID_TAG: run_uid, ROLE_TAG: "parent"},
                              run_name, {"mlflow.parentRunId": sweep_run_id, SWEEP_TAG: sweep_run_id})


# ---- the trial ----------------------------------------------------------------------------------------------------
def final_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per method: the mean metric and loss over the target-budget configurations (what Tune compares)."""
    out: dict[str, float] = {}
    if not rows:
        return out
    metric = "accuracy" if "accuracy" in rows[0] else "perplexity"
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method and str(r["configuration"]).startswith("target")]
        mine = mine or [r for r in rows if r["method"] == method]
        for key in (metric, "loss"):
            values = [float(r[key]) for r in mine if key in r]
            if values:
                out[f"{method}.mean_target_{key}"] = sum(values) / len(values)
    return out


def run_trial(config: Mapping[str, Any]) -> None:
    """Tune trainable: one coalora run, started or resumed; reports its final metrics once."""
    from ray import tune

    from .runs import resume_run, start_run

    trial = config["trial"]
    runs_root = Path(config["runs_root"])
    run_dir = runs_root / trial["name"]
    overrides = [*trial["overrides"], f"run.name={trial['name']}", f"run.root={runs_root}",
                 f"tracking.uri={config['tracking_uri']}"]
    cfg = build_config(config["base"], overrides)
    uid = trial_uid(config["sweep_run_id"], trial["name"])
    nest_trial_run(config["tracking_uri"], cfg.tracking.experiment, uid, trial["name"], config["sweep_run_id"])
    if (run_dir / RUN_MARKER).exists():
        rows = resume_run(run_dir, progress=False)
    else:
        if run_dir.exists() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        _, rows = start_run(cfg, progress=False, run_uid=uid)
    tune.report({**final_metrics(rows), "run_dir": str(run_dir)})


# ---- the sweep ----------------------------------------------------------------------------------------------------
def _tune_env() -> None:
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def _trainable(bundles: list[dict[str, float]]):
    from ray import tune

    return tune.with_resources(run_trial, tune.PlacementGroupFactory(bundles))


def _run_tuner(state: Mapping[str, Any], sweep_dir: Path, address: str | None, restore: bool):
    from ray import tune

    from .executor import init_ray

    _tune_env()
    base = build_config(state["base"])
    init_ray(address or base.cluster.address, None)  # the trials' own runs then join this same cluster
    bundles = trial_bundles(base, state.get("driver_cpus", 1.0))
    trainable = _trainable(bundles)
    storage = str((sweep_dir / "storage").resolve())
    if restore:
        path = os.path.join(storage, TUNE_NAME)
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"{sweep_dir}: no Tune experiment state under {path} to restore")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        param_space = {
            "trial": tune.grid_search(state["trials"]),
            "base": state["base"],
            "runs_root": state["runs_root"],
            "tracking_uri": state["tracking_uri"],
            "sweep_run_id": state["sweep_run_id"],
        }
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=state.get("max_concurrent") or None,
                                        trial_name_creator=lambda t: t.config["trial"]["name"],
                                        trial_dirname_creator=lambda t: t.config["trial"]["name"]),
            run_config=tune.RunConfig(
                name=TUNE_NAME, storage_path=storage, verbose=1,
                failure_config=tune.FailureConfig(max_failures=state["max_failures"]),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    return tuner.fit()


def create_sweep(cfg: RunConfig, params: Mapping[str, Sequence[Any]], *, name: str,
                 max_failures: int = 2, max_concurrent: int | None = None, driver_cpus: float = 1.0) -> Path:
    """Validate everything and write ``sweep.json``; returns the sweep directory. Creates the sweep's MLflow run."""
    from .preflight import tracking_uri

    check_safe_name(name, "--name")
    trials = grid(params)
    base = _absolute_paths(cfg.model_dump(mode="json"))
    root = Path(cfg.run.root).resolve()
    base["run"]["root"] = str(root)
    for t in trials:  # every trial's configuration must validate before anything runs
        build_config(base, [*t["overrides"], f"run.name={t['name']}"]).load_space()
    trial_bundles(cfg, driver_cpus)
    sweep_dir = root / "sweeps" / name
    if (sweep_dir / SWEEP_FILE).exists():
        raise ConfigError(f"--name {name!r}: {sweep_dir} already holds a sweep; use `coalora sweep --resume {sweep_dir}`")
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        check_reachable(uri)
    except ValueError as err:
        raise ConfigError(f"tracking.uri = {uri!r}: {err}") from None
    sweep_dir.mkdir(parents=True, exist_ok=True)
    sweep_uid = uuid.uuid4().hex
    run_id = sweep_parent_run(uri, cfg.tracking.experiment, sweep_uid, name)
    client = _client(uri)
    existing = client.get_run(run_id).data.params
    for k, v in {"sweep.params": json.dumps({k: list(v) for k, v in params.items()}), "sweep.trials": len(trials),
                 "sweep.max_failures": max_failures}.items():
        if k not in existing:
            client.log_param(run_id, k, str(v))
    state = {"format": SWEEP_FORMAT, "name": name, "base": base, "params": {k: list(v) for k, v in params.items()},
             "trials": trials, "runs_root": str(sweep_dir / "runs"), "tracking_uri": uri,
             "experiment": cfg.tracking.experiment, "sweep_uid": sweep_uid, "sweep_run_id": run_id, "max_failures": max_failures,
             "max_concurrent": max_concurrent, "driver_cpus": driver_cpus}
    write_json_atomic(sweep_dir / SWEEP_FILE, state)
    return sweep_dir


def load_sweep(sweep_dir: Path) -> dict[str, Any]:
    try:
        return read_marker(sweep_dir, SWEEP_FILE, SWEEP_FORMAT, "sweep")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run_sweep(sweep_dir: Path, *, address: str | None = None, restore: bool = False) -> tuple[bool, list[dict]]:
    """Run (or restore and finish) the sweep; returns (all trials finished, one summary row per trial)."""
    sweep_dir = Path(sweep_dir).resolve()
    state = load_sweep(sweep_dir)
    client = _client(state["tracking_uri"])
    run_id = state["sweep_run_id"]
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    status = "KILLED"
    try:
        results = _run_tuner(state, sweep_dir, address, restore)
        rows = []
        reported = 0
        for result in results:
            raw = result.metrics or {}
            reported += "run_dir" in raw  # only a trial that ran to its end reports (an interrupted one may not)
            metrics = {k: v for k, v in raw.items()
                       if isinstance(v, (int, float)) and "." in k and not isinstance(v, bool)}
            rows.append({"trial": (result.config or {}).get("trial", {}).get("name", "?"),
                         "error": None if result.error is None else str(result.error).splitlines()[0][:200],
                         "finished": "run_dir" in raw, **metrics})
        done = reported == len(state["trials"]) == len(rows) and all(r["error"] is None for r in rows)
        status = "FINISHED" if done else ("FAILED" if any(r["error"] for r in rows) else "KILLED")
        summary = sweep_dir / "summary.json"
        write_json_atomic(summary, rows)
        if done:
            client.log_artifact(run_id, str(summary))
        return done, rows
    finally:
        client.set_terminated(run_id, status=status)


# ---- command line -------------------------------------------------------------------------------------------------
def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="a Ray Tune experiment over runs, e.g. --param adapter.rank=4,8 --param run.seed=0,1,2")
    p.add_argument("config", nargs="?", help="YAML run configuration (default conf/default.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every trial")
    p.add_argument("--param", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="a swept field and its values (repeatable; trials are the cartesian product)")
    p.add_argument("--name", default="sweep", help="sweep name: its directory is <run.root>/sweeps/<name>")
    p.add_argument("--resume", metavar="SWEEP_DIR", help="restore an interrupted sweep and finish its trials")
    p.add_argument("--max-failures", type=int, default=2, help="retries per failed trial (default 2)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as resources allow)")
    p.add_argument("--driver-cpus", type=float, default=1.0, help="CPUs reserved for each trial's driver")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    return p


def run_sweep_command(args: argparse.Namespace) -> int:
    if args.resume:
        if args.param or args.config:
            raise ConfigError("--resume takes only the sweep directory (its parameters are in sweep.json)")
        sweep_dir, restore = Path(args.resume), True
    else:
        if not args.param:
            raise ConfigError("at least one --param section.key=v1,v2 is needed")
        path, overrides = args.config, list(args.overrides)
        if path and "=" in path and not path.endswith((".yaml", ".yml")):
            path, overrides = None, [path, *overrides]
        params: dict[str, list[Any]] = {}
        for item in args.param:
            key, values = parse_param(item)
            params[key] = values
        cfg = load_config(path, overrides)
        sweep_dir = create_sweep(cfg, params, name=args.name, max_failures=args.max_failures,
                                 max_concurrent=args.max_concurrent, driver_cpus=args.driver_cpus)
        restore = False
    print(f"sweep directory: {Path(sweep_dir).resolve()}", flush=True)
    try:
        done, rows = run_sweep(sweep_dir, address=args.address, restore=restore)
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001 - shutting down is best effort
            pass
    for row in rows:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float))
        state = "error: " + row["error"] if row["error"] else (shown if row["finished"] else "not finished")
        print(f"{row['trial']}: {state}")
    if not done:
        print(f"sweep not finished; resume: coalora sweep --resume {Path(sweep_dir).resolve()}", file=sys.stderr)
        return 130 if not any(r["error"] for r in rows) else 1
    print(f"\nsweep directory: {Path(sweep_dir).resolve()}\nruns: {load_sweep(sweep_dir)['runs_root']}")
    return 0
