"""Segmented Pareto selection of the training set (method.md §4.6, fixes §6 A12 and B17).

Both objectives are minimised: average bits and loss. The bits axis is cut into ``n_segments`` equal-width segments
over a fixed range, and the non-dominated points of each segment are kept. A global front collapses onto a few bit
ranges; per-segment fronts keep representatives across the whole range, which is what training θ needs.

Points outside the range are **clipped into the end segments** (below the range → segment 0, at or above the upper
end → the last segment), never dropped: an observed configuration is always eligible for the training set.
"""

from __future__ import annotations

import numpy as np


def _check_objectives(bits: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bits = np.asarray(bits, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    if bits.ndim != 1 or bits.shape != loss.shape:
        raise ValueError(f"bits and loss must be 1-D arrays of equal length, got {bits.shape} and {loss.shape}")
    if not (np.all(np.isfinite(bits)) and np.all(np.isfinite(loss))):
        raise ValueError("bits and loss must be finite (no NaN or inf)")
    return bits, loss


def non_dominated_mask(bits: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates, minimising (bits, loss).

    p dominates q iff p ≤ q in both objectives and < in at least one, so exact duplicates are all kept. An
    O(n log n) sweep: sort by (bits, loss) and keep a point iff its loss is below the best loss of every point with
    strictly smaller bits, and it is the best loss of its own bits value.
    """
    bits, loss = _check_objectives(bits, loss)
    n = bits.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((loss, bits))
    b, l = bits[order], loss[order]
    # First index of each run of equal bits; within a run the first point has the run's smallest loss.
    run_start = np.r_[True, b[1:] != b[:-1]]
    run_id = np.cumsum(run_start) - 1
    run_min = l[run_start]
    # Best loss among strictly smaller bits = running minimum of the run minima before this run.
    prev_best = np.r_[np.inf, np.minimum.accumulate(run_min)[:-1]]
    keep_sorted = (l == run_min[run_id]) & (l < prev_best[run_id])
    mask = np.empty(n, dtype=bool)
    mask[order] = keep_sorted
    return mask


def segment_edges(n_segments: int, bits_range: tuple[float, float]) -> np.ndarray:
    """The n_segments + 1 equal-width edges over ``bits_range``."""
    if isinstance(n_segments, bool) or not isinstance(n_segments, (int, np.integer)) or n_segments <= 0:
        raise ValueError(f"the number of segments must be a positive integer, got {n_segments!r}")
    lo, hi = (float(v) for v in bits_range)
    if not (np.isfinite(lo) and np.isfinite(hi)) or not lo < hi:
        raise ValueError(f"bits_range must be finite with low < high, got {bits_range!r}")
    return np.linspace(lo, hi, int(n_segments) + 1)


def segment_index(bits: np.ndarray, n_segments: int, bits_range: tuple[float, float]) -> np.ndarray:
    """Segment of each point; segments are [e_k, e_{k+1}), the last one closed, and outside points are clipped."""
    edges = segment_edges(n_segments, bits_range)
    idx = np.searchsorted(edges, np.asarray(bits, dtype=np.float64), side="right") - 1
    return np.clip(idx, 0, int(n_segments) - 1)


def segmented_pareto(
    bits: np.ndarray, loss: np.ndarray, n_segments: int = 40, bits_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Indices (ascending) of the points that are non-dominated within their segment.

    ``bits_range`` defaults to [min(bits), max(bits)] of the given points; a search passes the space's range so the
    segmentation does not move as the pool grows.
    """
    bits, loss = _check_objectives(bits, loss)
    if bits.size == 0:
        segment_edges(n_segments, bits_range or (0.0, 1.0))
        return np.zeros(0, dtype=np.int64)
    if bits_range is None:
        lo, hi = float(bits.min()), float(bits.max())
        bits_range = (lo, hi if hi > lo else lo + 1.0)
    seg = segment_index(bits, n_segments, bits_range)
    # One sweep per occupied segment (at most n_segments, each vectorised).
    keep = np.zeros(bits.size, dtype=bool)
    order = np.argsort(seg, kind="stable")
    bounds = np.flatnonzero(np.r_[True, seg[order][1:] != seg[order][:-1], True])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        members = order[start:stop]
        keep[members] = non_dominated_mask(bits[members], loss[members])
    return np.flatnonzero(keep)
