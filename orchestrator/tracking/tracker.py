"""MLflow tracking that survives resumes: runs are found by tag before they are created, params are written once,
and metrics are keyed by step so re-logging after a resume overwrites nothing and duplicates nothing.

One parent run per coalora run (tags ``coalora.run_id`` and ``coalora.role = parent``); baselines and per-method evaluations are child runs nested
under it (tag ``mlflow.parentRunId`` plus ``coalora.child``). All calls go through an explicit ``MlflowClient`` bound
to one tracking URI, never through MLflow's global active-run state, so nothing is logged to the wrong place.

The run's key (``coalora.run_id``) is the id stored in its run directory, not its path, so a moved directory keeps
its MLflow run. Keys go into MLflow filter strings only after :func:`filter_literal` has checked them (a path with
an apostrophe once broke the query, and a crafted one could have matched another run). Every request to a tracking
server is bounded (``tracking.timeout_s``, few retries), and a run's writes that fail wait in its outbox
(orchestrator/tracking/outbox.py) while training goes on: a server or database that restarts mid-run costs no step and no
metric. A store that is still away when the run ends is an error naming it after ``tracking.outage_s``; the
run's state on disk is complete and ``coalora resume`` sends what is left.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

log = logging.getLogger(__name__)

RUN_ID_TAG = "coalora.run_id"
ROLE_TAG = "coalora.role"  # "parent" or "child": the parent's query must not match its children
CHILD_TAG = "coalora.child"
STEP_KEY = "train/loss"  # the per-step metric whose history says how far a run's steps were logged


class StepMetrics(NamedTuple):
    """One training step's metrics: its global step, wall-clock time (seconds since the epoch) and values."""

    step: int
    time: float
    values: Mapping[str, float]


class TrackingError(RuntimeError):
    """The tracking server failed or did not answer in time; the message names it and the way out."""


_LITERAL = re.compile(r"[A-Za-z0-9_.:/@+-]{1,500}")


def filter_literal(value: str) -> str:
    """``value`` quoted for an MLflow filter string, if it is made of characters that need no escaping there."""
    if not _LITERAL.fullmatch(value):
        raise ValueError(f"cannot look up an MLflow run by {value!r}: only letters, digits and _ . : / @ + - are used "
                         "in lookups")
    return f"'{value}'"


def bound_http_waits(timeout_s: float) -> None:
    """Bound every MLflow HTTP request of this process: ``timeout_s`` per attempt, two retries with short backoff.
    (MLflow's defaults, 120 s and seven retries with doubling backoff, stall a run for minutes on a dead server.)
    Values the user set in the environment are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", "3")  # direct S3 artifact uploads (botocore)


def default_tracking_uri(runs_root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file beside the run directories."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts beside the database: MLflow's default would be ./mlruns of whatever directory
    the process started in (the silent local-mlruns trap). A server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def _probe_tcp(host: str, port: int, what: str, timeout_s: float) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise ValueError(f"{what} at {host}:{port} is unreachable within {timeout_s:g} s ({err})") from None


TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "file")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any compute, if the URI's scheme is not a tracking store, or if the tracking server
    (HTTP), the database behind a database URI, or the S3 endpoint named by ``MLFLOW_S3_ENDPOINT_URL`` does not
    answer within ``timeout_s``."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else "file"
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}; use sqlite:///PATH, postgresql://USER@HOST/DB or "
                         "http(s)://SERVER")
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint)
        if parts.hostname:
            _probe_tcp(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                       "S3 endpoint (MLFLOW_S3_ENDPOINT_URL)", timeout_s)
    if scheme in ("postgresql", "mysql", "mssql"):
        parts = urllib.parse.urlsplit(uri)
        if parts.hostname:  # no host: a Unix socket, checked by the driver on connect
            _probe_tcp(parts.hostname, parts.port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}[scheme],
                       "tracking database", timeout_s)
        return
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status != 200:
                raise ValueError(f"MLflow server {uri} answered /health with HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as err:
        raise ValueError(f"MLflow tracking server {uri} is unreachable: {err}") from None


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The tag MLflow 3's UI reads to open an experiment on its Runs view; without it the UI shows the GenAI traces
overview ("No data")."""


def experiment_id(client: Any, name: str) -> str:
    """The experiment called ``name``, created on first use with :func:`artifact_location`, and marked as a
    model-training experiment (:data:`EXPERIMENT_KIND`) on creation and on reuse."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri),
                                        tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def find_run(client: Any, experiment: str, tags: Mapping[str, str]) -> Any | None:
    """The one run whose tags include ``tags``, or None; more than one is an inconsistent store."""
    query = " and ".join(f"tags.`{k}` = {filter_literal(v)}" for k, v in tags.items())
    found = client.search_runs([experiment], filter_string=query, max_results=2)
    if len(found) > 1:
        raise RuntimeError(f"more than one MLflow run matches {dict(tags)}; the tracking store is inconsistent")
    return found[0] if found else None


def find_or_create_run(client: Any, experiment: str, tags: Mapping[str, str], name: str,
                       extra_tags: Mapping[str, str] | None = None) -> str:
    """The one run whose tags include ``tags`` (created if none): what makes logging idempotent across resumes.
    ``extra_tags`` (e.g. ``mlflow.parentRunId``) are set on creation and brought up to date on a found run."""
    extra = dict(extra_tags or {})
    run = find_run(client, experiment, tags)
    if run is None:
        return client.create_run(experiment, tags={**tags, **extra}, run_name=name).info.run_id
    for k, v in extra.items():
        if run.data.tags.get(k) != v:
            client.set_tag(run.info.run_id, k, v)
    return run.info.run_id


def attach_artifacts(uri: str, experiment: str, run_key: str, directory: Path, artifact_path: str,
                     timeout_s: float = 30.0) -> str | None:
    """Store ``directory`` under the finished parent run of ``run_key`` (e.g. an export), without reopening the run
    (its status stays what it was). Returns the MLflow run id, or None when the store holds no such run."""
    from mlflow.tracking import MlflowClient

    bound_http_waits(timeout_s)
    check_reachable(uri, timeout_s)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    run = find_run(client, exp.experiment_id, {RUN_ID_TAG: run_key, ROLE_TAG: "parent"})
    if run is None:
        return None
    client.log_artifacts(run.info.run_id, str(directory), artifact_path)
    return run.info.run_id


class Tracker:
    """The parent run of one coalora run and its children. ``run_key`` is the run's stored id (see the module).

    With an outbox (:meth:`keep_outbox`, a run directory's: orchestrator/tracking/outbox.py), writes during the run never fail: one the
    store does not take waits there, and the outbox is sent, oldest first, at the next write at least ``retry_s``
    later, and by :meth:`settle` at the run's end. Without one (benchmarks), a failed write raises
    :class:`TrackingError`. Opening the run, params and the dataset input are start-up checks and always raise."""

    def __init__(self, uri: str, experiment: str, run_key: str, run_name: str, timeout_s: float = 30.0,
                 retry_s: float = 10.0):
        from mlflow.tracking import MlflowClient

        bound_http_waits(timeout_s)
        check_reachable(uri, timeout_s)
        self.uri = uri
        self.run_id = run_key
        self.retry_s = retry_s
        self._children: dict[str, str] = {}
        self._last_step: int | None = None  # the newest per-step metric in the store (read on first use)
        self._next_try = 0.0
        self._outage: str | None = None  # the failure that started the current outage
        self._outbox: Any = None
        with self._service("open the run"):
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = experiment_id(self.client, experiment)
            self.parent_id = find_or_create_run(self.client, self.experiment_id,
                                                {RUN_ID_TAG: run_key, ROLE_TAG: "parent"}, run_name)
            self.client.update_run(self.parent_id, status="RUNNING")  # a resumed run is running again

    def ui_link(self) -> str:
        """Where a person watches the run. MLflow 3.17's UI opens in its GenAI mode unless the address (or the
        browser's memory of a click on "Model training") says otherwise, whatever the experiment's kind tag."""
        page = f"#/experiments/{self.experiment_id}/runs/{self.parent_id}?workflowType=machine_learning"
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/{page}"
        return f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1, then http://127.0.0.1:5000/{page}"

    def keep_outbox(self, path: Path) -> None:
        """From now on keep writes the store does not take in ``path`` (the locked run directory's outbox), after
        sending what a previous process left there."""
        from .outbox import Outbox

        self._outbox = Outbox(path)
        # A previous process's own ending (FAILED, KILLED) is this process's to decide.
        self._outbox.drop(lambda op: op["op"] == "end" and op.get("child") is None)
        if len(self._outbox):
            log.warning("sending %d MLflow writes kept in %s", len(self._outbox), path)
        if not self._drain(force=True):
            raise TrackingError(f"MLflow tracking store {self.uri} did not take the writes kept in {path}: "
                                f"{self._outage}")

    @contextmanager
    def _service(self, what: str) -> Iterator[None]:
        """Turn a failure of the tracking store into one :class:`TrackingError` that names it."""
        try:
            yield
        except TrackingError:
            raise
        except Exception as err:  # noqa: BLE001 - MLflow, requests, SQLAlchemy and botocore all raise their own
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise TrackingError(f"MLflow tracking store {self.uri} failed to {what}: {first}. The run's state on "
                                "disk is intact: fix the store and `coalora resume` the run") from err

    # ---- writes: sent now, or kept in the outbox ---------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int, child: str | None = None) -> None:
        """Log finite metrics at ``step`` (to the child run ``child``, else the parent), skipping (key, step) pairs
        already present, so a resume that repeats a round does not double-log it."""
        values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._submit({"op": "metrics", "child": child, "step": int(step), "values": values})

    def log_steps(self, rows: list["StepMetrics"]) -> None:
        """Per-step metrics of the parent run in batched requests. Steps at or below the last one already in the
        store are skipped: a resume replays the steps after its checkpoint exactly, so what was logged before the
        crash stays and nothing appears twice."""
        if rows:
            self._submit({"op": "steps", "rows": [[r.step, r.time, {k: float(v) for k, v in r.values.items()
                                                                      if math.isfinite(float(v))}] for r in rows]})

    def log_artifact(self, path: Path, artifact_dir: str | None = None, child: str | None = None) -> None:
        """Store the file ``path`` (as it is when the write is sent) under ``artifact_dir`` of the run."""
        self._submit({"op": "artifact", "child": child, "path": str(Path(path).resolve()), "dir": artifact_dir})

    def end_child(self, child: str, status: str = "FINISHED") -> None:
        self._submit({"op": "end", "child": child, "status": status})

    def finish(self, status: str = "FINISHED") -> None:
        self._submit({"op": "end", "child": None, "status": status})

    def settle(self, outage_s: float) -> None:
        """Send what the outbox holds, waiting up to ``outage_s`` for an unreachable store; then, if writes remain,
        raise a :class:`TrackingError` that says where they are kept and how to send them."""
        deadline = time.monotonic() + outage_s
        while not self._drain(force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingError(
                    f"MLflow tracking store {self.uri} has not answered for {outage_s:g} s at the end of the run "
                    f"({self._outage}); {len(self._outbox)} writes are kept in {self._outbox.path}. The run's "
                    f"state on disk is complete: `coalora resume {self._outbox.path.parent}` sends them once the "
                    "store answers")
            time.sleep(min(self.retry_s, left))

    def _submit(self, op: dict[str, Any]) -> None:
        if self._outbox is None:
            self._apply(op)
            return
        if not len(self._outbox):
            try:
                self._apply(op)
                return
            except TrackingError as err:
                self._failed(err)
        self._outbox.add(op)
        self._drain()

    def _drain(self, force: bool = False) -> bool:
        """Send the outbox oldest first; False when the store failed (the rest waits ``retry_s``)."""
        if self._outbox is None or not len(self._outbox):
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        try:
            check_reachable(self.uri, timeout_s=2.0)  # a quick probe: no bounded-but-long request to a dead host
        except ValueError as err:
            self._failed(err)
            return False
        sent = 0
        while len(self._outbox):
            try:
                self._apply(self._outbox.ops[0])
            except TrackingError as err:
                self._failed(err)
                return False
            self._outbox.sent_first()
            sent += 1
        if self._outage is not None:
            log.warning("MLflow tracking store %s answers again: sent the %d writes kept meanwhile", self.uri, sent)
            self._outage = None
        return True

    def _failed(self, err: Exception) -> None:
        self._next_try = time.monotonic() + self.retry_s
        if self._outage is None:
            self._outage = str(err).split(". The run's state")[0]
            if self._outbox is not None:
                log.warning("%s. Training goes on; MLflow writes wait in %s and are sent when the store answers",
                            self._outage, self._outbox.path)

    def _run_of(self, child: str | None) -> str:
        if child is None:
            return self.parent_id
        if child not in self._children:
            self._children[child] = self.child(child)
        return self._children[child]

    def _apply(self, op: dict[str, Any]) -> None:
        """Send one write to the store (idempotent: see the module and orchestrator/tracking/outbox.py)."""
        from mlflow.entities import Metric

        kind = op["op"]
        with self._service({"metrics": "log metrics", "steps": "log step metrics", "artifact": "store an artifact",
                            "end": "end a run"}[kind]):
            if kind == "steps":
                if self._last_step is None:
                    history = self.client.get_metric_history(self.parent_id, STEP_KEY)
                    self._last_step = max((m.step for m in history), default=-1)
                fresh = [row for row in op["rows"] if row[0] > self._last_step]
                metrics = [Metric(key, value, int(t * 1000), step) for step, t, values in fresh
                           for key, value in values.items()]
                for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
                    self.client.log_batch(self.parent_id, metrics=metrics[i : i + 1000])
                if fresh:
                    self._last_step = max(row[0] for row in fresh)
                return
            run = self._run_of(op.get("child"))
            if kind == "metrics":
                for key, value in op["values"].items():
                    if not any(m.step == op["step"] for m in self.client.get_metric_history(run, key)):
                        self.client.log_metric(run, key, value, step=op["step"])
            elif kind == "artifact":
                self.client.log_artifact(run, op["path"], op["dir"])
            else:
                self.client.set_terminated(run, status=op["status"])

    # ---- start-up: these raise ---------------------------------------------------------------------------------------
    def child(self, name: str) -> str:
        """The nested run called ``name`` (created once)."""
        with self._service(f"find the child run {name!r}"):
            return find_or_create_run(self.client, self.experiment_id,
                                      {RUN_ID_TAG: self.run_id, ROLE_TAG: "child", CHILD_TAG: name}, name,
                                      {"mlflow.parentRunId": self.parent_id})

    def log_params_once(self, params: Mapping[str, Any], run: str | None = None) -> None:
        """Write params that are not there yet; a resumed run with the same config logs nothing new. A changed
        value is an error (MLflow forbids overwriting params, and silently keeping the old one would lie)."""
        run_id = run or self.parent_id
        with self._service("read params"):
            existing = self.client.get_run(run_id).data.params
        for key, value in params.items():
            text = str(value)[:6000]
            if key in existing:
                if existing[key] != text:
                    raise ValueError(f"param {key!r} was logged as {existing[key]!r}; this run now has {text!r}")
                continue
            with self._service("log params"):
                self.client.log_param(run_id, key, text)

    def start_system_metrics(self, interval_s: float = 10.0) -> Any:
        """CPU, memory, disk, network (and GPU where present) of this process's machine, logged to the parent run
        by MLflow's own monitor in a background thread; returns it so the caller can stop it."""
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter on the terminal
        monitor = SystemMetricsMonitor(self.parent_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=self.uri)
        monitor.start()
        return monitor

    def log_dataset(self, name: str, digest: str, source: str, source_type: str, rows: int) -> None:
        """Record what the run trained on as an MLflow dataset input (the run page's Dataset column), once."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        with self._service("log the dataset input"):
            logged = self.client.get_run(self.parent_id).inputs.dataset_inputs
            if any(d.dataset.name == name and d.dataset.digest == digest for d in logged):
                return
            dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps({"uri": source}),
                              profile=json.dumps({"num_rows": rows}))
            self.client.log_inputs(self.parent_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])


class StepLog:
    """Buffers per-step metrics and sends them in one batch every ``flush_s`` seconds (and on :meth:`flush`), so
    the MLflow UI shows a round's progress while it runs at the cost of one request per ``flush_s``."""

    def __init__(self, tracker: Tracker, flush_s: float = 10.0):
        self.tracker = tracker
        self.flush_s = flush_s
        self._rows: list[StepMetrics] = []
        self._last_flush = time.monotonic()
        self.seconds = 0.0  # spent here, for the overhead figure (bench/system.py)

    def add(self, step: int, values: Mapping[str, float]) -> None:
        started = time.perf_counter()
        self._rows.append(StepMetrics(step, time.time(), dict(values)))
        self.seconds += time.perf_counter() - started
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        started = time.perf_counter()
        if self._rows:
            self.tracker.log_steps(self._rows)
            self._rows = []
        self._last_flush = time.monotonic()
        self.seconds += time.perf_counter() - started

