"""Ray Tune adapter: :class:`ParetoSearcher` as a ``ray.tune.search.Searcher``.

Each Tune trial evaluates one configuration, given to the trainable as ``config["x"]`` (the encoded vector as a
list of ints). The adapter first hands out the ``initial`` configurations (e.g. the ILP pool), then asks the
searcher for ``batch_size`` proposals at a time once at least two results are in; while none can be made it returns
None, which tells Tune to retry later. It lives in orchestrator/ because search/ knows no Ray (nor models).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from ray.tune.search import Searcher

from search.searcher import ParetoSearcher, atomic_write


class ParetoTuneSearcher(Searcher):
    """Suggest configurations from a :class:`ParetoSearcher`; report ``metric`` (minimised) back to it.

    The wrapped searcher is ``self.pareto``: Tune treats an attribute named ``searcher`` as a wrapped Tune Searcher.
    """

    def __init__(self, searcher: ParetoSearcher, initial: Sequence[np.ndarray] = (), metric: str = "loss",
                 batch_size: int = 8) -> None:
        super().__init__(metric=metric, mode="min")
        self.pareto = searcher
        self.batch_size = int(batch_size)
        self._queue: list[list[int]] = [np.asarray(x, dtype=np.int64).tolist() for x in initial]
        self._live: dict[str, list[int]] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        if mode not in (None, "min"):
            return False
        if metric:
            self._metric = metric
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._queue and len(self.pareto.pool) >= 2:
            pending = [np.asarray(x) for x in self._live.values()]
            self._queue = [x.tolist() for x in self.pareto.propose(self.batch_size, exclude=pending)]
        if not self._queue:
            return None
        x = self._queue.pop(0)
        self._live[trial_id] = x
        return {"x": x}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        x = self._live.pop(trial_id, None)
        if x is None or error or not result or self.metric not in result:
            return
        self.pareto.tell([(np.asarray(x, dtype=np.int64), float(result[self.metric]))])

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: the searcher (pool as lists: ints and float64 are exact in JSON), queue, live trials."""
        meta, tensors = self.pareto.state_dict()
        return {"searcher": meta, "pool": tensors["pool"].tolist(), "loss": tensors["loss"].tolist(),
                "queue": self._queue, "live": self._live, "metric": self.metric, "batch_size": self.batch_size}

    def set_state(self, state: dict[str, Any]) -> None:
        d = 5 * len(state["searcher"]["numels"])
        tensors = {"pool": torch.tensor(state["pool"], dtype=torch.int64).reshape(-1, d),
                   "loss": torch.tensor(state["loss"], dtype=torch.float64)}
        self.pareto = ParetoSearcher.from_state_dict(state["searcher"], tensors)
        self._queue, self._live = [list(x) for x in state["queue"]], dict(state["live"])
        self._metric, self.batch_size = state["metric"], int(state["batch_size"])

    def save(self, checkpoint_path: str) -> None:
        state = self.get_state()
        atomic_write(Path(checkpoint_path), lambda p: Path(p).write_text(json.dumps(state)))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))
