"""What a user sees in the MLflow UI: the experiment opens on its Runs view, the parent run has one point per training
step (also across a crash and resume), and system metrics are logged."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.tracking.tracker import EXPERIMENT_KIND, StepLog, StepMetrics, Tracker, experiment_id


def parent(uri: str):
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                "tags.`coalora.role` = 'parent'")
    return client, run


def test_the_experiment_is_a_model_training_experiment_on_create_and_on_reuse(tracking_uri):
    client = MlflowClient(tracking_uri=tracking_uri)
    created = client.get_experiment(experiment_id(client, "fresh"))
    assert created.tags["mlflow.experimentKind"] == EXPERIMENT_KIND["mlflow.experimentKind"]
    old = client.create_experiment("made-elsewhere")  # e.g. by an older coalora, without the tag
    assert experiment_id(client, "made-elsewhere") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_one_point_per_step_across_a_crash_and_resume(make_config, cli):
    """Round 1's steps are logged, then the driver is SIGKILLed before its checkpoint; the resume replays round 1
    from round 0's checkpoint and must neither duplicate nor skip a step."""
    config, path = make_config(training={"steps_per_round": 3, "configs_per_step": 2, "lr": 0.005,
                                         "warmup_steps": 1, "encoder_lr": 0.001})
    killed = cli("run", str(path), "--no-progress", fault="trained:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    client, run = parent(config["tracking"]["uri"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2]
    resumed = cli("resume", str(Path(config["run"]["root"]) / "tiny"), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/encoder_lr", "train/examples_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(6)), key
    buckets = [k for k in client.get_run(run.info.run_id).data.metrics if k.startswith("train/loss_")]
    assert buckets and all(k.endswith("bit") and k[len("train/loss_"):-3].isdigit() for k in buckets)
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/encoder_lr")}
    assert lrs[0] == 0.001 and lrs[5] < lrs[1]  # warmup of one step, then the cosine decay


def test_the_ui_link_opens_the_run_in_model_training_mode(tracking_uri):
    tracker = Tracker(tracking_uri, "tests", run_key="link", run_name="link")
    link = tracker.ui_link()
    assert link.startswith(f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1, then http://127.0.0.1")
    assert link.endswith(f"/#/experiments/{tracker.experiment_id}/runs/{tracker.parent_id}"
                         "?workflowType=machine_learning")


def test_step_log_batches_until_flushed(tracking_uri):
    tracker = Tracker(tracking_uri, "tests", run_key="batch", run_name="batch")
    log = StepLog(tracker, flush_s=3600)
    for step in range(5):
        log.add(step, {"train/loss": 1.0 / (step + 1)})
    assert tracker.client.get_metric_history(tracker.parent_id, "train/loss") == []
    log.flush()
    tracker.log_steps([StepMetrics(4, time.time(), {"train/loss": 9.0})])  # a replayed step is not logged again
    history = tracker.client.get_metric_history(tracker.parent_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(5)]


def test_system_metrics_are_logged_to_the_run(tracking_uri):
    tracker = Tracker(tracking_uri, "tests", run_key="system", run_name="system")
    monitor = tracker.start_system_metrics(interval_s=0.2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = tracker.client.get_run(tracker.parent_id).data.metrics
        if "system/cpu_utilization_percentage" in metrics:
            break
        time.sleep(0.2)
    monitor.finish()
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
