"""The final phase's evaluation configurations: targets, random unseen ones and unseen ones drawn like the pool."""

import numpy as np
import pytest

from orchestrator.config import load_config
from orchestrator.loop.finish import evaluation_configurations
from search.allocation import flat_to_encoded, solve_allocation

NUMELS = [384 * 384, 384 * 1536, 1536 * 384] * 4


def test_ilp_unseen_configurations_are_drawn_like_the_pool_and_never_repeat_one():
    cfg = load_config("conf/default.yaml", ["evaluation.unseen=2", "evaluation.unseen_ilp=4"])
    space = cfg.load_space()
    costs = np.random.default_rng(0).lognormal(0, 1, (len(NUMELS), space.n_settings))
    pool = [flat_to_encoded(space, solve_allocation(space, costs, NUMELS, b)) for b in (2.5, 3.5, 4.5)]
    configs = evaluation_configurations(cfg, space, costs, NUMELS, space.allowed([384] * len(NUMELS)), pool)
    names = [n for n, _ in configs]
    assert names == [f"target {t:g}" for t in cfg.evaluation.targets] + ["unseen 1", "unseen 2"] + [
        f"ilp-unseen {i}" for i in range(1, 5)]
    trained_or_targets = {x.tobytes() for x in pool} | {x.tobytes() for n, x in configs if n.startswith("target")}
    drawn = [x.tobytes() for n, x in configs if not n.startswith("target")]
    assert len(set(drawn)) == len(drawn) and not set(drawn) & trained_or_targets  # never evaluated twice or trained on
    for name, x in configs[-4:]:  # each is the ILP's answer at some budget of the pool's range
        bits = float(space.encoded_average_bits(x, NUMELS))
        assert bits <= cfg.search.budget_max + 1e-9
        assert np.array_equal(x, flat_to_encoded(space, solve_allocation(space, costs, NUMELS, bits + 1e-9)))
    again = evaluation_configurations(cfg, space, costs, NUMELS, space.allowed([384] * len(NUMELS)), pool)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(configs, again))


def test_fewer_ilp_unseen_configurations_than_asked_are_evaluated_with_a_warning():
    cfg = load_config("conf/default.yaml", ["evaluation.unseen=0", "evaluation.unseen_ilp=50",
                                            "evaluation.targets=[3.0]"])
    space = cfg.load_space()
    numels = NUMELS[:1]
    costs = np.random.default_rng(1).lognormal(0, 1, (len(numels), space.n_settings))
    with pytest.warns(UserWarning, match=r"evaluation.unseen_ilp = 50: the ILP gives only \d+ allocation"):
        configs = evaluation_configurations(cfg, space, costs, numels, space.allowed([384]), [])
    assert 1 < len(configs) < 51
