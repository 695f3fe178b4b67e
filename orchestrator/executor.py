"""Where worker calls run: in this process (one replica) or in Ray actors (one replica each).

Both expose the same two operations, so the driver's loop is written once and ``bench/system.py`` can time the
same run both ways. Calls are dispatched round-robin; results come back in call order.
"""

from __future__ import annotations

import os
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


def init_ray(address: str | None, num_cpus: float | None) -> None:
    """Join ``address`` (or RAY_ADDRESS) if given, else start a local Ray bound to 127.0.0.1 only."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # Ray listens on every interface by default; a local run must not be reachable from outside.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level="WARNING", log_to_driver=True)
    else:
        ray.init(address=address, logging_level="WARNING")


class RayExecutor:
    """``n`` worker actors; a dead actor is restarted by Ray and its in-flight calls retried."""

    def __init__(self, spec: WorkerSpec, n: int, *, cpus: float, gpus: float, max_restarts: int, address: str | None):
        import ray

        from workers.actor import create_actors

        init_ray(address, None if address or os.environ.get("RAY_ADDRESS") else max(n * cpus, 1))
        self._ray = ray
        self.actors = create_actors(spec, n, num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts)
        self.n_workers = n
        ray.get([a.pid.remote() for a in self.actors])  # fail now, not mid-run, if a replica cannot start

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
