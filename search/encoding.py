"""Configuration vectors: validation, exact storage, and the GP's input features (method.md §4.1, §6 A3).

An encoded configuration is the int64 vector of length d = 5N from :meth:`SearchSpace.encode`. The GP does not see
it raw. :class:`FeatureMap` maps it to a low-dimensional float64 vector in [0, 1]^D:

* the numel-weighted average bits of each group of matrices, for every grouping the caller gives (e.g. one
  grouping by transformer block, one by module type), scaled by the space's fixed bits range;
* the numel-weighted average ordinal index of each of the 5 fields, scaled by the fixed bounds [0, n_f − 1];
* the global average bits, scaled by the same fixed range — the storage objective reads it back exactly;
* optionally (``include_ordinal``) the raw 5N ordinal indices, each scaled by its fixed bounds [0, n_f − 1].

All scalings use the space's bounds, never data-derived ones, so a constant dimension never gives 0/0 and the map
does not change as the pool grows. Why low-dimensional: with 50–150 observations a GP cannot learn 1260
lengthscales, and gpytorch's batched posterior copies the training inputs per candidate, so scoring ~2500
neighbours in one call costs seconds at D ≈ 1300 but well under a second at D ≈ 50. ``include_ordinal`` defaults
to on only for small problems (d ≤ 200).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from search.space import FIELDS, SearchSpace

N_FIELDS = len(FIELDS)
ORDINAL_FEATURE_LIMIT = 200


def validate_configuration(space: SearchSpace, n_matrices: int, x: np.ndarray | Sequence[int],
                           allowed: np.ndarray | None = None) -> np.ndarray:
    """``x`` as an int64 (5N,) vector; ValueError on a wrong length, non-integers, an out-of-range index or (given
    the (N, n_settings) ``allowed`` domains of :meth:`SearchSpace.allowed`) a setting its matrix cannot take."""
    arr = np.asarray(x)
    d = N_FIELDS * n_matrices
    if arr.shape != (d,):
        raise ValueError(f"an encoded configuration must have shape ({d},) (5 × {n_matrices} matrices), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not (np.all(np.isfinite(arr)) and np.all(np.mod(arr, 1) == 0)):
            raise ValueError("an encoded configuration must hold integers")
    arr = arr.astype(np.int64)
    upper = space.upper_bounds(n_matrices)
    bad = np.flatnonzero((arr < 0) | (arr > upper))
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"index {int(arr[j])} at position {j} (matrix {j // N_FIELDS}, field {FIELDS[j % N_FIELDS]}) "
            f"is out of range 0..{int(upper[j])}"
        )
    if allowed is not None:
        flat = space.flat_indices(arr)
        misfit = np.flatnonzero(~allowed[np.arange(n_matrices), flat])
        if misfit.size:
            i = int(misfit[0])
            raise ValueError(f"matrix {i} cannot take {space.settings[int(flat[i])]}: its rows do not fit the "
                             f"type's blocks ({misfit.size} matrices of this configuration are outside their domain)")
    return arr


def normalize_groups(groups: Sequence[Sequence[int]] | None, n_matrices: int) -> list[np.ndarray]:
    """Groupings as dense int arrays of group ids 0..G−1, one array per grouping.

    ``None`` means contiguous chunks of at most ceil(N/32) matrices (≤ 32 groups), a neutral default that still lets
    the GP tell early from late layers. A flat list of ids (one per matrix) is a single grouping.
    """
    if groups is None:
        size = max(1, -(-n_matrices // 32))
        return [np.arange(n_matrices) // size]
    seq = list(groups)
    if seq and np.ndim(seq[0]) == 0:
        seq = [seq]
    out = []
    for g in seq:
        ids = np.asarray(g)
        if ids.shape != (n_matrices,):
            raise ValueError(f"each grouping must give one group id per matrix ({n_matrices}), got shape {ids.shape}")
        _, dense = np.unique(ids, return_inverse=True)
        out.append(dense.astype(np.int64))
    return out


class FeatureMap:
    """Encoded configurations (..., 5N) int → GP features (..., D) float64 in [0, 1] (see the module docstring)."""

    def __init__(
        self,
        space: SearchSpace,
        numels: Sequence[int],
        groups: Sequence[Sequence[int]] | None = None,
        include_ordinal: bool | None = None,
    ) -> None:
        n = np.asarray(numels, dtype=np.float64)
        self.space = space
        self.n_matrices = n.size
        self.d = N_FIELDS * n.size
        self.groupings = normalize_groups(groups, n.size)
        self.include_ordinal = self.d <= ORDINAL_FEATURE_LIMIT if include_ordinal is None else bool(include_ordinal)
        self.bits_lo, self.bits_hi = space.bits_range
        dt = torch.float64
        self._card = torch.tensor(space.cardinalities, dtype=torch.long)
        self._strides = torch.tensor(
            [int(np.prod(space.cardinalities[j + 1:])) for j in range(N_FIELDS)], dtype=torch.long
        )
        self._setting_bits = torch.tensor(space.setting_bits, dtype=dt)
        # Averaging matrices: (N, G) columns of numel weights normalised per group, plus the global column.
        cols = []
        for ids in self.groupings:
            w = np.zeros((n.size, int(ids.max()) + 1))
            w[np.arange(n.size), ids] = n
            cols.append(w / w.sum(axis=0, keepdims=True))
        cols.append((n / n.sum())[:, None])
        self._avg = torch.tensor(np.concatenate(cols, axis=1), dtype=dt)
        self._global = torch.tensor(n / n.sum(), dtype=dt)
        self._upper = torch.tensor(space.upper_bounds(self.n_matrices), dtype=dt).clamp_min(1.0)
        self.dim = self._avg.shape[1] + N_FIELDS + (self.d if self.include_ordinal else 0)
        self.bits_column = self._avg.shape[1] - 1

    def setting_bits(self, x: torch.Tensor) -> torch.Tensor:
        """bits_per_param of every matrix, (..., N)."""
        fields = x.reshape(*x.shape[:-1], self.n_matrices, N_FIELDS)
        return self._setting_bits[(fields * self._strides).sum(-1)]

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x, dtype=torch.long)
        group_bits = (self.setting_bits(x) @ self._avg - self.bits_lo) / (self.bits_hi - self.bits_lo)
        fields = x.reshape(*x.shape[:-1], self.n_matrices, N_FIELDS).to(torch.float64)
        field_avg = torch.einsum("...nf,n->...f", fields, self._global) / (self._card - 1).clamp_min(1)
        parts = [group_bits, field_avg]
        if self.include_ordinal:
            parts.append(x.to(torch.float64) / self._upper)
        return torch.cat(parts, dim=-1)

    def bits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Average bits (...,) read back from the global-bits feature (exact up to float64 rounding)."""
        return features[..., self.bits_column] * (self.bits_hi - self.bits_lo) + self.bits_lo
