"""The MLflow record matches what happened: a run ended by a signal or by a dead Ray is not left RUNNING, and a
run directory that moves keeps its one parent run (runs are keyed by the id stored in the directory)."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

from orchestrator.runs import run_key


def parents(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tests")
    return client.search_runs([exp.experiment_id], "tags.`coalora.role` = 'parent'") if exp else []


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_sigterm_ends_the_parent_run_killed(make_config, tmp_path, cli_start):
    config, path = make_config(training={"steps_per_round": 40})
    run_dir = Path(config["run"]["root"]) / "tiny"
    proc = cli_start("run", str(path), "--no-progress", log=tmp_path / "log")
    wait_for(lambda: (run_dir / "checkpoints" / "round-0000").exists() or proc.poll() is not None, 120,
             "round 0's checkpoint")
    assert proc.poll() is None, (tmp_path / "log").read_text()[-2000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    (parent,) = parents(config["tracking"]["uri"])
    assert parent.info.status == "KILLED"
    # the lock died with the process: the run resumes at once
    assert "in use" not in (tmp_path / "log").read_text()


def test_dead_ray_ends_the_parent_run_failed(make_config, tmp_path, cli_start):
    """The local Ray killed under a running driver (GCS, raylet and the worker): the driver stops in bounded time, the
    terminal says why, and the parent run is FAILED, not RUNNING. Two endings are Ray's to choose: the driver's call
    fails and coalora reports the error, or Ray itself terminates the driver (exit 1, nothing printed, when its
    plasma-store connection breaks) and the run's watchdog reports it and marks the run. (The GCS alone dying is
    survived: the actors keep answering, and the run finishes normally.)"""
    config, path = make_config(training={"steps_per_round": 40}, cluster={"executor": "ray", "workers": 1})
    run_dir = Path(config["run"]["root"]) / "tiny"
    proc = cli_start("run", str(path), "--no-progress", log=tmp_path / "log")
    wait_for(lambda: (run_dir / "checkpoints" / "round-0000").exists() or proc.poll() is not None, 180,
             "round 0's checkpoint")
    assert proc.poll() is None, (tmp_path / "log").read_text()[-2000:]
    children = psutil.Process(proc.pid).children(recursive=True)
    ray_procs = [p for p in children if "orchestrator.tracking.watchdog" not in " ".join(p.cmdline())]
    assert len(ray_procs) == len(children) - 1, "the run's watchdog is one of the driver's children"
    assert {"gcs_server", "raylet"} <= {p.name() for p in ray_procs}
    for p in ray_procs:
        p.kill()
    rc = proc.wait(timeout=240)
    assert rc not in (0, None)
    uri = config["tracking"]["uri"]
    wait_for(lambda: parents(uri)[0].info.status != "RUNNING", 60, "the parent run to end")
    log = (tmp_path / "log").read_text()
    assert "coalora run: error:" in log or "ended abruptly (killed, or its Ray died)" in log, (rc, log[-2000:])
    assert "Traceback" not in log, log[-2000:]
    (parent,) = parents(uri)
    assert parent.info.status == "FAILED", log[-2000:]


def test_sigkilled_driver_is_marked_failed_by_its_watchdog(make_config, cli):
    """No Python runs in a SIGKILLed process: the run's watchdog process notices the closed pipe and ends the
    parent run FAILED; a resume then owns the record again and ends it FINISHED."""
    config, path = make_config()
    killed = cli("run", str(path), "--no-progress", fault="trained:1")
    assert killed.returncode == -signal.SIGKILL
    uri = config["tracking"]["uri"]
    wait_for(lambda: parents(uri)[0].info.status == "FAILED", 60, "the watchdog to mark the run FAILED")
    resumed = cli("resume", str(Path(config["run"]["root"]) / "tiny"), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (parent,) = parents(uri)
    assert parent.info.status == "FINISHED"


def test_moved_run_directory_keeps_its_parent_run(make_config, tmp_path, cli):
    config, path = make_config()
    killed = cli("run", str(path), "--no-progress", fault="checkpoint:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    old = Path(config["run"]["root"]) / "tiny"
    key = run_key(old)
    new = tmp_path / "elsewhere" / "tiny"
    new.parent.mkdir()
    shutil.move(old, new)
    resumed = cli("resume", str(new), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (parent,) = parents(config["tracking"]["uri"])
    assert parent.data.tags["coalora.run_id"] == key == run_key(new)
    assert parent.info.status == "FINISHED"
