"""A local run's Ray listens on loopback only (Ray 2.60 rewrites 127.0.0.1 to the machine's external address unless
told otherwise), and coalora checks that it does before running with authentication off."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.executor import ClusterError, check_loopback_only, listeners_beyond_loopback


def external_ipv4() -> list[str]:
    """This machine's own non-loopback IPv4 addresses (traffic to them never leaves the machine)."""
    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                out.append(a.address)
    return out


def tree_listeners(pid: int) -> set[tuple[str, int, str]]:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    names = {}
    for p in procs:
        try:
            names[p.pid] = p.name()
        except psutil.Error:
            pass
    return {(c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in names}


def test_detector_sees_a_socket_bound_beyond_loopback():
    exposed, private = socket.socket(), socket.socket()
    exposed.bind(("0.0.0.0", 0))
    private.bind(("127.0.0.1", 0))
    exposed.listen()
    private.listen()
    try:
        found = listeners_beyond_loopback({psutil.Process().pid})
        assert any(f"0.0.0.0:{exposed.getsockname()[1]} " in f for f in found)
        assert not any(f":{private.getsockname()[1]} " in f for f in found)
    finally:
        exposed.close()
        private.close()


def test_check_refuses_a_child_listening_beyond_loopback():
    child = subprocess.Popen([sys.executable, "-c", "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',0)); "
                              "s.listen(); print(s.getsockname()[1], flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        with pytest.raises(ClusterError, match=rf"listens beyond 127\.0\.0\.1 \(0\.0\.0\.0:{port} .*refusing"):
            check_loopback_only()
    finally:
        child.kill()
        child.wait()


def test_ray_imported_before_init_still_binds_loopback_and_starts_its_own_instance():
    """The binding must hold even when something imported ray before coalora set Ray's environment; and a local
    run starts its own Ray even where a `ray start` cluster was recorded on the machine (plain ``ray.init()`` would
    join the address in <tmp>/ray/ray_current_cluster, here a dead one)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths stay under 107 characters
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
        code = ("import ray; from orchestrator.executor import init_ray, listeners_beyond_loopback, session_pids; "
                "print('started', init_ray(None, 1)); print('exposed', listeners_beyond_loopback(session_pids())); "
                "ray.shutdown()")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                             cwd=Path(__file__).resolve().parents[2], env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
        assert out.returncode == 0, out.stderr[-2000:]
        assert "started True" in out.stdout and "exposed []" in out.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_local_ray_run_listens_only_on_loopback(make_config, tmp_path, cli_start):
    """What `ss -ltnp` would show during a run, read with psutil from the run's whole process tree, and a
    connection attempt to the GCS port through each of this machine's external addresses."""
    config, path = make_config(cluster={"executor": "ray", "workers": 1})
    proc = cli_start("run", str(path), "--no-progress", log=tmp_path / "log", pause="checkpoint:3")
    seen: set[tuple[str, int, str]] = set()
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= tree_listeners(proc.pid)
        if any(name == "gcs_server" for _, _, name in seen) and (Path(config["run"]["root"]) / "tiny" /
                                                                  "checkpoints" / "round-0001").exists():
            break
        time.sleep(0.2)
    seen |= tree_listeners(proc.pid)
    gcs_ports = {port for _, port, name in seen if name == "gcs_server"}
    refused = []
    for ip in external_ipv4():
        for port in gcs_ports:
            try:
                socket.create_connection((ip, port), timeout=2).close()
            except OSError:
                refused.append((ip, port))
            else:
                refused.append(None)
    assert proc.wait(timeout=240) == 0, (tmp_path / "log").read_text()[-2000:]
    names = {name for _, _, name in seen}
    assert {"gcs_server", "raylet"} <= names, seen
    exposed = [(ip, port, name) for ip, port, name in seen
               if not ipaddress.ip_address(ip).is_loopback
               and not getattr(ipaddress.ip_address(ip), "ipv4_mapped", None)]
    mapped = [(ip, port, name) for ip, port, name in seen
              if (m := getattr(ipaddress.ip_address(ip), "ipv4_mapped", None)) and not m.is_loopback]
    assert exposed == [] and mapped == [], seen
    assert None not in refused  # the GCS is not reachable through any external address
