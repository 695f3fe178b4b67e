"""The run's seeded schedule: which examples and which configurations every training step uses.

Every random choice of a run is drawn from a generator seeded by (seed, purpose, step), never from global state, so
a resumed run, a replay (the coa-no-theta ablation) and a per-configuration baseline in bench/ see exactly the
steps the original run saw. Configurations are named in the ledger by :func:`key`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from search.space import SearchSpace

PURPOSE_DATA, PURPOSE_CONFIGS, PURPOSE_UNSEEN, PURPOSE_SHARED, PURPOSE_UNSEEN_ILP = 1, 2, 3, 4, 5


def seeded(seed: int, *purpose: int) -> torch.Generator:
    """A torch generator for one purpose and step, independent of every other draw."""
    state = np.random.SeedSequence([seed, *purpose]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def key(x: np.ndarray) -> str:
    """The configuration's identity in the ledger (its encoding as a compact string)."""
    return "".join(str(int(v)) for v in x) if np.all(np.asarray(x) < 10) else ",".join(str(int(v)) for v in x)


def unkey(k: str) -> np.ndarray:
    """Inverse of :func:`key`."""
    return np.array([int(v) for v in (k.split(",") if "," in k else k)], dtype=np.int64)


def batch_ids(seed: int, n_train: int, batch_size: int, step: int) -> list[int]:
    """The training examples of global ``step``: a seeded permutation per epoch, read in batch-size slices."""
    epoch, pos = divmod(step, max(1, n_train // batch_size))
    perm = torch.randperm(n_train, generator=seeded(seed, PURPOSE_DATA, epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size].tolist()


def data_shards(seed: int, n_train: int, batch_size: int, step: int, n_workers: int) -> list[list[int]]:
    """:func:`batch_ids` split into one contiguous shard per worker (empty shards dropped)."""
    ids = np.asarray(batch_ids(seed, n_train, batch_size, step))
    return [s.tolist() for s in np.array_split(ids, n_workers) if len(s)]


def step_configurations(training_set: Sequence[np.ndarray], step: int, *, seed: int, k: int, sampling: str,
                        space: SearchSpace, numels: Sequence[int]) -> list[np.ndarray]:
    """The K configurations of global ``step``, a seeded draw from the round's training set: ``uniform`` (K
    distinct at random) or ``stratified`` (the set sorted by average bits and cut into K strata, one drawn from
    each, so every step contrasts low- and high-bit configurations, which is what trains θ's dependence on the
    configuration)."""
    k = min(k, len(training_set))
    g = seeded(seed, PURPOSE_CONFIGS, step)
    if sampling == "uniform":
        return [training_set[int(i)] for i in torch.randperm(len(training_set), generator=g)[:k]]
    if sampling != "stratified":
        raise ValueError(f"configuration sampling must be 'uniform' or 'stratified', got {sampling!r}")
    bits = np.atleast_1d(space.encoded_average_bits(np.stack(training_set), numels))
    strata = np.array_split(np.argsort(bits, kind="stable"), k)
    return [training_set[int(s[int(torch.randint(len(s), (1,), generator=g))])] for s in strata]
