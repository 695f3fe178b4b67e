import numpy as np
import pytest
import torch
from botorch.utils.multi_objective.hypervolume import Hypervolume
from botorch.utils.multi_objective.pareto import is_non_dominated
from hypothesis import given, settings
from hypothesis import strategies as st

from search.hypervolume import hypervolume_2d, normalized_hypervolume
from search.pareto import non_dominated_mask, segment_index, segmented_pareto


def brute_force(bits, loss, n_segments, bits_range):
    lo, hi = bits_range
    width = (hi - lo) / n_segments
    seg = [min(max(int(np.floor((b - lo) / width)), 0), n_segments - 1) for b in bits]
    keep = []
    for i in range(len(bits)):
        dominated = any(
            seg[j] == seg[i] and bits[j] <= bits[i] and loss[j] <= loss[i] and (bits[j] < bits[i] or loss[j] < loss[i])
            for j in range(len(bits))
        )
        if not dominated:
            keep.append(i)
    return keep


grid = st.integers(0, 12).map(lambda k: 2.0 + 0.5 * k)  # coarse values: many ties and segment-edge hits
points = st.lists(st.tuples(grid, st.integers(0, 6).map(float)), min_size=0, max_size=40)


@settings(max_examples=200, deadline=None)
@given(points, st.integers(1, 7))
def test_segmented_pareto_matches_brute_force(pts, n_segments):
    bits = np.array([p[0] for p in pts])
    loss = np.array([p[1] for p in pts])
    bits_range = (2.5, 7.0)  # some points fall outside: clipped into the end segments
    got = segmented_pareto(bits, loss, n_segments, bits_range).tolist()
    assert got == brute_force(bits, loss, n_segments, bits_range)


@settings(max_examples=100, deadline=None)
@given(points)
def test_non_dominated_matches_botorch(pts):
    if not pts:
        return
    Y = torch.tensor(pts, dtype=torch.float64)
    expected = is_non_dominated(-Y, deduplicate=False).numpy()
    assert np.array_equal(non_dominated_mask(Y[:, 0].numpy(), Y[:, 1].numpy()), expected)


def test_outside_points_are_clipped_not_dropped():
    seg = segment_index(np.array([1.0, 2.0, 8.0, 9.0]), 4, (2.0, 8.0))
    assert seg.tolist() == [0, 0, 3, 3]
    assert segmented_pareto(np.array([1.0, 9.0]), np.array([5.0, 0.0]), 4, (2.0, 8.0)).tolist() == [0, 1]


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_segment_count(bad):
    with pytest.raises(ValueError, match="segments"):
        segmented_pareto(np.array([3.0]), np.array([1.0]), bad, (2.0, 8.0))


def test_nan_loss_rejected():
    with pytest.raises(ValueError, match="finite"):
        segmented_pareto(np.array([3.0]), np.array([np.nan]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=30))
def test_hypervolume_matches_botorch(pts):
    P = np.array(pts)
    ref = (1.0, 1.0)
    hv = Hypervolume(ref_point=-torch.tensor(ref, dtype=torch.float64))
    expected = hv.compute(-torch.tensor(P, dtype=torch.float64)[is_non_dominated(-torch.tensor(P))])
    assert hypervolume_2d(P, ref) == pytest.approx(float(expected), abs=1e-12)


def test_normalized_hypervolume_fixed_reference():
    assert normalized_hypervolume(np.array([2.0]), np.array([0.0]), (2.0, 4.0), (0.0, 1.0)) == pytest.approx(1.0)
    assert normalized_hypervolume(np.array([3.0]), np.array([0.5]), (2.0, 4.0), (0.0, 1.0)) == pytest.approx(0.25)
    assert normalized_hypervolume(np.array([5.0]), np.array([0.5]), (2.0, 4.0), (0.0, 1.0)) == 0.0
