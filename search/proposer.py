"""Candidate proposals: segment-constrained batched neighbour search on qLogNEHVI (method.md §4.4, fixes §6 A1, B18).

Each round fits the loss GP on the whole pool and proposes q configurations, each confined to one bit-width
segment so that proposals spread over the storage axis:

1. Segments are visited in the order (largest staircase gap of the pool front they sit in, fewest pool points,
   index): the parts of the front where an in-between point can add the most hypervolume come first.
2. The start point is a crossover between the pool-front neighbours of the segment: matrices are copied, in
   seeded random orders, from the front point just above the segment into the one just below it; of all these
   rungs that land in the segment the acquisition picks the best, in one call (the space's cheapest/most expensive
   configuration stands in when the front has no point on one side). Without such a rung the segment's best pool
   point is the start; a segment with neither is skipped.
3. Local search: every ±1 neighbour of the current point (all fields of all matrices) is scored in ONE acquisition
   call of shape (n_neighbours, 1, D); neighbours leaving the segment, or already in the pool or chosen this round,
   are masked out. The best single move competes with "combined" moves that apply the top-k improving moves on
   distinct coordinates at once (k = 2, 4, …), scored in one more call, so a step can travel further than one
   index. The search stops when nothing improves or after ``max_steps`` steps (default 0, see
   :class:`ProposerOptions`). A start taken from the pool is never returned: the best valid neighbour is taken.
4. Each chosen candidate is added as pending to the acquisition (qLogNEHVI conditions on it), so later candidates
   in the round look elsewhere. This replaces the official finite-difference coordinate search,
   whose one-sided boundary difference makes it stop at step 0 (§6 A1).

All randomness (QMC base samples, crossover orders, GP fit restarts) comes from ``seed`` via a forked torch RNG and a
numpy Generator, so equal inputs give byte-identical proposals and the global RNG state is left untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from search.acquisition import build_acquisition, fit_loss_model
from search.encoding import FeatureMap
from search.pareto import non_dominated_mask, segment_edges, segment_index
from search.space import SearchSpace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProposerOptions:
    """Knobs of one proposal round. ``bits_range`` None means the space's full range.

    ``max_steps`` defaults to 0 (the acquisition picks the best crossover rung; ±1 steps only to leave a pool
    point): on bench/search.py at d = 720, 60 evaluations, HV was 0.9439 / 0.9423 / 0.9409 after 0 / 1 / 4 steps —
    with ≤ 150 points the GP cannot see per-matrix sensitivities, so EHVI's exploratory ±1 moves cost loss.
    """

    n_segments: int = 40
    bits_range: tuple[float, float] | None = None
    max_steps: int = 0
    mc_samples: int = 32
    combine_sizes: tuple[int, ...] = (2, 4, 8)
    n_orders: int = 8


class _Round:
    """State of one proposal round: pool, fitted acquisition, segment geometry, the set of taken configurations."""

    def __init__(self, space: SearchSpace, numels: np.ndarray, feature_map: FeatureMap, X: np.ndarray,
                 loss: np.ndarray, seed: int, opts: ProposerOptions, exclude: np.ndarray,
                 allowed: np.ndarray | None) -> None:
        self.space, self.numels, self.fm, self.X, self.loss, self.opts = space, numels, feature_map, X, loss, opts
        n = feature_map.n_matrices
        self.allowed = np.ones((n, space.n_settings), dtype=bool) if allowed is None else allowed
        self.rng = np.random.default_rng(seed)
        self.upper = space.upper_bounds(feature_map.n_matrices)
        self.bits_range = opts.bits_range or space.bits_range
        self.edges = segment_edges(opts.n_segments, self.bits_range)
        self.pool_bits = space.encoded_average_bits(X, numels)
        self.pool_seg = segment_index(self.pool_bits, opts.n_segments, self.bits_range)
        self.taken = {row.tobytes() for row in X} | {row.tobytes() for row in exclude}
        features = feature_map(torch.from_numpy(X))
        loss_t = torch.as_tensor(loss, dtype=torch.float64)
        model = fit_loss_model(features, loss_t)
        self.acq = build_acquisition(model, feature_map, features, loss_t,
                                     torch.as_tensor(self.pool_bits, dtype=torch.float64), seed, opts.mc_samples)
        self.chosen: list[np.ndarray] = []

    # ---- geometry ---------------------------------------------------------------------------------------------
    def in_segment(self, bits: np.ndarray, seg: int) -> np.ndarray:
        """Strictly inside segment ``seg`` (no clipping: proposals stay within the search's bits range)."""
        bits = np.asarray(bits, dtype=np.float64)
        upper_ok = bits < self.edges[seg + 1] if seg < self.opts.n_segments - 1 else bits <= self.edges[-1]
        return (bits >= self.edges[seg]) & upper_ok

    def segment_order(self) -> list[int]:
        """Segments by the hypervolume a point there could add, then fewest pool points, then index.

        The pool front's staircase between consecutive front points (b1, l1), (b2, l2) leaves a triangle of area
        (b2 − b1)·(l1 − l2)/2 (bits and loss scaled by the pool's ranges) that an in-between point can claim; every
        segment whose centre falls in that gap gets its area. Segments outside the front's span get 0.
        """
        centres = 0.5 * (self.edges[:-1] + self.edges[1:])
        counts = np.bincount(self.pool_seg, minlength=self.opts.n_segments)
        front = non_dominated_mask(self.pool_bits, self.loss)
        order = np.argsort(self.pool_bits[front], kind="stable")
        fb, fl = self.pool_bits[front][order], self.loss[front][order]
        l_span = max(float(np.ptp(self.loss)), 1e-12)
        areas = np.r_[0.0, np.diff(fb) * -np.diff(fl) / 2 / (self.edges[-1] - self.edges[0]) / l_span, 0.0]
        gap_area = areas[np.searchsorted(fb, centres, side="right")]
        return [int(s) for s in np.lexsort((np.arange(centres.size), counts, -gap_area))]

    # ---- scoring ------------------------------------------------------------------------------------------------
    def score(self, xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.acq(self.fm(torch.from_numpy(xs)).unsqueeze(-2)).numpy()

    def free(self, xs: np.ndarray) -> np.ndarray:
        return np.fromiter((row.tobytes() not in self.taken for row in xs), dtype=bool, count=xs.shape[0])

    # ---- start points -------------------------------------------------------------------------------------------
    def start_point(self, seg: int) -> np.ndarray | None:
        """Best crossover rung inside the segment by acquisition, else the segment's best pool point.

        Rungs: the pool-front point just below the segment, with the matrices of the pool-front point just above
        copied in one at a time, in ``n_orders`` seeded random orders; every rung that lands in the segment and is
        new is scored in one acquisition call. Front points (not any pool point) are the parents because a
        dominated parent only drags the rung away from the front.
        """
        lo_edge, hi_edge = self.edges[seg], self.edges[seg + 1]
        front = non_dominated_mask(self.pool_bits, self.loss)
        below, above = front & (self.pool_bits < lo_edge), front & (self.pool_bits > hi_edge)
        n = self.fm.n_matrices
        base = self.X[below][np.argmax(self.pool_bits[below])] if below.any() else self._extreme(cheapest=True)
        donor = self.X[above][np.argmin(self.pool_bits[above])] if above.any() else self._extreme(cheapest=False)
        rungs = []
        steps = np.arange(n + 1)[:, None] > np.arange(n)[None, :]  # row k: the first k matrices of the order
        for _ in range(self.opts.n_orders):
            mask = np.zeros((n + 1, n), dtype=bool)
            mask[:, self.rng.permutation(n)] = steps
            rungs.append(np.where(np.repeat(mask, 5, axis=1), donor[None, :], base[None, :]))
        ladder = np.unique(np.concatenate(rungs), axis=0)
        ladder = ladder[self.valid(ladder, seg)]
        if ladder.shape[0]:
            return ladder[int(np.argmax(self.score(ladder)))].copy()
        members = np.flatnonzero(self.in_segment(self.pool_bits, seg))
        return self.X[members[np.argmin(self.loss[members])]].copy() if members.size else None

    def _extreme(self, cheapest: bool) -> np.ndarray:
        """Every matrix at its cheapest (or dearest) allowed setting, first on ties."""
        bits = np.where(self.allowed, self.space.setting_bits[None, :], np.inf if cheapest else -np.inf)
        flat = np.argmin(bits, axis=1) if cheapest else np.argmax(bits, axis=1)
        return np.stack(np.unravel_index(flat, self.space.cardinalities), axis=-1).astype(np.int64).reshape(-1)

    def fits(self, xs: np.ndarray) -> np.ndarray:
        """Whether every matrix of each encoded row takes a setting of its domain."""
        return self.allowed[np.arange(self.fm.n_matrices)[None, :], self.space.flat_indices(xs)].all(axis=1)

    # ---- local search -------------------------------------------------------------------------------------------
    def neighbours(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All in-range ±1 neighbours of x, with the moved coordinate and direction of each. A step that lands on a
        setting outside its matrix's domain goes on in the same direction to the next one inside it."""
        dims = np.concatenate([np.flatnonzero(x < self.upper), np.flatnonzero(x > 0)])
        steps = np.concatenate([np.ones(int((x < self.upper).sum()), np.int64),
                                -np.ones(int((x > 0).sum()), np.int64)])
        nb = np.repeat(x[None, :], dims.size, axis=0)
        rows = np.arange(dims.size)
        nb[rows, dims] += steps
        inside = np.ones(dims.size, dtype=bool)
        for _ in range(int(self.upper.max(initial=0))):
            stray = inside & ~self.fits(nb)
            if not stray.any():
                break
            nb[rows[stray], dims[stray]] += steps[stray]
            inside &= (nb[rows, dims] >= 0) & (nb[rows, dims] <= self.upper[dims])
            nb[rows[~inside], dims[~inside]] = x[dims[~inside]]  # parked in range; dropped below
        keep = inside & self.fits(nb)
        return nb[keep], dims[keep], steps[keep]

    def valid(self, xs: np.ndarray, seg: int) -> np.ndarray:
        ok = self.in_segment(self.space.encoded_average_bits(xs, self.numels), seg) & self.fits(xs)
        ok[ok] = self.free(xs[ok])
        return ok

    def search(self, x: np.ndarray, seg: int) -> np.ndarray | None:
        current_free = bool(self.free(x[None, :])[0])
        needs_value = current_free and self.opts.max_steps > 0
        current_val = float(self.score(x[None, :])[0]) if needs_value else -np.inf
        # A start taken from the pool must move at least once, whatever max_steps says.
        for step in range(max(self.opts.max_steps, 1)):
            if step >= self.opts.max_steps and current_free:
                break
            nb, dims, steps = self.neighbours(x)
            ok = self.valid(nb, seg)
            if not ok.any():
                break
            vals = np.where(ok, self.score(nb), -np.inf)
            best = int(np.argmax(vals))
            move, move_val = nb[best], float(vals[best])
            improving = np.flatnonzero(vals > current_val)
            improving = improving[np.argsort(-vals[improving], kind="stable")]
            _, first = np.unique(dims[improving], return_index=True)
            distinct = improving[np.sort(first)]
            combos = [k for k in self.opts.combine_sizes if k <= distinct.size]
            if combos:
                trial = np.repeat(x[None, :], len(combos), axis=0)
                for row, k in enumerate(combos):
                    trial[row, dims[distinct[:k]]] += steps[distinct[:k]]
                tok = self.valid(trial, seg)
                if tok.any():
                    tvals = np.where(tok, self.score(trial), -np.inf)
                    if tvals.max() > move_val:
                        move, move_val = trial[int(np.argmax(tvals))], float(tvals.max())
            if move_val <= current_val:
                break
            x, current_val, current_free = move.copy(), move_val, True
        return x if current_free else None

    def propose(self, n: int) -> list[np.ndarray]:
        order = self.segment_order()
        attempts = 0
        while len(self.chosen) < n and attempts < n + len(order):
            seg = order[attempts % len(order)]
            attempts += 1
            start = self.start_point(seg)
            if start is None:
                continue
            cand = self.search(start, seg)
            if cand is None:
                continue
            self.chosen.append(cand)
            self.taken.add(cand.tobytes())
            self.acq.set_X_pending(self.fm(torch.from_numpy(np.stack(self.chosen))))
        if len(self.chosen) < n:
            logger.warning("only %d of %d requested proposals found: the segments are exhausted", len(self.chosen), n)
        return self.chosen


def propose_candidates(
    space: SearchSpace,
    numels: Sequence[int],
    X: np.ndarray,
    loss: np.ndarray,
    n: int,
    seed: int,
    feature_map: FeatureMap | None = None,
    options: ProposerOptions = ProposerOptions(),
    exclude: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Up to ``n`` new encoded configurations, each inside one segment, unique and absent from the pool ``X``.

    ``X`` (n_pool, 5N) int and ``loss`` (n_pool,) are the observations; at least 2 are needed to fit the GP.
    ``exclude`` (m, 5N) are further configurations not to propose (e.g. proposed but not yet evaluated).
    ``allowed`` (N, n_settings) bool, from :meth:`SearchSpace.allowed`, keeps every matrix inside its domain.
    """
    X = np.asarray(X, dtype=np.int64)
    loss = np.asarray(loss, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != loss.shape[0] or loss.ndim != 1:
        raise ValueError(f"X must be (n, 5N) with one loss per row, got {X.shape} and {loss.shape}")
    if X.shape[0] < 2:
        raise ValueError(f"at least 2 observations are needed to fit the surrogate, got {X.shape[0]}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"the number of proposals must be a non-negative integer, got {n!r}")
    if not np.all(np.isfinite(loss)):
        raise ValueError("every observed loss must be finite (no NaN or inf)")
    if n == 0:
        return []
    numels = np.asarray(numels, dtype=np.int64)
    fm = feature_map or FeatureMap(space, numels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ex = np.zeros((0, X.shape[1]), dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
        return _Round(space, numels, fm, X, loss, seed, options, ex.reshape(-1, X.shape[1]),
                      allowed).propose(int(n))
