import itertools
from fractions import Fraction

import numpy as np
import pytest

from search.allocation import (budget_grid, exact_average_bits, flat_to_encoded, initial_pool,
                               prune_dominated_settings, solve_allocation)
from search.space import SearchSpace

SMALL = SearchSpace(code=("nf2", "nf3"), scale_bits=(2, 8), scale2_format=("bf16",), block0=(16, 64), block1=(256,))


def costs_for(space, n, seed):
    rng = np.random.default_rng(seed)
    return rng.lognormal(0, 1, (n, 1)) * 2.0 ** (-2 * space.setting_bits)[None, :] * rng.lognormal(0, 0.3, (1, space.n_settings))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ilp_equals_brute_force(seed):
    n = 3
    costs = costs_for(SMALL, n, seed)
    numels = np.array([1024, 4096, 2048])
    bits = SMALL.setting_bits
    for budget in np.linspace(SMALL.bits_range[0], SMALL.bits_range[1], 9):
        best = min(
            (costs[np.arange(n), list(c)].sum(), c)
            for c in itertools.product(range(SMALL.n_settings), repeat=n)
            if (numels * bits[list(c)]).sum() / numels.sum() <= budget + 1e-12
        )
        got = solve_allocation(SMALL, costs, numels, float(budget))
        assert costs[np.arange(n), got].sum() == pytest.approx(best[0], rel=1e-9)


def test_realised_bits_within_every_budget(space):
    n = 12
    costs = costs_for(space, n, 3)
    numels = np.random.default_rng(0).integers(1, 8, n) * 4096
    budgets = budget_grid(count=15)
    for beta in budgets:
        flat = solve_allocation(space, costs, numels, float(beta))
        assert exact_average_bits(space, flat, numels) <= Fraction(float(beta))
    pool = initial_pool(space, costs, numels, budgets)
    assert len({x.tobytes() for x in pool}) == len(pool)
    assert all(x.shape == (5 * n,) and x.dtype == np.int64 for x in pool)
    assert all(space.encoded_average_bits(x, numels) <= beta + 1e-12 for x, beta in zip(pool, budgets))


def test_encoding_matches_space_encode(space):
    flat = np.array([0, 17, 431])
    assert np.array_equal(flat_to_encoded(space, flat), space.encode([space.settings[i] for i in flat]))


def test_pruning_keeps_only_undominated():
    bits = np.array([2.0, 3.0, 3.0, 4.0])
    kept = prune_dominated_settings(np.array([[5.0, 6.0, 4.0, 4.0]]), bits)[0]
    assert kept.tolist() == [0, 2]


def test_budget_outside_space_raises(space):
    with pytest.raises(ValueError, match="cheapest"):
        solve_allocation(space, costs_for(space, 2, 0), [10, 10], 1.5)
    with pytest.raises(ValueError, match="most expensive"):
        solve_allocation(space, costs_for(space, 2, 0), [10, 10], 9.0)
    with pytest.raises(ValueError, match="finite"):
        initial_pool(space, costs_for(space, 2, 0), [10, 10], [float("nan")])


def test_bad_shapes_raise(space):
    with pytest.raises(ValueError, match="costs must have shape"):
        solve_allocation(space, np.ones((2, 5)), [10, 10], 4.0)
    with pytest.raises(ValueError, match="numels"):
        solve_allocation(space, costs_for(space, 2, 0), [10], 4.0)
    with pytest.raises(ValueError, match="finite"):
        solve_allocation(space, np.full((2, space.n_settings), np.nan), [10, 10], 4.0)


GGUF = SearchSpace.from_dict({"code": ["q2_k", "q3_k", "q4_0", "q4_k", "q5_0", "q6_k", "q8_0"]})


@pytest.mark.parametrize("seed", [0, 1])
def test_ilp_keeps_each_matrix_in_its_domain_and_equals_brute_force(seed):
    """Rows of 576 weights cannot take the 256-weight K-quants: their costs are +inf, the ILP never picks them, and
    its optimum equals exhaustive search over the domains; the budget bounds are the model's, not the space's."""
    rows, numels = [576, 1536, 576], np.array([576 * 576, 576 * 1536, 192 * 576])
    allowed = GGUF.allowed(rows)
    costs = np.where(allowed, costs_for(GGUF, 3, seed), np.inf)
    lo, hi = GGUF.achievable_bits_range(numels, allowed)
    assert lo > GGUF.bits_range[0]
    bits = GGUF.setting_bits
    for budget in np.linspace(lo, hi, 7):
        feasible = [c for c in itertools.product(*(np.flatnonzero(a) for a in allowed))
                    if (numels * bits[list(c)]).sum() / numels.sum() <= budget + 1e-12]
        best = min(costs[np.arange(3), list(c)].sum() for c in feasible)
        got = solve_allocation(GGUF, costs, numels, float(budget))
        assert allowed[np.arange(3), got].all()
        assert costs[np.arange(3), got].sum() == pytest.approx(best, rel=1e-9)
    with pytest.raises(ValueError, match=rf"below the cheapest configuration \({lo:.4f}\) this space offers"):
        solve_allocation(GGUF, costs, numels, lo - 0.01)
    costs[1] = np.inf
    with pytest.raises(ValueError, match="matrix 1 can take no setting"):
        solve_allocation(GGUF, costs, numels, 6.0)
