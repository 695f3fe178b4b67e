"""The Ray Tune adapter of the Pareto searcher (orchestrator/tune_searcher.py) in a real Tune run."""

import numpy as np
import pytest

from search.allocation import budget_grid, initial_pool
from search.searcher import ParetoSearcher
from search.space import SearchSpace

N = 4


def test_tiny_tune_run(tmp_path, monkeypatch, synthetic_loss):
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray = pytest.importorskip("ray")
    from ray import tune

    from orchestrator.tune_searcher import ParetoTuneSearcher

    space = SearchSpace.default()
    sens = np.array([1.0, 3.0, 0.5, 2.0])
    numels = [4096, 4096, 8192, 1024]
    costs = sens[:, None] * 2.0 ** (-2 * space.setting_bits)[None, :]
    pool = initial_pool(space, costs, numels, budget_grid(count=4))
    searcher = ParetoTuneSearcher(ParetoSearcher(space, numels, 0, segments=8), initial=pool, batch_size=2)

    def trainable(config):
        return {"loss": float(synthetic_loss(space, sens, np.asarray(config["x"]))[0])}

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(pool) + 4, max_concurrent_trials=1,
                                        reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="t", verbose=0),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert len(results) == len(pool) + 4
    assert not results.errors
    # The suggested configurations are unique (no re-evaluation).
    xs = {tuple(r.config["x"]) for r in results}
    assert len(xs) == len(pool) + 4

    path = str(tmp_path / "searcher.json")
    searcher.save(path)
    other = ParetoTuneSearcher(ParetoSearcher(space, numels, 0, segments=8))
    other.restore(path)
    assert len(other.pareto.pool) == len(searcher.pareto.pool)
    assert other.suggest("a") == searcher.suggest("a")
