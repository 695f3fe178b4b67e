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
