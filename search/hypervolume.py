"""Exact 2-D hypervolume with a fixed, documented reference (method.md §5.4 end, §6 A2).

Both objectives are minimised: (bits, loss). For reporting, points are normalised to [0, 1]² with a reference
fixed by the caller, not by the data, so that numbers are comparable across runs and methods:
bits ↦ (bits − bits_lo) / (bits_hi − bits_lo) with (bits_lo, bits_hi) the space's range (bits_hi = 8.625 for the
paper's space), and loss ↦ (loss − loss_lo) / (loss_ref − loss_lo) with loss_ref e.g. the loss of the cheapest
configuration without adapters. The reference point is then (1, 1) and the best possible value is 1.
"""

from __future__ import annotations

import numpy as np

from search.pareto import non_dominated_mask


def hypervolume_2d(points: np.ndarray, ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (n, 2) and bounded by ``ref``, minimising both coordinates.

    Points not strictly better than ``ref`` in both coordinates add nothing. A sweep over the front sorted by the
    first coordinate: O(n log n).
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(pts)):
        raise ValueError("hypervolume points must be finite")
    r0, r1 = (float(v) for v in ref)
    pts = pts[(pts[:, 0] < r0) & (pts[:, 1] < r1)]
    if pts.shape[0] == 0:
        return 0.0
    front = pts[non_dominated_mask(pts[:, 0], pts[:, 1])]
    front = front[np.lexsort((front[:, 1], front[:, 0]))]
    # Along the front bits increase and loss decreases: each point owns the strip up to the next point's bits.
    right = np.r_[front[1:, 0], r0]
    return float(np.sum((right - front[:, 0]) * (r1 - front[:, 1])))


def normalized_hypervolume(
    bits: np.ndarray,
    loss: np.ndarray,
    bits_range: tuple[float, float],
    loss_range: tuple[float, float],
) -> float:
    """Hypervolume in [0, 1] of (bits, loss) normalised by the fixed ranges, reference (1, 1)."""
    (b_lo, b_hi), (l_lo, l_hi) = bits_range, loss_range
    if not (b_lo < b_hi and l_lo < l_hi):
        raise ValueError(f"ranges must have low < high, got bits {bits_range} and loss {loss_range}")
    b = (np.asarray(bits, dtype=np.float64) - b_lo) / (b_hi - b_lo)
    l = (np.asarray(loss, dtype=np.float64) - l_lo) / (l_hi - l_lo)
    return hypervolume_2d(np.stack([b, l], axis=-1), (1.0, 1.0))
