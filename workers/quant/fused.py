"""Fused CPU kernels for the blockwise codebook quantizer (NF-k and INT-k codes, method.md §1.4), compiled by Numba.

Why: CoA-LoRA switches configuration every step, so quantizing a matrix under a new setting is on the hot path.
The pure-torch path in :mod:`.blockwise` runs one tensor op per codebook threshold (255 for nf8), widens codes to
int64 to gather, and packs odd widths through int64 words. These kernels make the two passes over the matrix that
the format needs, each a single multithreaded loop:

1. :func:`block_absmax`: one absmax per first-level block (and a NaN/Inf flag), reading the matrix once;
2. :func:`encode` / :func:`fake_quantize_values`: divide by the block's scale, find the nearest code (a table
   over a uniform grid of [-1, 1] gives a start no higher than the answer, and a fixed number of branch-free
   threshold compares finish it, so no per-threshold passes and no unpredictable branches), write the uint8 code
   (or directly code value x scale, for fake-quantization).

:func:`pack` and :func:`dequantize_packed` pack and decode any width 1..8 without int64 intermediates; widths
that divide 8 decode through a byte -> values table.
Everything between the two passes (offset, second-level scales, scale codes: one value per 64 or more entries)
stays in torch and is shared with the reference path, so both see the very same scales.

Why Numba, not the alternatives: it ships LLVM inside its wheel, so nothing needs a C++ compiler at run time
(torch.compile/inductor does) or at install (a C++ extension does); ``prange`` loops are multithreaded without the
per-op dispatch that made the torch path slow at 2 threads under load; and compiled code is cached on disk
(``cache=True``) so each Ray worker loads it instead of compiling again. Triton would be the choice on a GPU; CUDA
tensors keep the torch path.

Bit-identical to the reference: every float operation is the same float32 operation in the same order (x / ŝ, the
midpoint comparisons, value · ŝ), and a code is the number of thresholds strictly below its value, as
``torch.bucketize(right=False)`` computes it. ``tests/quant/test_fused.py`` checks codes, scales and
outputs for every setting of the spaces.

Fallback: when Numba is not importable, :data:`AVAILABLE` is False and :mod:`.blockwise` uses its torch path.
The thread count follows ``torch.get_num_threads()`` so one knob (the worker's ``threads``) governs both. Threads
come from Numba's workqueue layer unless ``NUMBA_THREADING_LAYER`` says otherwise (see below).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from . import packing

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None
    AVAILABLE = False
else:
    AVAILABLE = True
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # Numba's OpenMP layer keeps its threads spinning after each kernel; with one worker per core they took
        # the cores from the other workers' matmuls (the demo ran 3x slower). The workqueue layer's threads sleep.
        # It serves one launching thread at a time, which is how the workers call these kernels.
        numba.config.THREADING_LAYER = "workqueue"


def _threads() -> None:
    """Run the next kernel on as many threads as torch is allowed (never more than Numba started with)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


if AVAILABLE:

    @njit(cache=True, inline="always")
    def _nearest(x, mids, cell_start, steps):  # pragma: no cover - compiled
        """Number of thresholds strictly below x (bucketize right=False). ``cell_start`` holds, per cell of a uniform
        grid over [-1, 1], a count that is never above the answer for any x in that cell, and at most ``steps``
        thresholds lie above it within the cell: so ``steps`` branch-free compares finish the count. ``mids``
        ends with +inf padding so the compares never read past it."""
        cells = cell_start.shape[0]
        f = (x + np.float32(1.0)) * np.float32(cells * 0.5)
        cell = int(min(max(f, np.float32(0.0)), np.float32(cells - 1)))
        c = cell_start[cell]
        for _ in range(steps):
            c += mids[c] < x
        return c

    @njit(cache=True, parallel=True)
    def _block_absmax(flat, n, block0, out, bad):  # pragma: no cover - compiled
        largest = np.float32(3.4028235e38)
        for b in prange(out.shape[0]):
            first = b * block0
            m = np.float32(0.0)
            nonfinite = 0
            for i in range(first, min(first + block0, n)):
                a = abs(flat[i])
                nonfinite += not (a <= largest)  # NaN and Inf, without a branch that stops vectorisation
                m = a if a > m else m
            out[b] = m
            bad[b] = nonfinite > 0

    @njit(cache=True, inline="always")
    def _divisor(s):  # pragma: no cover - compiled
        """ŝ, or 1 where ŝ = 0 (the block decodes to zeros whatever its codes), as in the reference."""
        return s if s > np.float32(0.0) else np.float32(1.0)

    @njit(cache=True, parallel=True)
    def _encode(flat, n, block0, scales, mids, cell_start, steps, codes):  # pragma: no cover - compiled
        zero = np.float32(0.0)
        for b in prange(scales.shape[0]):
            safe = _divisor(scales[b])
            first = b * block0
            for i in range(first, first + block0):
                x = flat[i] / safe if i < n else zero / safe
                codes[i] = _nearest(x, mids, cell_start, steps)

    @njit(cache=True, parallel=True)
    def _fake_quantize(flat, n, block0, scales, mids, cell_start, steps, book, out):  # pragma: no cover - compiled
        for b in prange(scales.shape[0]):
            s = scales[b]
            safe = _divisor(s)
            first = b * block0
            for i in range(first, min(first + block0, n)):
                out[i] = book[_nearest(flat[i] / safe, mids, cell_start, steps)] * s

    @njit(cache=True, parallel=True)
    def _pack(codes, bits, group, group_bytes, out):  # pragma: no cover - compiled
        n = codes.shape[0]
        for g in prange(out.shape[0] // group_bytes):
            word = np.uint64(0)
            for j in range(group):
                i = g * group + j
                c = np.uint64(codes[i]) if i < n else np.uint64(0)
                word = (word << np.uint64(bits)) | c
            for k in range(group_bytes):
                shift = np.uint64(8 * (group_bytes - 1 - k))
                out[g * group_bytes + k] = np.uint8((word >> shift) & np.uint64(0xFF))

    @njit(cache=True, inline="always")
    def _block_scale(sc, b):  # pragma: no cover - compiled
        """ŝ of block b, read straight from the packed scale codes: q_s · (t̂ / M0) + o, the reference's float32
        operations in its order. ``sc`` = (packed scale codes, their bits, codes and bytes per packing group, B1,
        t̂ / M0 per second-level block, o)."""
        packed, bits, group, group_bytes, block1, step, offset = sc
        g = b // group
        word = np.uint64(0)
        for k in range(group_bytes):
            word = (word << np.uint64(8)) | np.uint64(packed[g * group_bytes + k])
        code = (word >> np.uint64(bits * (group - 1 - b % group))) & np.uint64((1 << bits) - 1)
        return np.float32(code) * step[b // block1] + offset

    def _byte_decoder(per: int):  # noqa: ANN202 - returns a compiled kernel
        """Decoder for widths dividing 8: each packed byte maps to its ``per`` = 8/k values through a flattened
        (256, per) table. ``per`` is a closure constant, so the inner loop is unrolled (twice as fast as a loop
        with a run-time bound); the tail block that runs past ``n`` takes the checked loop."""

        @njit(cache=True, parallel=True)
        def decode(packed, block0, n, n_blocks, sc, table, out):  # pragma: no cover - compiled
            bytes_per_block = block0 // per
            for b in prange(n_blocks):
                s = _block_scale(sc, b)
                first = b * block0
                whole = first + block0 <= n
                for j in range(bytes_per_block):
                    src = packed[b * bytes_per_block + j] * per
                    at = first + j * per
                    for t in range(per):
                        if whole or at + t < n:
                            out[at + t] = table[src + t] * s

        return decode

    @njit(cache=True, parallel=True)
    def _decode_8bit(packed, block0, n, n_blocks, sc, book, out):  # pragma: no cover - compiled
        """8-bit codes, two per iteration: LLVM turns a one-code-per-iteration loop into vector gathers, which ran
        3x slower than these scalar loads on the AMD EPYC we measured."""
        for b in prange(n_blocks):
            s = _block_scale(sc, b)
            i = b * block0
            stop = min(i + block0, n)
            while i + 1 < stop:
                first_code, second_code = packed[i], packed[i + 1]
                out[i] = book[first_code] * s
                out[i + 1] = book[second_code] * s
                i += 2
            if i < stop:
                out[i] = book[packed[i]] * s

    _BYTE_DECODERS = {per: _byte_decoder(per) for per in (2, 4, 8)}

    @njit(cache=True, parallel=True)
    def _dequantize_words(packed, bits, group, group_bytes, block0, n, n_blocks, sc, book, out):  # pragma: no cover
        """Other widths: a group of codes spans ``group_bytes`` bytes; join them into one word and cut it."""
        mask = np.uint64((1 << bits) - 1)
        groups_per_block = block0 // group
        for b in prange(n_blocks):
            s = _block_scale(sc, b)
            for gg in range(groups_per_block):
                g = b * groups_per_block + gg
                word = np.uint64(0)
                for k in range(group_bytes):
                    word = (word << np.uint64(8)) | np.uint64(packed[g * group_bytes + k])
                for j in range(group):
                    i = g * group + j
                    if i < n:
                        shift = np.uint64(bits * (group - 1 - j))
                        out[i] = book[(word >> shift) & mask] * s


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


_CELLS = 4096


@lru_cache(maxsize=64)
def _search_table_cached(mids: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    thresholds = np.frombuffer(mids, dtype=np.float32)
    # A cell's start is the count of thresholds below the lower edge of the cell before it: x / ŝ rounds in
    # float32 and the cell index in float32, so an x may land one cell above its true one, never further.
    edges = np.linspace(-1.0, 1.0, _CELLS + 1)[:-1]
    below = np.searchsorted(thresholds.astype(np.float64), edges, side="left")
    start = np.concatenate([[0], below[:-1]]).astype(np.int64)
    # compares needed: the thresholds from a cell's start up to the upper edge of the cell after it (the last two
    # cells also take every x beyond +1)
    upper = np.searchsorted(thresholds.astype(np.float64), np.append(edges[2:], [np.inf, np.inf]), side="right")
    steps = int(max((upper - start).max(), 1))
    padded = np.concatenate([thresholds, np.full(steps + 1, np.inf, dtype=np.float32)])
    return padded, start, steps


def _search_table(mids: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """(thresholds padded with +inf, start count per grid cell, compares per entry) for :func:`_nearest`."""
    return _search_table_cached(_np(mids.float()).tobytes())


def block_absmax(flat: torch.Tensor, block0: int, n_blocks: int) -> tuple[torch.Tensor, bool]:
    """(absmax of each of ``n_blocks`` blocks of ``block0`` entries, whether any entry is NaN/Inf). Entries past
    ``flat``'s end count as zero padding. ``flat`` is a 1-D float32 CPU tensor."""
    _threads()
    out = np.empty(n_blocks, dtype=np.float32)
    bad = np.empty(n_blocks, dtype=np.bool_)
    _block_absmax(_np(flat), flat.numel(), block0, out, bad)
    return torch.from_numpy(out), bool(bad.any())


def encode(flat: torch.Tensor, block0: int, scales: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """uint8 code of every entry (padding included, as zeros) for dequantized block scales ``scales``."""
    _threads()
    codes = np.empty(scales.numel() * block0, dtype=np.uint8)
    _encode(_np(flat), flat.numel(), block0, _np(scales), *_search_table(mids), codes)
    return torch.from_numpy(codes)


def fake_quantize_values(
    flat: torch.Tensor, block0: int, scales: torch.Tensor, mids: torch.Tensor, book: torch.Tensor
) -> torch.Tensor:
    """codebook[nearest code] · ŝ for every real entry of ``flat``: the fake-quantized matrix, flattened."""
    _threads()
    out = np.empty(flat.numel(), dtype=np.float32)
    _fake_quantize(_np(flat), flat.numel(), block0, _np(scales), *_search_table(mids), _np(book), out)
    return torch.from_numpy(out)


def _group(bits: int) -> tuple[int, int]:
    """(codes per packing group, bytes per group): the dense layout of :mod:`.packing`."""
    group = 8 // int(np.gcd(8, bits))
    return group, group * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`.packing.pack` for a 1-D uint8 tensor, any width 1..8, without int64 intermediates."""
    group, group_bytes = _group(bits)
    _threads()
    out = np.empty(-(-codes.numel() // group) * group_bytes, dtype=np.uint8)
    _pack(_np(codes), bits, group, group_bytes, out)
    return torch.from_numpy(out)


def dequantize_packed(
    packed: torch.Tensor, bits: int, block0: int, numel: int, scale_codes: torch.Tensor, scale_bits: int,
    block1: int, step: torch.Tensor, offset: torch.Tensor, book: torch.Tensor, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode in one pass: packed codes and packed scale codes straight to codebook value · ŝ, the first ``numel``
    entries, into ``out`` (a contiguous float32 CPU tensor of at least ``numel`` entries, e.g. a reused scratch
    buffer) or a new tensor. ``step`` = t̂ / M0 per second-level block and ``offset`` = o (float32): the
    reference's own intermediate values, so ŝ comes out bit-identical without materialising one per block."""
    group, group_bytes = _group(bits)
    scale_group, scale_group_bytes = _group(scale_bits)
    n_blocks = -(-numel // (block0 * block1)) * block1
    sc = (_np(scale_codes), scale_bits, scale_group, scale_group_bytes, block1, _np(step.float()),
          np.float32(offset.item()))
    _threads()
    # numpy's large buffers are huge-page backed: a fresh output faults in 2 MiB pages, not 4 KiB ones
    target = torch.from_numpy(np.empty(numel, dtype=np.float32)) if out is None else out.view(-1)[:numel]
    if bits == 8:
        _decode_8bit(_np(packed), block0, numel, n_blocks, sc, _np(book), target.numpy())
    elif group_bytes == 1:
        _BYTE_DECODERS[group](_np(packed), block0, numel, n_blocks, sc, _byte_table(book, bits), target.numpy())
    else:
        _dequantize_words(_np(packed), bits, group, group_bytes, block0, numel, n_blocks, sc, _np(book),
                          target.numpy())
    return target


def _byte_table(book: torch.Tensor, bits: int) -> np.ndarray:
    """The flattened (256, 8/k) byte -> values table of a codebook, cached per codebook."""
    return _byte_table_cached(_np(book).tobytes(), bits)


@lru_cache(maxsize=64)
def _byte_table_cached(book: bytes, bits: int) -> np.ndarray:
    values = torch.from_numpy(np.frombuffer(book, dtype=np.float32).copy())
    return packing.byte_lookup_table(values, bits).reshape(-1).numpy()
