import warnings

import numpy as np
import pytest
import torch

from search.allocation import budget_grid, initial_pool
from search.pareto import segment_index
from search.proposer import ProposerOptions
from search.searcher import ParetoSearcher

N = 8


@pytest.fixture(scope="module")
def problem(synthetic_loss):
    from search.space import SearchSpace

    space = SearchSpace.default()
    rng = np.random.default_rng(0)
    sens = rng.lognormal(0, 1.0, N)
    numels = rng.integers(1, 4, N) * 4096
    costs = sens[:, None] * 2.0 ** (-2 * space.setting_bits)[None, :]
    pool = initial_pool(space, costs, numels, budget_grid(count=8))
    return space, sens, numels, pool, lambda X: synthetic_loss(space, sens, X)


def make(problem, seed=0, segments=10, options=None):
    space, sens, numels, pool, f = problem
    s = ParetoSearcher(space, numels, seed, segments=segments, bits_range=(2.25, 7.25),
                       groups=[list(np.arange(N) // 2), list(np.arange(N) % 2)], options=options)
    s.tell(zip(pool, f(np.stack(pool))))
    return s


@pytest.mark.parametrize("options", [None, ProposerOptions(max_steps=2)], ids=["rungs", "neighbour-steps"])
def test_proposals_valid_unique_new_and_in_segment(problem, options):
    space, sens, numels, pool, f = problem
    s = make(problem, options=options)
    props = s.propose(6)
    assert len(props) == 6
    upper = space.upper_bounds(N)
    keys = {x.tobytes() for x in props}
    assert len(keys) == 6
    assert not keys & {x.tobytes() for x, _ in s.pool}
    for x in props:
        assert x.dtype == np.int64 and x.shape == (5 * N,)
        assert np.all((x >= 0) & (x <= upper))
    bits = space.encoded_average_bits(np.stack(props), numels)
    assert np.all((bits >= 2.25) & (bits <= 7.25))  # each inside one of the search's segments
    segs = segment_index(bits, 10, (2.25, 7.25))
    assert len(set(segs.tolist())) == 6  # spread over distinct segments in one round


def test_determinism_and_round_trip(problem, tmp_path):
    space, sens, _, _, f = problem
    a, b = make(problem, seed=3), make(problem, seed=3)
    pa = a.propose(3)
    torch.manual_seed(123)  # proposals must not depend on the global RNG state
    torch.rand(7)
    np.random.seed(5)
    pb = b.propose(3)
    assert b"".join(x.tobytes() for x in pa) == b"".join(x.tobytes() for x in pb)
    a.tell(zip(pa, f(np.stack(pa))))
    a.save(tmp_path / "s")
    restored = ParetoSearcher.load(tmp_path / "s")
    assert [x.tobytes() for x in restored.propose(2)] == [x.tobytes() for x in a.propose(2)]
    assert [x.tobytes() for x in restored.training_set()] == [x.tobytes() for x in a.training_set()]
    meta, tensors = a.state_dict()
    c = make(problem, seed=3)
    c.load_state_dict(meta, tensors)
    assert [x.tobytes() for x in c.propose(1)] == [x.tobytes() for x in a.propose(1)]


def test_exclude_is_respected(problem):
    s = make(problem)
    first = s.propose(2)
    again = s.propose(2, exclude=first)
    assert not {x.tobytes() for x in first} & {x.tobytes() for x in again}


def test_training_set_is_segmented_front(problem):
    s = make(problem)
    chosen = {x.tobytes() for x in s.training_set()}
    assert chosen and chosen <= {x.tobytes() for x, _ in s.pool}


def test_bad_input(problem):
    space, _, numels, pool, _ = problem
    s = make(problem)
    with pytest.raises(ValueError, match="shape"):
        s.tell([(pool[0][:-1], 1.0)])
    bad = pool[0].copy()
    bad[3] = 7
    with pytest.raises(ValueError, match="out of range"):
        s.tell([(bad, 1.0)])
    with pytest.raises(ValueError, match="finite"):
        s.tell([(pool[0], float("nan"))])
    with pytest.raises(ValueError, match="segments"):
        ParetoSearcher(space, numels, 0, segments=0)
    with pytest.raises(ValueError, match="outside the range this space offers"):
        ParetoSearcher(space, numels, 0, bits_range=(1.0, 9.0))
    with pytest.raises(ValueError, match="at least 2"):
        ParetoSearcher(space, numels, 0).propose(1)


def test_single_segment_still_gives_distinct_new_proposals(problem):
    space, sens, numels, pool, f = problem
    s = ParetoSearcher(space, numels, 1, segments=1)
    s.tell(zip(pool[:3], f(np.stack(pool[:3]))))
    props = s.propose(3)
    assert len({x.tobytes() for x in props} - {x.tobytes() for x, _ in s.pool}) == 3


def test_feature_map_reads_bits_back_exactly(problem):
    from search.encoding import FeatureMap

    space, _, numels, pool, _ = problem
    fm = FeatureMap(space, numels, groups=[list(np.arange(N) // 2)])
    f = fm(np.stack(pool))
    assert f.dtype == torch.float64 and f.shape == (len(pool), fm.dim)
    assert float(f.min()) >= 0.0 and float(f.max()) <= 1.0
    bits = fm.bits_from_features(f).numpy()
    assert np.allclose(bits, space.encoded_average_bits(np.stack(pool), numels), rtol=0, atol=1e-12)


def test_fit_failure_is_logged_not_swallowed(problem, monkeypatch, caplog):
    import search.acquisition as acquisition
    from botorch.exceptions.errors import ModelFittingError

    def failing_fit(mll, **kwargs):
        raise ModelFittingError("synthetic failure")

    monkeypatch.setattr(acquisition, "fit_gpytorch_mll", failing_fit)
    s = make(problem)
    with caplog.at_level("WARNING", logger="search.acquisition"):
        props = s.propose(2)
    assert len(props) == 2
    assert "GP fit failed" in caplog.text and "synthetic failure" in caplog.text


def test_no_jit_compiled_kernel_is_built(problem, monkeypatch):
    """Proposals never compile BoTorch's fused C++ kernel (its stale build lock once hung every later run)."""
    import torch.utils.cpp_extension as cpp
    from botorch.acquisition.multi_objective import logei

    def refuse(*args, **kwargs):
        raise AssertionError("a C++ extension was JIT-compiled")

    monkeypatch.setattr(cpp, "load", refuse)
    monkeypatch.setattr(logei, "_load_attempted", False)
    monkeypatch.setattr(logei, "_C", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # BoTorch warns when a compile fails: none may be tried
        assert len(make(problem).propose(1)) == 1
    assert logei._load_attempted and logei._C is None


@pytest.mark.parametrize("options", [None, ProposerOptions(max_steps=3)], ids=["rungs", "neighbour-steps"])
def test_proposals_keep_each_matrix_in_its_domain(synthetic_loss, tmp_path, options):
    """A llama.cpp space on SmolLM2-like rows: the K-quants fit only the 1536-wide rows. Proposals (crossover rungs
    and neighbour steps, which skip types a matrix cannot take) stay inside every matrix's domain, the searcher's
    bit range is the one the model can reach, and a saved searcher keeps its domains."""
    from search.space import SearchSpace

    space = SearchSpace.from_dict({"code": ["q2_k", "q3_k", "q4_0", "q4_k", "q5_0", "q6_k", "q8_0"]})
    rows = [576, 576, 576, 1536] * 2
    numels = np.array([576 * 576, 192 * 576, 1536 * 576, 576 * 1536] * 2)
    allowed = space.allowed(rows)
    sens = np.random.default_rng(1).lognormal(0, 1.0, N)
    costs = np.where(allowed, sens[:, None] * 2.0 ** (-2 * space.setting_bits)[None, :], np.inf)
    lo, hi = space.achievable_bits_range(numels, allowed)
    pool = initial_pool(space, costs, numels, budget_grid(lo, hi, 6))
    s = ParetoSearcher(space, numels, 0, segments=4, options=options, row_lengths=rows)
    assert s.bits_range == (lo, hi)
    s.tell(zip(pool, synthetic_loss(space, sens, np.stack(pool))))
    props = s.propose(4)
    assert len(props) == 4

    def inside(x):
        flat = np.ravel_multi_index(tuple(x.reshape(N, 5).T), space.cardinalities)
        return bool(allowed[np.arange(N), flat].all())

    assert all(inside(x) for x in props) and all(inside(x) for x in pool)
    assert any(space.settings[int(x[15])].code in ("q2_k", "q3_k") for x in props + pool)  # K-quants are used
    bad = pool[0].copy()
    bad[0] = 0  # q2_k on a 576-wide matrix
    with pytest.raises(ValueError, match="matrix 0 cannot take q2_k"):
        s.tell([(bad, 1.0)])
    s.save(tmp_path / "s")
    restored = ParetoSearcher.load(tmp_path / "s")
    assert restored.row_lengths == rows
    assert [x.tobytes() for x in restored.propose(2)] == [x.tobytes() for x in s.propose(2)]
