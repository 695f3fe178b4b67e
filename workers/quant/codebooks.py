"""Codebooks: NormalFloat-k (method.md §1.3) and the uniform-integer family, plus nearest-code encoding."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy.special import ndtri  # the normal inverse CDF (scipy.stats' norm.ppf, without importing scipy.stats)

from search.space import parse_code

NF_OFFSET = 0.9677083
"""δ: the QLoRA NF4 constant. The δ-quantile of the normal is mapped to exactly 1."""


def nf_values(bits: int) -> np.ndarray:
    """NormalFloat-k levels: 2^(k-1) positive quantiles from δ down to 0.5 (0.5 dropped), 2^(k-1) - 1 negative
    ones mirrored, and an exact 0, mapped through the normal inverse CDF and scaled so that the δ-quantile is 1.

    This is method.md §1.3's construction (left: 1-δ..0.5, right: 0.5..δ) written the way QLoRA's
    ``create_normal_map`` evaluates it: quantiles in float32, the table in float32, divided by its max. Doing the
    float work in the same order makes NF4 equal the QLoRA / bitsandbytes table bit for bit, not just to 1e-7.
    The result is asymmetric: min -1, max +1, 2^(k-1) - 1 negative and 2^(k-1) positive values.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"NormalFloat bits must be in 2..8, got {bits}")
    half = 2 ** (bits - 1)
    positive = ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1].numpy())
    negative = -ndtri(torch.linspace(NF_OFFSET, 0.5, half)[:-1].numpy())
    table = torch.tensor(np.concatenate([positive, [0.0], negative]), dtype=torch.float32).sort().values
    return (table / table.max()).numpy().astype(np.float64)


def int_values(bits: int) -> np.ndarray:
    """Uniform-integer family: 2^k evenly spaced levels on [-1, 1] (symmetric, no exact zero for even counts),
    used with the same absmax block scaling as NormalFloat."""
    if not 2 <= bits <= 8:
        raise ValueError(f"integer code bits must be in 2..8, got {bits}")
    return np.linspace(-1.0, 1.0, 2**bits)


def codebook_values(code: str) -> np.ndarray:
    family, bits = parse_code(code)
    return nf_values(bits) if family == "nf" else int_values(bits)


@lru_cache(maxsize=64)
def codebook(code: str, device: str = "cpu") -> torch.Tensor:
    """The float32 codebook tensor of ``code`` (e.g. ``"nf4"``) on ``device``, cached."""
    return torch.tensor(codebook_values(code), dtype=torch.float32, device=device)


@lru_cache(maxsize=64)
def midpoints(code: str, device: str = "cpu") -> torch.Tensor:
    """Decision thresholds between neighbouring codes (float32)."""
    v = codebook(code, device)
    return (v[1:] + v[:-1]) / 2


def nearest_code(x: torch.Tensor, code: str) -> torch.Tensor:
    """Index of the nearest codebook value for every entry of ``x`` (any shape, float32), as uint8.

    Thresholds are the midpoints of neighbouring values; a value exactly on a midpoint goes to the lower code, and
    values beyond ±1 clamp to the end codes (method.md §1.3). The index is the number of thresholds strictly below
    the value. For small codebooks on the CPU that count is taken with one comparison pass per threshold over
    cache-sized chunks (about 2.5x faster than a binary search at 4 bits); otherwise ``torch.bucketize(right=False)``
    computes the same count.
    """
    mids = midpoints(code, str(x.device))
    if x.device.type != "cpu" or mids.numel() > _COMPARE_LOOP_MAX_THRESHOLDS:
        return torch.bucketize(x, mids, right=False).to(torch.uint8)
    flat = x.reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.uint8)
    hits = torch.empty(min(flat.numel(), _CHUNK), dtype=torch.bool)
    thresholds = mids.tolist()  # float32 values, exactly representable: the comparisons stay in float32
    for start in range(0, flat.numel(), _CHUNK):
        xs, counts = flat[start : start + _CHUNK], out[start : start + _CHUNK]
        hit = hits[: xs.numel()]
        torch.gt(xs, thresholds[0], out=hit)
        counts.copy_(hit)
        for t in thresholds[1:]:
            torch.gt(xs, t, out=hit)
            counts.add_(hit)
    return out.view(x.shape)


_COMPARE_LOOP_MAX_THRESHOLDS = 31
_CHUNK = 1 << 18
