"""Ask/tell Pareto search over quantization configurations (method.md §4, §4.6).

:class:`ParetoSearcher` holds the pool of evaluated configurations and nothing else: it never sees a model. The
caller tells it (configuration, loss) pairs — first the ILP initial pool (:mod:`search.allocation`), then the
evaluated proposals — and asks for new proposals and for the training set (segmented Pareto selection of the pool).

Determinism: round r's randomness is seeded from (seed, number of observations) through ``numpy.SeedSequence``,
so the same history and seed give byte-identical proposals, a restored searcher proposes exactly what the original
would have, and the global RNG state is never read.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from search.encoding import FeatureMap, normalize_groups, validate_configuration
from search.pareto import segment_edges, segmented_pareto
from search.proposer import ProposerOptions, propose_candidates
from search.space import SearchSpace

STATE_VERSION = 1
STATE_JSON = "searcher.json"
STATE_TENSORS = "searcher.safetensors"


class ParetoSearcher:
    """Pool + proposer + segmented selection, serialisable to JSON + tensors."""

    def __init__(
        self,
        space: SearchSpace,
        numels: Sequence[int],
        seed: int,
        segments: int = 40,
        bits_range: tuple[float, float] | None = None,
        groups: Sequence[Sequence[int]] | None = None,
        options: ProposerOptions | None = None,
        row_lengths: Sequence[int] | None = None,
    ) -> None:
        """``row_lengths`` (each matrix's input features) restrict every matrix to the settings it can take
        (:meth:`SearchSpace.allowed`); None lets every matrix take every setting."""
        n = np.asarray(numels)
        if n.ndim != 1 or n.size == 0 or not np.issubdtype(n.dtype, np.integer) or np.any(n <= 0):
            raise ValueError("numels must be a non-empty list of positive integer matrix sizes")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if row_lengths is not None and len(row_lengths) != n.size:
            raise ValueError(f"row_lengths has {len(row_lengths)} entries for {n.size} matrices")
        self.row_lengths = None if row_lengths is None else [int(r) for r in row_lengths]
        self.allowed = None if row_lengths is None else space.allowed(self.row_lengths)
        lo, hi = space.achievable_bits_range(n, self.allowed)
        self.bits_range = tuple(float(v) for v in (bits_range or (lo, hi)))
        segment_edges(segments, self.bits_range)  # validates segments and range
        if self.bits_range[0] < lo or self.bits_range[1] > hi:
            raise ValueError(f"bits_range {self.bits_range} lies outside the range this space offers these matrices "
                             f"[{lo:.4f}, {hi:.4f}]")
        self.space = space
        self.numels = n.astype(np.int64)
        self.seed = int(seed)
        self.segments = int(segments)
        self.groups = [g.tolist() for g in normalize_groups(groups, n.size)]
        self.options = ProposerOptions(**{**asdict(options or ProposerOptions()),
                                          "n_segments": self.segments, "bits_range": self.bits_range})
        self.feature_map = FeatureMap(space, self.numels, self.groups)
        self.d = self.feature_map.d
        self._X = np.zeros((0, self.d), dtype=np.int64)
        self._loss = np.zeros(0, dtype=np.float64)

    # ---- observations -------------------------------------------------------------------------------------------
    def tell(self, results: Iterable[tuple[Sequence[int] | np.ndarray, float]]) -> None:
        """Add evaluated (encoded configuration, loss) pairs; all are validated before any is added."""
        rows, losses = [], []
        for x, loss in results:
            rows.append(validate_configuration(self.space, self.numels.size, x, self.allowed))
            value = float(loss)
            if not np.isfinite(value):
                raise ValueError(f"loss must be finite, got {loss!r} for a configuration")
            losses.append(value)
        if rows:
            self._X = np.concatenate([self._X, np.stack(rows)])
            self._loss = np.concatenate([self._loss, np.asarray(losses)])

    @property
    def pool(self) -> list[tuple[np.ndarray, float]]:
        """Every observation so far, in the order told."""
        return [(x.copy(), float(v)) for x, v in zip(self._X, self._loss)]

    def pool_bits(self) -> np.ndarray:
        """Exact average bits of every pool configuration, in pool order."""
        return np.atleast_1d(self.space.encoded_average_bits(self._X, self.numels)) if len(self._loss) else np.zeros(0)

    def training_set(self) -> list[np.ndarray]:
        """Segmented Pareto selection of the pool (U = ``segments`` over ``bits_range``; outside points clipped)."""
        keep = segmented_pareto(self.pool_bits(), self._loss, self.segments, self.bits_range)
        return [self._X[i].copy() for i in keep]

    # ---- proposals ----------------------------------------------------------------------------------------------
    def round_seed(self) -> int:
        """Seed of the next proposal round: a function of (seed, number of observations) only."""
        return int(np.random.SeedSequence([self.seed, len(self._loss)]).generate_state(1)[0])

    def propose(self, n: int, exclude: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
        """Up to ``n`` new configurations, not in the pool nor in ``exclude``, each inside one bit segment."""
        ex = (np.stack([validate_configuration(self.space, self.numels.size, x, self.allowed) for x in exclude])
              if len(exclude) else None)
        return propose_candidates(self.space, self.numels, self._X, self._loss, n, self.round_seed(),
                                  self.feature_map, self.options, exclude=ex, allowed=self.allowed)

    # ---- persistence --------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able metadata, tensors): everything needed to rebuild the searcher exactly."""
        meta = {
            "version": STATE_VERSION,
            "space": self.space.to_dict(),
            "numels": self.numels.tolist(),
            "row_lengths": self.row_lengths,
            "seed": self.seed,
            "segments": self.segments,
            "bits_range": list(self.bits_range),
            "groups": self.groups,
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.options).items()},
        }
        tensors = {"pool": torch.from_numpy(self._X.copy()), "loss": torch.from_numpy(self._loss.copy())}
        return meta, tensors

    @classmethod
    def from_state_dict(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "ParetoSearcher":
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported searcher state version {meta.get('version')!r} (expected {STATE_VERSION})")
        opts = dict(meta["options"])
        opts["combine_sizes"] = tuple(opts["combine_sizes"])
        opts["bits_range"] = tuple(opts["bits_range"]) if opts["bits_range"] is not None else None
        searcher = cls(SearchSpace.from_dict(meta["space"]), meta["numels"], meta["seed"], meta["segments"],
                       tuple(meta["bits_range"]), meta["groups"], ProposerOptions(**opts), meta.get("row_lengths"))
        searcher.load_state_dict(meta, tensors)
        return searcher

    def load_state_dict(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Replace the pool with the saved one (the configuration of ``self`` must match the saved one)."""
        if (meta["numels"] != self.numels.tolist() or meta["space"] != self.space.to_dict()
                or meta.get("row_lengths") != self.row_lengths):
            raise ValueError("saved searcher state belongs to a different space or model (numels or rows differ)")
        X = tensors["pool"].numpy().astype(np.int64)
        loss = tensors["loss"].numpy().astype(np.float64)
        self._X, self._loss = np.zeros((0, self.d), dtype=np.int64), np.zeros(0)
        self.tell(zip(X, loss))

    def save(self, directory: str | Path) -> None:
        """Write ``searcher.json`` and ``searcher.safetensors`` atomically (temp file + os.replace)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta, tensors = self.state_dict()
        atomic_write(directory / STATE_TENSORS, lambda p: save_file(tensors, str(p)))
        atomic_write(directory / STATE_JSON, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))

    @classmethod
    def load(cls, directory: str | Path) -> "ParetoSearcher":
        directory = Path(directory)
        if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
            raise ValueError(f"no saved searcher in {str(directory)!r}")
        meta = json.loads((directory / STATE_JSON).read_text())
        return cls.from_state_dict(meta, load_file(str(directory / STATE_TENSORS)))


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, then rename it over ``path``: readers never see half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
