"""No hangs: every external service gets a bounded wait and a clear error naming it, a tracking server that goes
away mid-run costs no training, and an impossible request (more unseen configurations than the space holds) is
refused instead of looping forever."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import ConfigError, build_config
from orchestrator.runs import start_run

sys.path.insert(0, str(Path(__file__).parents[1] / "orchestrator"))
from stack import free_port  # noqa: E402  (tests/orchestrator/stack.py: the services' port helper)


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def refused(config: dict, match: str, tmp_path: Path, bound_s: float) -> None:
    before = snapshot(tmp_path)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=match):
        start_run(build_config(config), progress=False)
    assert time.monotonic() - started < bound_s
    assert snapshot(tmp_path) == before


def test_more_unseen_configurations_than_the_space_holds(make_config, tmp_path):
    space = tmp_path / "two-settings.yaml"
    space.write_text("code: [nf3, nf4]\nscale_bits: [8]\nscale2_format: [fp32]\nblock0: [64]\nblock1: [256]\n")
    config, _ = make_config(search={"space": str(space), "budget_min": 3.2, "budget_max": 4.0},
                            evaluation={"targets": [3.5], "unseen": 100000})
    refused(config, r"evaluation\.unseen = 100000: the space has only \d+ configuration\(s\) besides", tmp_path, 120)


def test_unreachable_cluster_address(make_config, tmp_path):
    config, _ = make_config(cluster={"executor": "ray", "address": f"127.0.0.1:{free_port()}",
                                     "connect_timeout_s": 2})
    refused(config, r"cluster\.address = '127\.0\.0\.1:\d+': no Ray cluster answers .* within 2 s", tmp_path, 30)


def test_cluster_address_that_is_not_ray(make_config, tmp_path):
    """A listener that accepts and never answers (not a GCS): refused within the connect timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        config, _ = make_config(cluster={"executor": "ray", "address": f"127.0.0.1:{server.getsockname()[1]}",
                                         "connect_timeout_s": 2})
        refused(config, r"cluster\.address = .*within 2 s \(timed out\)", tmp_path, 30)
    finally:
        server.close()


def test_unreachable_tracking_database_and_s3_endpoint(make_config, tmp_path, monkeypatch):
    config, _ = make_config(tracking={"uri": f"postgresql://mlflow:pw@127.0.0.1:{free_port()}/mlflow",
                                      "timeout_s": 2})
    refused(config, r"tracking database at 127\.0\.0\.1:\d+ is unreachable within 2 s", tmp_path, 30)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    config, _ = make_config()
    refused(config, r"S3 endpoint \(MLFLOW_S3_ENDPOINT_URL\) at 127\.0\.0\.1:\d+ is unreachable", tmp_path, 30)


# ---- a real MLflow server that dies mid-run --------------------------------------------------------------------
class MlflowServer:
    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=(self.root / "server.log").open("a"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((self.root / "server.log").read_text()[-3000:])
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    root = tmp_path / "mlflow-server"
    root.mkdir()
    server = MlflowServer(root, free_port())
    server.start()
    yield server
    server.stop()


def test_mlflow_server_gone_for_good_mid_run_costs_no_training_and_resume_sends_the_rest(
        make_config, tmp_path, mlflow_server, cli_start, cli):
    """The server dies right after round 0's checkpoint and stays away: training goes on to the end with every
    MLflow write kept in the run's outbox, the run then waits ``tracking.outage_s`` and stops with an error that
    names the store and the way out; with the server back, `coalora resume` sends the outbox, nothing twice."""
    config, path = make_config(tracking={"uri": mlflow_server.uri, "timeout_s": 3, "outage_s": 4})
    run_dir = Path(config["run"]["root"]) / "tiny"
    proc = cli_start("run", str(path), "--no-progress", log=tmp_path / "run.log", pause="checkpoint:10")
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "round-0000").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-2000:]
        time.sleep(0.2)
    mlflow_server.stop()  # while the run pauses right after checkpoint 0
    rc = proc.wait(timeout=300)
    log = (tmp_path / "run.log").read_text()
    assert rc == 1, log[-2000:]
    assert "Training goes on" in log and "has not answered for 4 s at the end of the run" in log, log[-2000:]
    assert f"MLflow: {mlflow_server.uri}/#/experiments/1/runs/" in log and "workflowType=machine_learning" in log
    assert f"coalora resume {run_dir}" in log, log[-2000:]
    assert (run_dir / "final" / "evaluation.json").exists()  # every round and the final evaluation ran
    kept = [json.loads(line) for line in (run_dir / "tracking-outbox.jsonl").read_text().splitlines()]
    assert {op["op"] for op in kept} >= {"steps", "metrics", "artifact"}
    mlflow_server.start()
    resumed = cli("resume", str(run_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (run_dir / "tracking-outbox.jsonl").exists()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("tests")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`coalora.role` = 'parent'")
    assert parent.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "hypervolume")] == [0, 1, 2]
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "train/loss")) == [0, 1, 2, 3]
    children = client.search_runs([exp.experiment_id], "tags.`coalora.role` = 'child'")
    assert {c.data.tags["coalora.child"] for c in children} == {"coa-lora", "no-adapter"}
    assert all(c.info.status == "FINISHED" for c in children)
    listed = {a.path for a in client.list_artifacts(parent.info.run_id, "final")}
    assert {"final/evaluation.json", "final/evaluation.md"} <= listed
