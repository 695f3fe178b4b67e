"""Issue #6 on loopback: a real two-node Ray cluster (two `ray start` processes) and a real `mlflow server` with
served artifacts. The driver finds both only through RAY_ADDRESS and MLFLOW_TRACKING_URI (no address or URI in the
configuration), its two worker replicas land one per node, and every artifact lands in the server's artifact store,
never in a local ./mlruns or the driver's working directory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import executor as executor_module
from orchestrator.config import build_config
from orchestrator.runs import start_run

BIN = Path(sys.executable).parent
LOOPBACK_RAY_CLI = """
import sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def node_args() -> list[str]:
    """Ports that default to fixed numbers are picked free, so this cluster never collides with another."""
    return ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]


def stop(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM to the PID we started (`ray start --block` then stops the processes it launched)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:2]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def wait_tcp(address: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    host, port = address.split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{address} did not open in {timeout}s:\n{log.read_text()[-3000:]}")


def wait_nodes(address: str, n: int, env: dict[str, str], procs, logs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    probe = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))")
    host, port = address.split(":")
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise AssertionError(f"ray node exited {p.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            time.sleep(0.5)
            continue
        out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                             timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise AssertionError(f"{n} Ray nodes did not come up:\n" + "\n".join(l.read_text()[-2000:] for l in logs))


def files_under(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def ray_disconnect():
    import ray

    yield
    ray.shutdown()


def test_run_across_two_ray_nodes_with_remote_mlflow_server(make_config, tmp_path, mlflow_template, monkeypatch,
                                                            ray_disconnect):
    import ray

    env = cluster_env()
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    # Short root: Ray's unix socket paths must stay under 107 characters.
    ray_tmp = Path(tempfile.mkdtemp(prefix="crt", dir="/tmp"))
    artifacts = tmp_path / "mlflow-artifacts"
    artifacts.mkdir()
    db = tmp_path / "server.db"
    shutil.copy(mlflow_template, db)
    gcs_port, mlflow_port = free_port(), free_port()
    address = f"127.0.0.1:{gcs_port}"
    server_uri = f"http://127.0.0.1:{mlflow_port}"
    head = worker = server = None
    logs = {name: logs_dir / f"{name}.log" for name in ("head", "worker", "mlflow")}
    try:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
             str(artifacts), "--serve-artifacts", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
            env=env, cwd=tmp_path, stdout=logs["mlflow"].open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--include-dashboard=false",
             f"--temp-dir={ray_tmp}", *node_args()],
            env=env, cwd=tmp_path, stdout=logs["head"].open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_tcp(address, head, logs["head"])  # the worker node retries until the head's GCS answers
        # A worker node on loopback: `ray start --address` refuses to join while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
        # ("multi-node clusters are not supported"), and with it enabled it rewrites a loopback --address to the
        # machine's outward IP, where this head does not listen. So the worker runs Ray's own CLI with that one
        # rewrite disabled: every port of both nodes stays bound to 127.0.0.1.
        worker_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        worker = subprocess.Popen(
            [sys.executable, "-c", LOOPBACK_RAY_CLI, "start", f"--address={address}", *node_args()],
            env=worker_env, cwd=tmp_path, stdout=logs["worker"].open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_nodes(address, 2, env, [head, worker], [logs["head"], logs["worker"]])
        wait_http(f"{server_uri}/health", server, logs["mlflow"])

        # The driver is told nothing but the two environment variables.
        monkeypatch.setenv("RAY_ADDRESS", address)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
        cwd = tmp_path / "driver-cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        placed: list[str] = []
        real_shutdown = executor_module.RayExecutor.shutdown

        def recording_shutdown(self):
            placed.extend(ray.get([a.__ray_call__.remote(lambda w: ray.get_runtime_context().get_node_id())
                                   for a in self.actors]))
            real_shutdown(self)

        monkeypatch.setattr(executor_module.RayExecutor, "shutdown", recording_shutdown)
        config, _ = make_config(
            cluster={"executor": "ray", "workers": 2, "cpus_per_worker": 1, "address": None},
            tracking={"uri": None, "experiment": "cluster"},
            search={"rounds": 1},
        )
        run_dir, rows = start_run(build_config(config), progress=False)

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(alive) == 2
        assert len(placed) == 2 and set(placed) == alive  # one replica on each node
        assert rows

        client = MlflowClient(tracking_uri=server_uri)
        exp = client.get_experiment_by_name("cluster")
        parents = client.search_runs([exp.experiment_id], "tags.`coalora.role` = 'parent'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].info.artifact_uri.startswith("mlflow-artifacts:")
        stored = files_under(artifacts)
        assert any(p.endswith("rounds/round-0001/pareto.png") for p in stored), stored
        assert any(p.endswith("final/evaluation.json") for p in stored), stored
        listed = {a.path for a in client.list_artifacts(parents[0].info.run_id, "final")}
        assert "final/evaluation.json" in listed
        # Nothing written beside the driver: no ./mlruns, no stray artifact copies.
        assert not (cwd / "mlruns").exists() and files_under(cwd) == set()
        assert not (tmp_path / "mlruns").exists() and not (run_dir / "mlruns").exists()
    finally:
        ray.shutdown()
        stop(worker)
        stop(head)
        stop(server)
        shutil.rmtree(ray_tmp, ignore_errors=True)
