"""Where worker calls run: in this process (one replica) or in Ray actors (one replica each).

Both expose the same two operations, so the driver's loop is written once and ``bench/system.py`` can time the
same run both ways. Calls are dispatched round-robin; results come back in call order.

A local Ray is bound to loopback and checked to be: Ray's ``resolve_ip_for_localhost`` turns 127.0.0.1 into the
machine's external address unless ``ray_constants.ENABLE_RAY_CLUSTER`` is off, so :func:`init_ray` turns it off
(for this process and, through the environment, for every Ray process it starts) and then refuses to run if any
process of the session listens beyond loopback. Only then is Ray's token authentication left off. A cluster address
is probed with a bounded wait before Ray is asked to join it (Ray itself retries for minutes).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any, Protocol, Sequence

from workers.worker import Worker, WorkerSpec


class Executor(Protocol):
    n_workers: int

    def map(self, method: str, calls: Sequence[tuple[Any, ...]]) -> list[Any]: ...

    def call(self, method: str, *args: Any) -> Any: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One in-process worker; ``map`` runs the calls one after another."""

    def __init__(self, spec: WorkerSpec):
        self.worker = Worker(spec)
        self.n_workers = 1

    def map(self, method: str, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        fn = getattr(self.worker, method)
        return [fn(*args) for args in calls]

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def shutdown(self) -> None:
        self.worker = None  # type: ignore[assignment]


class ClusterError(RuntimeError):
    """The Ray cluster cannot serve this run (unreachable, not Ray, too small, or not bound as promised)."""


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"cluster address {address!r} must look like host:port, ray://host:port or auto")
    return host.strip("[]"), int(port)


def probe_ray_address(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` unless a gRPC server (what Ray's GCS and Ray Client are) answers at ``address``:
    open a TCP connection, send the HTTP/2 client preface and wait for the server's SETTINGS frame. ``auto`` is left
    to Ray, which fails at once when no local cluster exists."""
    if address in ("auto", "local"):
        return
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            header = conn.recv(9)
    except OSError as err:
        raise ClusterError(f"no Ray cluster answers at {address!r} within {timeout_s:g} s ({err}); check the address "
                           "and that the head node is up (`ray status` on it)") from None
    if len(header) < 4 or header[3] != 4:  # frame type 4: SETTINGS
        raise ClusterError(f"{address!r} answers but is not a Ray cluster (no gRPC reply); check the port "
                           "(the head's GCS port, default 6379)")


def listeners_beyond_loopback(pids: set[int]) -> list[str]:
    """``ip:port (process)`` of every listening TCP socket of ``pids`` that is not bound to a loopback address."""
    import psutil

    out = []
    for conn in psutil.net_connections("inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in pids:
            continue
        ip = conn.laddr.ip
        addr = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(addr, "ipv4_mapped", None)
        if not (mapped or addr).is_loopback:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                name = "?"
            out.append(f"{ip}:{conn.laddr.port} ({name}, pid {conn.pid})")
    return sorted(out)


def session_pids() -> set[int]:
    """This process and everything it started (a local Ray's GCS, raylet, agents and workers)."""
    import psutil

    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.children(recursive=True))}


def check_loopback_only() -> None:
    """Refuse to go on if any process of this local Ray session listens beyond loopback."""
    exposed = listeners_beyond_loopback(session_pids())
    if exposed:
        raise ClusterError(f"the local Ray listens beyond 127.0.0.1 ({', '.join(exposed[:5])}); refusing to run with "
                           "authentication off. Report this with your Ray version; join a cluster with --address "
                           "meanwhile")


def init_ray(address: str | None, num_cpus: float | None, connect_timeout_s: float = 30.0) -> bool:
    """Join ``address`` (or RAY_ADDRESS) if given, else start a local Ray bound to 127.0.0.1 only. True when this
    call started a local Ray (whose processes are then this process's children)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # Read by Ray at import and by every process it starts: off means "bind the node to loopback".
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ["RAY_AUTH_MODE"] = "disabled"  # safe only because of the loopback check after start-up
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set
        # "local": a new instance even when a `ray start` cluster on this machine would otherwise be joined.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level="WARNING", log_to_driver=True)
        try:
            check_loopback_only()
        except ClusterError:
            ray.shutdown()
            raise
        return True
    probe_ray_address(address, connect_timeout_s)
    ray.init(address=address, logging_level="WARNING")
    return False


class RayExecutor:
    """``n`` worker actors; a dead actor is restarted by Ray and its in-flight calls retried."""

    def __init__(self, spec: WorkerSpec, n: int, *, cpus: float, gpus: float, max_restarts: int, address: str | None,
                 connect_timeout_s: float = 30.0, start_timeout_s: float = 900.0):
        local = not (address or os.environ.get("RAY_ADDRESS"))
        started_local = init_ray(address, max(n * cpus, 1) if local else None, connect_timeout_s)
        import ray

        from workers.actor import create_actors

        self._ray = ray
        self.actors = create_actors(spec, n, num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts)
        self.n_workers = n
        try:  # fail now, not mid-run, if a replica cannot start; a cluster too small would wait forever
            ray.get([a.pid.remote() for a in self.actors], timeout=start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            offered = ray.cluster_resources()
            self.shutdown()
            raise ClusterError(
                f"{n} worker(s) did not start within {start_timeout_s:g} s: the run asks for {n * cpus:g} CPUs and "
                f"{n * gpus:g} GPUs, the cluster offers {offered.get('CPU', 0):g} CPUs and {offered.get('GPU', 0):g} "
                "GPUs; lower cluster.workers or grow the cluster") from None
        if started_local:
            check_loopback_only()  # the worker processes, too

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def map(self, method: str, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        refs = [getattr(self.actors[i % self.n_workers], method).remote(*args) for i, args in enumerate(calls)]
        return self._ray.get(refs)

    def call(self, method: str, *args: Any) -> Any:
        return self._ray.get(getattr(self.actors[0], method).remote(*args))

    def pids(self) -> list[int]:
        return self._ray.get([a.pid.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
