"""The quantization configuration space (method.md §1.2, §1.5, §1.6) as data.

A *setting* is the five choices made for one target matrix: code (b0), first-level scale bits (b1),
second-level scale format (b2), weights per first-level block (B0) and first-level scales per second-level block
(B1). A *configuration* is one setting per target matrix of a model, in registry order.

The space is data, loaded from YAML in ``conf/space/``, so a run can restrict it (fewer values) or extend it
(``nf5``/``nf6`` codes, or the uniform-integer family ``int2``..``int8``). Codes are named ``<family><bits>``; a
bare integer ``k`` in YAML means ``nf<k>``. The order of each field's values is the ordinal integer encoding the
search uses (method.md §4.1), so keep values in ascending cost order.
"""

from __future__ import annotations

import itertools
import math
import re
import reprlib
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

FIELDS: tuple[str, ...] = ("code", "scale_bits", "scale2_format", "block0", "block1")
"""Field names in encoding order; the paper's symbols are b0, b1, b2, B0, B1."""

PAPER_SYMBOLS: dict[str, str] = {
    "code": "b0",
    "scale_bits": "b1",
    "scale2_format": "b2",
    "block0": "B0",
    "block1": "B1",
}

FLOAT_FORMAT_BITS: dict[str, int] = {"bf16": 16, "fp16": 16, "fp32": 32}
"""Width w(b2) of each second-level scale format (method.md §1.5)."""

CODE_FAMILIES: tuple[str, ...] = ("nf", "int", "gguf")
"""``nf``: NormalFloat-k codebook (§1.3). ``int``: uniform grid of 2^k levels on [-1, 1] (the paper's integer
ablation, same blockwise double quantization around it). ``gguf``: one of llama.cpp's tensor types (``q4_k``,
``q8_0``, ...), whose block layout and scale format ggml fixes, so a setting of this family is its code alone."""

GGUF_TYPES: dict[str, tuple[int, int, int]] = {
    # name: (ggml_type enum value, weights per block, bytes per block), as in ggml.h / ggml.c's type traits
    "q2_k": (10, 256, 84),
    "q3_k": (11, 256, 110),
    "q4_0": (2, 32, 18),
    "iq4_nl": (20, 32, 18),
    "q4_k": (12, 256, 144),
    "q4_1": (3, 32, 20),
    "q5_0": (6, 32, 22),
    "q5_k": (13, 256, 176),
    "q5_1": (7, 32, 24),
    "q6_k": (14, 256, 210),
    "q8_0": (8, 32, 34),
}
"""llama.cpp tensor types a ``gguf`` space may hold. A type quantizes each row of a matrix in blocks along the row,
so a matrix takes it only when its row length (input features) is a multiple of the block; its storage cost is
exactly bytes·8/weights bits per weight (tests/quant/test_ggml.py checks this table against libggml itself)."""

GGUF_NEUTRAL: dict[str, Any] = {"scale_bits": 0, "scale2_format": "none", "block0": 1, "block1": 1}
"""The four blockwise fields of every ``gguf`` setting: the type fixes its own blocks and scales."""

_CODE_RE = re.compile(r"^(?:(nf|int)([2-8])|(" + "|".join(GGUF_TYPES) + r"))$")

DEFAULT_SPACE_FILE = Path(__file__).resolve().parents[1] / "conf" / "space" / "default.yaml"
MAX_SPACE_FILE_BYTES = 1 << 20


def show_value(value: Any) -> str:
    """``repr`` of a user-supplied value, bounded in size whatever the value: a YAML alias bomb is a DAG of
    billions of leaves, and printing one whole once hung validation for minutes (used for every file a user
    writes: run configurations and space files)."""
    shower = reprlib.Repr()  # attributes, not keywords: Python 3.10 has no keyword constructor
    shower.maxlevel, shower.maxstring, shower.maxother, shower.maxlong = 2, 80, 80, 40
    shower.maxlist = shower.maxtuple = shower.maxdict = shower.maxset = 4
    return shower.repr(value)

MAX_BLOCK = 4096
"""Largest B0 or B1 accepted."""
MAX_GROUP = 1 << 16
"""Largest B0·B1 accepted: every matrix is zero-padded to a multiple of it, so an absurd pair (2^20 × 2^20) would
have the quantizer allocate terabytes for a small matrix."""


def parse_code(code: str | int) -> tuple[str, int]:
    """Split a code name such as ``nf4`` into (family, bits); a bare int ``k`` means ``nfk``."""
    if isinstance(code, (int, np.integer)) and not isinstance(code, bool):
        code = f"nf{int(code)}"
    if not isinstance(code, str) or not _CODE_RE.match(code):
        raise ValueError(
            f"unknown code {show_value(code)}: expected <family><bits> with family nf or int and bits in 2..8 "
            f"(e.g. 'nf4', 'int3'), a bare integer meaning NormalFloat, or a llama.cpp type: {list(GGUF_TYPES)}"
        )
    m = _CODE_RE.match(code)
    assert m is not None
    if m.group(3):
        digit = re.search(r"\d", m.group(3))
        assert digit is not None
        return "gguf", int(digit.group())
    return m.group(1), int(m.group(2))


@dataclass(frozen=True, order=True)
class QuantSetting:
    """The five quantization choices for one matrix. Validated on construction, so a bad value never reaches
    the quantizer. A ``gguf`` setting is its code alone (``QuantSetting("q4_k")``): the other fields keep their
    neutral defaults, which no other family accepts."""

    code: str
    scale_bits: int = GGUF_NEUTRAL["scale_bits"]
    scale2_format: str = GGUF_NEUTRAL["scale2_format"]
    block0: int = GGUF_NEUTRAL["block0"]
    block1: int = GGUF_NEUTRAL["block1"]

    def __post_init__(self) -> None:
        family, bits = parse_code(self.code)
        if family == "gguf":
            given = {f: getattr(self, f) for f in GGUF_NEUTRAL}
            if given != GGUF_NEUTRAL:
                raise ValueError(f"{self.code} is a llama.cpp type, which fixes its own blocks and scales: give the code "
                                 f"alone, not {show_value(given)}")
            return
        object.__setattr__(self, "code", f"{family}{bits}")
        if isinstance(self.scale_bits, bool) or not isinstance(self.scale_bits, (int, np.integer)):
            raise ValueError(f"scale_bits (b1) must be an int in 1..16, got {show_value(self.scale_bits)}")
        if not 1 <= int(self.scale_bits) <= 16:
            raise ValueError(f"scale_bits (b1) must be in 1..16, got {show_value(self.scale_bits)}")
        if self.scale2_format not in FLOAT_FORMAT_BITS:
            raise ValueError(
                f"scale2_format (b2) must be one of {sorted(FLOAT_FORMAT_BITS)}, got {show_value(self.scale2_format)}"
            )
        for field, value in (("block0", self.block0), ("block1", self.block1)):
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
            if not ok or int(value) & (int(value) - 1) or int(value) > MAX_BLOCK:
                raise ValueError(f"{field} ({PAPER_SYMBOLS[field]}) must be a power of two in 1..{MAX_BLOCK}, "
                                 f"got {show_value(value)}")
        if int(self.block0) * int(self.block1) > MAX_GROUP:
            raise ValueError(f"block0 × block1 (B0·B1) = {int(self.block0) * int(self.block1)} exceeds {MAX_GROUP}: every "
                             "matrix is zero-padded to a multiple of it")
        object.__setattr__(self, "scale_bits", int(self.scale_bits))
        object.__setattr__(self, "block0", int(self.block0))
        object.__setattr__(self, "block1", int(self.block1))

    @property
    def family(self) -> str:
        return parse_code(self.code)[0]

    @property
    def code_bits(self) -> int:
        return parse_code(self.code)[1]

    @property
    def group_size(self) -> int:
        """Weights per second-level block (B0·B1): the padding granularity of a matrix."""
        return self.block0 * self.block1

    @property
    def row_multiple(self) -> int:
        """What a matrix's row length must be a multiple of to take this setting: a ``gguf`` type's block (ggml
        quantizes rows and never pads them); 1 for the blockwise families, which pad the flattened matrix."""
        return GGUF_TYPES[self.code][1] if self.family == "gguf" else 1

    @property
    def exact_bits(self) -> Fraction:
        """Storage cost per weight as an exact rational: b0 + b1/B0 + w(b2)/(B0·B1) (method.md §1.5), or a
        ``gguf`` type's bytes·8 per block of weights."""
        if self.family == "gguf":
            _, weights, nbytes = GGUF_TYPES[self.code]
            return Fraction(8 * nbytes, weights)
        return (self.code_bits + Fraction(self.scale_bits, self.block0)
                + Fraction(FLOAT_FORMAT_BITS[self.scale2_format], self.group_size))

    @property
    def bits_per_param(self) -> float:
        """b0 + b1/B0 + w(b2)/(B0·B1) (method.md §1.5): per-matrix offset and padding are not included."""
        return bits_per_param(self)

    def as_tuple(self) -> tuple[Any, ...]:
        return (self.code, self.scale_bits, self.scale2_format, self.block0, self.block1)

    def fields(self) -> dict[str, Any]:
        """The setting as JSON-ready fields: all five, or the code alone for a ``gguf`` type."""
        if self.family == "gguf":
            return {"code": self.code}
        return dict(zip(FIELDS, self.as_tuple()))

    def __str__(self) -> str:
        if self.family == "gguf":
            return self.code
        return f"({self.code}, {self.scale_bits}, {self.scale2_format}, {self.block0}, {self.block1})"


def bits_per_param(setting: QuantSetting) -> float:
    """Storage cost of one weight under ``setting`` in bits (method.md §1.5)."""
    if setting.family == "gguf":
        return float(setting.exact_bits)
    return (
        setting.code_bits
        + setting.scale_bits / setting.block0
        + FLOAT_FORMAT_BITS[setting.scale2_format] / (setting.block0 * setting.block1)
    )


def average_bits(settings: Sequence[QuantSetting], numels: Sequence[int]) -> float:
    """Parameter-weighted mean of bits_per_param over the target matrices (method.md §1.6)."""
    if len(settings) != len(numels):
        raise ValueError(f"configuration has {len(settings)} settings but {len(numels)} matrix sizes were given")
    if len(numels) == 0:
        raise ValueError("cannot average bits over zero matrices")
    n = np.asarray(numels, dtype=np.float64)
    if np.any(n <= 0):
        raise ValueError("every matrix size must be positive")
    bpp = np.array([s.bits_per_param for s in settings], dtype=np.float64)
    return float((n * bpp).sum() / n.sum())


@dataclass(frozen=True)
class SearchSpace:
    """The allowed values of each field. Value order is the ordinal encoding (index 0 = first listed value)."""

    code: tuple[str, ...]
    scale_bits: tuple[int, ...]
    scale2_format: tuple[str, ...]
    block0: tuple[int, ...]
    block1: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", tuple(c if parse_code(c)[0] == "gguf" else "{}{}".format(*parse_code(c))
                                              for c in self.code))
        families = {parse_code(c)[0] == "gguf" for c in self.code}
        if len(families) > 1:
            raise ValueError("a space holds either llama.cpp types (gguf) or blockwise codes (nf/int), not both: "
                             f"got {show_value(list(self.code))}")
        for field in FIELDS:
            values = getattr(self, field)
            if len(values) == 0:
                raise ValueError(f"space field {field} ({PAPER_SYMBOLS[field]}) has no values")
            if len(set(values)) != len(values):
                raise ValueError(f"space field {field} ({PAPER_SYMBOLS[field]}) repeats a value: "
                                 f"{show_value(list(values))}")
        # Constructing every extreme setting validates every value of every field.
        for field in FIELDS:
            for v in getattr(self, field):
                QuantSetting(**{f: (v if f == field else getattr(self, f)[0]) for f in FIELDS})

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchSpace":
        """Fields from a mapping (a space file). A space of llama.cpp types may give ``code`` alone."""
        codes = data.get("code")
        if (isinstance(codes, (list, tuple)) and codes and set(data) == {"code"}
                and all(isinstance(c, str) and c in GGUF_TYPES for c in codes)):
            data = {"code": codes, **{f: [v] for f, v in GGUF_NEUTRAL.items()}}
        unknown = [k for k in data if k not in FIELDS]
        missing = [f for f in FIELDS if f not in data]
        if unknown:
            raise ValueError(f"unknown space field(s) {show_value(unknown)}; allowed: {list(FIELDS)}")
        if missing:
            raise ValueError(f"space is missing field(s) {missing}; required: {list(FIELDS)}")
        for field in FIELDS:
            values = data[field]
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"space field {field} must be a list of values, got {show_value(values)}")
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, str))]
            if bad:
                raise ValueError(f"space field {field} holds {show_value(bad[0])}: each value is a number or a name")
        return cls(**{f: tuple(data[f]) for f in FIELDS})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SearchSpace":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"space file {str(path)!r} does not exist")
        if path.stat().st_size > MAX_SPACE_FILE_BYTES:
            raise ValueError(f"space file {str(path)!r} is larger than {MAX_SPACE_FILE_BYTES} bytes")
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"space file {str(path)!r} is not valid UTF-8 YAML: {str(err)[:300]}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"space file {str(path)!r} must hold a mapping of field -> values")
        return cls.from_dict(data)

    @classmethod
    def default(cls) -> "SearchSpace":
        """The paper's 432-setting space, read from ``conf/space/default.yaml``."""
        return cls.from_yaml(DEFAULT_SPACE_FILE)

    def to_dict(self) -> dict[str, list[Any]]:
        if self.is_gguf:
            return {"code": list(self.code)}
        return {f: list(getattr(self, f)) for f in FIELDS}

    @property
    def is_gguf(self) -> bool:
        """Whether the space's settings are llama.cpp tensor types (exportable as GGUF)."""
        return parse_code(self.code[0])[0] == "gguf"

    # ---- per-matrix domains ---------------------------------------------------------------------------------
    def allowed(self, row_lengths: Sequence[int]) -> np.ndarray:
        """(N, n_settings) bool: which settings each matrix can take, given its row length (input features).

        A blockwise setting fits any matrix (it pads the flattened matrix); a llama.cpp type fits only rows that are
        a multiple of its block, since ggml quantizes row by row and never pads (the K-quants need 256, the others
        32). The search, the ILP and the unseen draws keep every configuration inside these domains.
        """
        rows = np.asarray(row_lengths)
        if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer) or np.any(rows <= 0):
            raise ValueError(f"row lengths must be a non-empty list of positive integers, got {show_value(list(rows))}")
        multiples = np.array([s.row_multiple for s in self.settings], dtype=np.int64)
        return rows.astype(np.int64)[:, None] % multiples[None, :] == 0

    def achievable_bits_range(self, numels: Sequence[int], allowed: np.ndarray | None = None) -> tuple[float, float]:
        """(cheapest, dearest) average bits a model can reach: each matrix at its cheapest / dearest allowed
        setting (the space's own range when every matrix takes every setting)."""
        if allowed is None or allowed.all():
            return self.bits_range
        n = np.asarray(numels, dtype=np.float64)
        bits = np.where(allowed, self.setting_bits[None, :], np.nan)
        return (float(np.dot(n, np.nanmin(bits, axis=1)) / n.sum()),
                float(np.dot(n, np.nanmax(bits, axis=1)) / n.sum()))

    # ---- per-matrix settings ------------------------------------------------------------------------------
    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Number of values of each field, in encoding order (default [4, 4, 3, 3, 3])."""
        return tuple(len(getattr(self, f)) for f in FIELDS)

    @property
    def n_settings(self) -> int:
        return math.prod(self.cardinalities)

    @cached_property
    def settings(self) -> tuple[QuantSetting, ...]:
        """Every per-matrix setting, in row-major order of the field indices (flat index order)."""
        return tuple(QuantSetting(*vals) for vals in itertools.product(*(getattr(self, f) for f in FIELDS)))

    @cached_property
    def setting_bits(self) -> np.ndarray:
        """bits_per_param of every setting, indexed by flat index."""
        return np.array([s.bits_per_param for s in self.settings], dtype=np.float64)

    @cached_property
    def most_precise(self) -> QuantSetting:
        """The setting with the most bits per weight (the first on a tie): the one that perturbs W least."""
        return self.settings[int(np.argmax(self.setting_bits))]

    @cached_property
    def _value_index(self) -> tuple[dict[Any, int], ...]:
        return tuple({v: i for i, v in enumerate(getattr(self, f))} for f in FIELDS)

    def setting_indices(self, setting: QuantSetting, *, matrix: str = "matrix") -> tuple[int, ...]:
        """Field indices of ``setting``; ValueError naming the matrix and field if a value is outside the space."""
        out = []
        for field, table, value in zip(FIELDS, self._value_index, setting.as_tuple()):
            if value not in table:
                raise ValueError(
                    f"{matrix}: {field} ({PAPER_SYMBOLS[field]}) = {value!r} is not in the space; "
                    f"allowed: {list(getattr(self, field))}"
                )
            out.append(table[value])
        return tuple(out)

    def flat_index(self, setting: QuantSetting, *, matrix: str = "matrix") -> int:
        return int(np.ravel_multi_index(self.setting_indices(setting, matrix=matrix), self.cardinalities))

    def setting_from_indices(self, indices: Sequence[int]) -> QuantSetting:
        if len(indices) != len(FIELDS):
            raise ValueError(f"a setting has {len(FIELDS)} field indices, got {len(indices)}")
        for field, i, card in zip(FIELDS, indices, self.cardinalities):
            if not 0 <= int(i) < card:
                raise ValueError(f"{field} index {int(i)} is out of range 0..{card - 1}")
        return QuantSetting(*(getattr(self, f)[int(i)] for f, i in zip(FIELDS, indices)))

    def validate_setting(self, setting: QuantSetting, *, matrix: str = "matrix") -> None:
        self.setting_indices(setting, matrix=matrix)

    # ---- whole-model configurations -----------------------------------------------------------------------
    def encode(self, configuration: Sequence[QuantSetting], names: Sequence[str] | None = None) -> np.ndarray:
        """Integer vector of length 5N: the field indices of matrix 0, then matrix 1, ... (method.md §4.1)."""
        names = names or [f"matrix {i}" for i in range(len(configuration))]
        rows = [self.setting_indices(s, matrix=n) for s, n in zip(configuration, names)]
        return np.asarray(rows, dtype=np.int64).reshape(-1)

    def decode(self, x: Sequence[int] | np.ndarray) -> list[QuantSetting]:
        """Inverse of :meth:`encode`; ValueError on a wrong length or an out-of-range index."""
        arr = np.asarray(x)
        if arr.ndim != 1 or arr.size % len(FIELDS):
            raise ValueError(f"an encoded configuration is a 1-D vector of length 5N, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise ValueError("an encoded configuration must hold integers")
            arr = arr.astype(np.int64)
        return [self.setting_from_indices(row) for row in arr.reshape(-1, len(FIELDS))]

    def upper_bounds(self, n_matrices: int) -> np.ndarray:
        """Largest index of each of the 5N encoded dimensions."""
        return np.tile(np.asarray(self.cardinalities, dtype=np.int64) - 1, n_matrices)

    def average_bits(self, configuration: Sequence[QuantSetting], numels: Sequence[int]) -> float:
        for i, s in enumerate(configuration):
            self.validate_setting(s, matrix=f"matrix {i}")
        return average_bits(configuration, numels)

    def flat_indices(self, x: np.ndarray) -> np.ndarray:
        """The flat setting index of every matrix of one (5N,) or many (n, 5N) encoded configurations: (N,) or
        (n, N)."""
        x = np.asarray(x, dtype=np.int64)
        fields = x.reshape(x.shape[:-1] + (-1, len(FIELDS)))
        return np.ravel_multi_index(tuple(fields[..., j] for j in range(len(FIELDS))), self.cardinalities)

    def encoded_average_bits(self, x: np.ndarray, numels: Sequence[int]) -> np.ndarray:
        """Average bits of one (5N,) or many (n, 5N) encoded configurations, vectorised for the search."""
        x = np.asarray(x, dtype=np.int64)
        single = x.ndim == 1
        flat = self.flat_indices(np.atleast_2d(x))
        n = np.asarray(numels, dtype=np.float64)
        out = (self.setting_bits[flat] * n).sum(axis=1) / n.sum()
        return out[0] if single else out

    @property
    def bits_range(self) -> tuple[float, float]:
        return float(self.setting_bits.min()), float(self.setting_bits.max())
