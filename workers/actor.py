"""The thin Ray layer over :class:`workers.worker.Worker`: one actor per model replica.

Actors restart after their process dies (``max_restarts``) and their calls are retried until the actor is back
(``max_task_retries=-1``: a call fails only once its actor has used up its restarts). A bounded retry count is not
enough: when a whole node dies, Ray spends the retries within a second on an actor it still calls "temporarily
unavailable" (ActorUnavailableError) while the cluster takes tens of seconds to declare the node dead and restart
the actor elsewhere (tests/orchestrator/test_stack.py kills a node mid-round). Since every worker method is a pure
function of its arguments, a retried call returns what the lost one would have, so the driver never sees a partial
or duplicated result.
"""

from __future__ import annotations

from typing import Any

import ray

from .allocator import actor_options
from .worker import Worker, WorkerSpec


def create_actors(
    spec: WorkerSpec, n: int, *, num_cpus: float, num_gpus: float, max_restarts: int
) -> list[Any]:
    """``n`` worker actors, each reserving ``num_cpus`` CPUs and ``num_gpus`` GPUs (fractions allowed), started
    with ``spec.preload``'s allocator (a preload must be in the environment before the process starts)."""
    remote_cls = ray.remote(Worker).options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=max_restarts,
        max_task_retries=-1,
        **actor_options(spec.preload),
    )
    return [remote_cls.remote(spec) for _ in range(n)]
