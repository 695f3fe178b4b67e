"""Initial pool: one ILP allocation per bit budget (method.md §2.2–2.4).

The caller supplies the per-matrix sensitivities as a cost table ``costs[i, c]`` (e.g. Fisher-weighted
reconstruction error of matrix i under flat setting c of the space; +inf where matrix i cannot take setting c, as
a llama.cpp type whose blocks do not fit its rows) and the matrix sizes. For a budget β the ILP
picks one setting per matrix minimising Σ cost subject to Σ numel_i·bits(c_i) ≤ β·Σ numel_i, solved with
``scipy.optimize.milp`` (HiGHS), so no licence is needed.

Numerical scaling follows §2.3: costs are multiplied by 1000/‖costs‖_F and the storage row is divided by
Σ numel (i.e. expressed in average bits), which keeps every coefficient O(1) whatever the model size. The solver
works in floating point with tolerances, so the realised average is re-checked in exact rational arithmetic and
the budget is tightened slightly and re-solved in the rare case it is exceeded.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from fractions import Fraction
from typing import Iterator, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from search.space import SearchSpace

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_RANGE: tuple[float, float] = (2.25, 7.25)
DEFAULT_BUDGET_COUNT = 50


@contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """HiGHS prints MIP debug lines from C++ straight to file descriptor 1, past Python's sys.stdout and past
    ``disp=False``; silence that descriptor for the duration of one solve so they do not interleave with progress
    bars."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def budget_grid(low: float = DEFAULT_BUDGET_RANGE[0], high: float = DEFAULT_BUDGET_RANGE[1],
                count: int = DEFAULT_BUDGET_COUNT) -> np.ndarray:
    """``count`` budgets evenly spaced over [low, high] (the default matches §7's 50 budgets over 2.25–7.25)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0:
        raise ValueError(f"the number of budgets must be a positive integer, got {count!r}")
    if not low <= high:
        raise ValueError(f"budget range must have low <= high, got ({low}, {high})")
    return np.linspace(float(low), float(high), int(count))


def exact_setting_bits(space: SearchSpace) -> list[Fraction]:
    """bits_per_param of every flat setting as an exact rational (b0 + b1/B0 + w(b2)/(B0·B1), or a llama.cpp
    type's bytes·8 per block)."""
    return [s.exact_bits for s in space.settings]


def exact_average_bits(space: SearchSpace, flat: Sequence[int], numels: Sequence[int]) -> Fraction:
    """Exact parameter-weighted average bits of a configuration given as one flat setting index per matrix."""
    table = exact_setting_bits(space)
    total = sum(int(n) for n in numels)
    return sum((int(n) * table[int(c)] for n, c in zip(numels, flat)), Fraction(0)) / total


def _check_inputs(space: SearchSpace, costs: np.ndarray, numels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    costs = np.asarray(costs, dtype=np.float64)
    n = np.asarray(numels)
    if costs.ndim != 2 or costs.shape[1] != space.n_settings:
        raise ValueError(f"costs must have shape (N matrices, {space.n_settings} settings), got {costs.shape}")
    if n.ndim != 1 or n.shape[0] != costs.shape[0]:
        raise ValueError(f"numels must have one entry per matrix ({costs.shape[0]}), got shape {n.shape}")
    if costs.shape[0] == 0:
        raise ValueError("cannot allocate bits over zero matrices")
    if np.any(np.isnan(costs) | (costs == -np.inf)):
        raise ValueError("costs must be finite, or +inf where a matrix cannot take a setting (no NaN or -inf)")
    stuck = np.flatnonzero(~np.isfinite(costs).any(axis=1))
    if stuck.size:
        raise ValueError(f"matrix {int(stuck[0])} can take no setting of the space (every cost is +inf)")
    if not np.issubdtype(n.dtype, np.integer) or np.any(n <= 0):
        raise ValueError("numels must be positive integers")
    return costs, n.astype(np.int64)


def prune_dominated_settings(costs: np.ndarray, setting_bits: np.ndarray) -> list[np.ndarray]:
    """Per matrix, the flat settings some other setting does not beat in both bits and cost.

    A setting with at least the bits and at least the cost of another (one strictly) is never the unique ILP optimum,
    so dropping it shrinks the ILP (432 → typically 10–30 variables per matrix) without changing the optimal value.
    Among exact ties (same bits and cost) the lowest index is kept, which also makes the result deterministic.
    """
    costs = np.asarray(costs, dtype=np.float64)
    bits = np.asarray(setting_bits, dtype=np.float64)
    order = np.lexsort((np.arange(bits.size), bits))  # ascending bits, ties by index
    kept = []
    for row in costs:
        c = row[order]
        # Ties in bits: the cheapest (first minimal cost, lowest index) of each equal-bits run stands for the run.
        best_before = np.r_[np.inf, np.minimum.accumulate(c)[:-1]]
        keep = c < best_before
        kept.append(np.sort(order[keep]))
    return kept


def solve_allocation(
    space: SearchSpace, costs: np.ndarray, numels: Sequence[int], budget: float, *, time_limit: float = 60.0
) -> np.ndarray:
    """Flat setting index per matrix minimising total cost with average bits ≤ ``budget`` (exactly checked).

    ``time_limit`` (seconds) bounds HiGHS like the official 60 s Gurobi limit; on timeout the best feasible
    incumbent is returned.
    """
    costs, n = _check_inputs(space, costs, numels)
    bits = space.setting_bits
    cheapest, dearest = space.achievable_bits_range(n, np.isfinite(costs))
    if not np.isfinite(budget):
        raise ValueError(f"budget must be a finite number of bits/param, got {budget!r}")
    if budget < cheapest:
        raise ValueError(
            f"budget {budget!r} bits/param is below the cheapest configuration ({cheapest:.4f}) this space offers "
            "this model"
        )
    if budget > dearest:
        raise ValueError(
            f"budget {budget!r} bits/param is above the most expensive configuration ({dearest:.4f}) this space "
            "offers this model: "
            "it constrains nothing, which usually means a wrong unit or range"
        )
    kept = prune_dominated_settings(costs, bits)
    cols = np.concatenate(kept)
    rows = np.repeat(np.arange(len(kept)), [k.size for k in kept])
    scale = np.linalg.norm(costs[np.isfinite(costs)])
    c = costs[rows, cols] * (1000.0 / scale if scale > 0 else 1.0)
    weight = n[rows] / n.sum() * bits[cols]  # contribution to the average bits
    one_per_matrix = csr_array((np.ones(cols.size), (rows, np.arange(cols.size))), shape=(len(kept), cols.size))
    exact_budget = Fraction(float(budget))
    slack = 0.0
    for _ in range(6):
        with _native_stdout_silenced():
            res = milp(
                c,
                integrality=np.ones(cols.size),
                bounds=Bounds(0, 1),
                constraints=[LinearConstraint(one_per_matrix, 1, 1),
                             LinearConstraint(weight[None, :], -np.inf, budget - slack)],
                options={"time_limit": float(time_limit)},
            )
        if res.x is None:
            raise ValueError(f"the ILP found no configuration within budget {budget} ({res.message})")
        chosen = res.x > 0.5
        flat = np.empty(len(kept), dtype=np.int64)
        flat[rows[chosen]] = cols[chosen]
        if exact_average_bits(space, flat, n) <= exact_budget:
            return flat
        # HiGHS' primal feasibility tolerance is ~1e-7 on the (O(1)) storage row; tighten past it, 10x each time.
        slack = max(10 * slack, 1e-7)
        logger.info("ILP solution exceeds budget %s by solver tolerance; re-solving %.0e tighter", budget, slack)
    raise RuntimeError(f"the ILP could not meet budget {budget} exactly after tightening")


def flat_to_encoded(space: SearchSpace, flat: np.ndarray) -> np.ndarray:
    """Flat setting indices (N,) → the 5N-long ordinal encoding of :meth:`SearchSpace.encode`."""
    fields = np.unravel_index(np.asarray(flat, dtype=np.int64), space.cardinalities)
    return np.stack(fields, axis=-1).astype(np.int64).reshape(-1)


def initial_pool(
    space: SearchSpace,
    costs: np.ndarray,
    numels: Sequence[int],
    budgets: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """One ILP configuration per budget (default :func:`budget_grid`), deduplicated, as encoded vectors.

    Neighbouring budgets often give the same allocation on small models; keeping one copy avoids training and
    evaluating the same configuration twice. Order follows the budgets.
    """
    budgets = budget_grid() if budgets is None else np.asarray(budgets, dtype=np.float64)
    out: list[np.ndarray] = []
    seen: set[bytes] = set()
    for beta in budgets:
        x = flat_to_encoded(space, solve_allocation(space, costs, numels, float(beta)))
        if x.tobytes() not in seen:
            seen.add(x.tobytes())
            out.append(x)
    return out
