import numpy as np
import pytest
import torch

from search.space import SearchSpace


@pytest.fixture(autouse=True)
def _one_thread():
    """BoTorch's small ops slow down ~100x with 2 threads next to other work (stack-notes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def space() -> SearchSpace:
    return SearchSpace.default()


def _synthetic_loss(space: SearchSpace, sens: np.ndarray, X: np.ndarray) -> np.ndarray:
    X = np.atleast_2d(X)
    n = sens.size
    flat = np.ravel_multi_index(tuple(X.reshape(len(X), n, 5)[..., j] for j in range(5)), space.cardinalities)
    return 1.0 + (sens[None, :] * 2.0 ** (-2 * space.setting_bits[flat])).sum(1)


@pytest.fixture(scope="session")
def synthetic_loss():
    """loss(space, sens, X) = 1 + Σ_i sens_i · 2^(−2·bits_i): a smooth, known loss for search tests."""
    return _synthetic_loss
