"""MLflow tracking that survives resumes: runs are found by tag before they are created, params are written once,
and metrics are keyed by step so re-logging after a resume overwrites nothing and duplicates nothing.

One parent run per coalora run (tags ``coalora.run_id`` and ``coalora.role = parent``); baselines and per-method evaluations are child runs nested
under it (tag ``mlflow.parentRunId`` plus ``coalora.child``). All calls go through an explicit ``MlflowClient`` bound
to one tracking URI, never through MLflow's global active-run state, so nothing is logged to the wrong place.
"""

from __future__ import annotations

import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

RUN_ID_TAG = "coalora.run_id"
ROLE_TAG = "coalora.role"  # "parent" or "child": the parent's query must not match its children
CHILD_TAG = "coalora.child"


def default_tracking_uri(runs_root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file beside the run directories."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts beside the database: MLflow's default would be ./mlruns of whatever directory
    the process started in (the silent local-mlruns trap). A server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any compute, if an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status != 200:
                raise ValueError(f"MLflow server {uri} answered /health with HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as err:
        raise ValueError(f"MLflow tracking server {uri} is unreachable: {err}") from None


def experiment_id(client: Any, name: str) -> str:
    """The experiment called ``name``, created on first use with :func:`artifact_location`."""
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))


def find_or_create_run(client: Any, experiment: str, tags: Mapping[str, str], name: str,
                       extra_tags: Mapping[str, str] | None = None) -> str:
    """The one run whose tags include ``tags`` (created if none): what makes logging idempotent across resumes.
    ``extra_tags`` (e.g. ``mlflow.parentRunId``) are set on creation and brought up to date on a found run."""
    extra = dict(extra_tags or {})
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = client.search_runs([experiment], filter_string=query, max_results=2)
    if len(found) > 1:
        raise RuntimeError(f"more than one MLflow run matches {dict(tags)}; the tracking store is inconsistent")
    if not found:
        return client.create_run(experiment, tags={**tags, **extra}, run_name=name).info.run_id
    run = found[0]
    for k, v in extra.items():
        if run.data.tags.get(k) != v:
            client.set_tag(run.info.run_id, k, v)
    return run.info.run_id


class Tracker:
    """The parent run of one coalora run and its children."""

    def __init__(self, uri: str, experiment: str, run_id: str, run_name: str):
        from mlflow.tracking import MlflowClient

        check_reachable(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = experiment_id(self.client, experiment)
        self.parent_id = find_or_create_run(self.client, self.experiment_id, {RUN_ID_TAG: run_id, ROLE_TAG: "parent"},
                                            run_name)
        self.client.update_run(self.parent_id, status="RUNNING")  # a resumed run is running again
        self.run_id = run_id

    def child(self, name: str) -> str:
        """The nested run called ``name`` (created once)."""
        return find_or_create_run(self.client, self.experiment_id,
                                  {RUN_ID_TAG: self.run_id, ROLE_TAG: "child", CHILD_TAG: name}, name,
                                  {"mlflow.parentRunId": self.parent_id})

    def log_params_once(self, params: Mapping[str, Any], run: str | None = None) -> None:
        """Write params that are not there yet; a resumed run with the same config logs nothing new. A changed
        value is an error (MLflow forbids overwriting params, and silently keeping the old one would lie)."""
        run_id = run or self.parent_id
        existing = self.client.get_run(run_id).data.params
        for key, value in params.items():
            text = str(value)[:6000]
            if key in existing:
                if existing[key] != text:
                    raise ValueError(f"param {key!r} was logged as {existing[key]!r}; this run now has {text!r}")
                continue
            self.client.log_param(run_id, key, text)

    def log_metrics(self, metrics: Mapping[str, float], step: int, run: str | None = None) -> None:
        """Log finite metrics at ``step``, skipping (key, step) pairs already present, so a resume that repeats a
        round does not double-log it."""
        run_id = run or self.parent_id
        for key, value in metrics.items():
            if value is None or not math.isfinite(float(value)):
                continue
            history = self.client.get_metric_history(run_id, key)
            if any(m.step == step for m in history):
                continue
            self.client.log_metric(run_id, key, float(value), step=step)

    def log_artifact(self, path: Path, artifact_dir: str | None = None, run: str | None = None) -> None:
        self.client.log_artifact(run or self.parent_id, str(path), artifact_dir)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_id, status=status)
