"""Fused GPU kernels for the blockwise codebook quantizer, written in Triton: the CUDA twin of :mod:`.fused`.

Why Triton: on a GPU the pure-torch path launches one kernel per codebook threshold (or a bucketize) and widens
codes to int64 to gather, and the Numba kernels of :mod:`.fused` only run on the CPU. Triton compiles Python
kernels for the GPU at run time with its own bundled compiler (it ships with PyTorch's CUDA wheels, so a GPU
machine needs nothing more), and it has an interpreter (``TRITON_INTERPRET=1``) that runs the same kernels on the
CPU with numpy: the test suite holds these kernels bit-identical to the torch reference on machines without a GPU.

The kernels, each one pass over memory:

- :func:`block_absmax`: absmax and a NaN/Inf flag per first-level block;
- :func:`encode` / :func:`fake_quantize_values`: x / ŝ, then the nearest code as a branch-free binary search over
  the thresholds padded with +inf to a power of two (log2 of the codebook size loads, which sit in L1), written as
  uint8 codes, or directly as code value · ŝ;
- :func:`pack`: uint8 codes into the dense layout of :mod:`.packing` (k·g/8 bytes per group of g codes);
- :func:`dequantize_packed`: packed codes and packed scale codes straight to code value · ŝ, any width 1..8.

Bit-identical to the reference (checked in the interpreter; written so that it holds when compiled for a GPU too,
which is not yet measured): the division is ``div_rn`` (IEEE round to nearest;
Triton's plain ``/`` on float32 may lower to an approximate division), the only other float operation is one
multiply, so no fused multiply-add can change a rounding. Decoding computes ŝ = q_s · (t̂ / M0) + o in the
kernel from the packed scale codes, a multiply and an add, launched with ``enable_fp_fusion=False`` so that they
round separately as the reference's torch operations do. A code is the number of thresholds strictly below its value,
as ``torch.bucketize(right=False)`` computes it.

Fallback: without Triton, :data:`AVAILABLE` is False and CUDA tensors take the torch path of :mod:`.blockwise`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from . import packing

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    AVAILABLE = False
else:
    AVAILABLE = True

_BLOCK = 1024
"""Entries per program instance of the element-wise kernels."""

_ROWS = 16
"""First-level blocks per program instance of the absmax kernel."""


if AVAILABLE:

    @triton.jit
    def _absmax_kernel(x_ptr, n, absmax_ptr, bad_ptr, n_blocks, B0: tl.constexpr, ROWS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = row[:, None] * B0 + tl.arange(0, B0)[None, :]
        a = tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0))
        nonfinite = tl.sum((~(a <= 3.4028234663852886e38)).to(tl.int32), axis=1)  # NaN and ±Inf
        keep = row < n_blocks
        tl.store(absmax_ptr + row, tl.max(a, axis=1), mask=keep)
        tl.store(bad_ptr + row, (nonfinite > 0).to(tl.int8), mask=keep)

    @triton.jit
    def _nearest(y, mids_ptr, LOG: tl.constexpr):
        """Number of thresholds strictly below y; ``mids`` holds 2^LOG entries, +inf padded."""
        c = tl.zeros(y.shape, dtype=tl.int32)
        for i in tl.static_range(LOG):
            step: tl.constexpr = 1 << (LOG - 1 - i)
            c += tl.where(tl.load(mids_ptr + c + (step - 1)) < y, step, 0)
        return c

    @triton.jit
    def _encode_kernel(x_ptr, n, total, scales_ptr, mids_ptr, codes_ptr, B0: tl.constexpr, LOG: tl.constexpr,
                       BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)  # padding entries are zeros
        s = tl.load(scales_ptr + offs // B0, mask=offs < total, other=1.0)
        y = tl.div_rn(x, tl.where(s > 0.0, s, 1.0))
        tl.store(codes_ptr + offs, _nearest(y, mids_ptr, LOG).to(tl.uint8), mask=offs < total)

    @triton.jit
    def _fake_quantize_kernel(x_ptr, n, scales_ptr, mids_ptr, book_ptr, out_ptr, B0: tl.constexpr,
                              LOG: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        s = tl.load(scales_ptr + offs // B0, mask=inside, other=1.0)
        code = _nearest(tl.div_rn(x, tl.where(s > 0.0, s, 1.0)), mids_ptr, LOG)
        tl.store(out_ptr + offs, tl.load(book_ptr + code) * s, mask=inside)

    @triton.jit
    def _pack_kernel(codes_ptr, n, out_ptr, n_groups, BITS: tl.constexpr, GROUP: tl.constexpr,
                     GROUP_BYTES: tl.constexpr, BLOCK: tl.constexpr):
        g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        word = tl.zeros([BLOCK], dtype=tl.uint64)
        for j in tl.static_range(GROUP):  # first code in the most significant bits, as packing.pack
            i = g * GROUP + j
            word = (word << BITS) | tl.load(codes_ptr + i, mask=i < n, other=0).to(tl.uint64)
        for k in tl.static_range(GROUP_BYTES):
            byte = (word >> (8 * (GROUP_BYTES - 1 - k))) & 0xFF
            tl.store(out_ptr + g * GROUP_BYTES + k, byte.to(tl.uint8), mask=g < n_groups)

    @triton.jit
    def _unpack(packed_ptr, index, mask, BITS: tl.constexpr, GROUP: tl.constexpr, GROUP_BYTES: tl.constexpr):
        """The code at ``index`` of a dense packing (:mod:`.packing`): its group's bytes joined into one word, cut."""
        group = index // GROUP
        word = tl.zeros(index.shape, dtype=tl.uint64)
        for k in tl.static_range(GROUP_BYTES):
            word = (word << 8) | tl.load(packed_ptr + group * GROUP_BYTES + k, mask=mask, other=0).to(tl.uint64)
        shift = (BITS * (GROUP - 1 - index % GROUP)).to(tl.uint64)
        return ((word >> shift) & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def _decode_kernel(packed_ptr, n, scale_codes_ptr, step_ptr, offset, book_ptr, out_ptr, B0: tl.constexpr,
                       B1: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, GROUP_BYTES: tl.constexpr,
                       SCALE_BITS: tl.constexpr, SCALE_GROUP: tl.constexpr, SCALE_GROUP_BYTES: tl.constexpr,
                       BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        code = _unpack(packed_ptr, offs, inside, BITS, GROUP, GROUP_BYTES)
        block = offs // B0  # ŝ = q_s · (t̂ / M0) + o, the reference's two float32 operations (launched unfused)
        q = _unpack(scale_codes_ptr, block, inside, SCALE_BITS, SCALE_GROUP, SCALE_GROUP_BYTES)
        s = q.to(tl.float32) * tl.load(step_ptr + block // B1, mask=inside, other=0.0) + offset
        tl.store(out_ptr + offs, tl.load(book_ptr + code) * s, mask=inside)


def _grid(n: int, per: int) -> tuple[int]:
    return (max(1, -(-n // per)),)


def _search_log(n_thresholds: int) -> int:
    """log2 of the smallest power of two above the thresholds: the binary search's number of loads."""
    return max(1, n_thresholds.bit_length())


def _padded_mids(mids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """Thresholds padded with +inf to 2^LOG entries, on ``device``, and LOG."""
    return _padded_mids_cached(mids.detach().float().cpu().numpy().tobytes(), str(device))


@lru_cache(maxsize=64)
def _padded_mids_cached(mids: bytes, device: str) -> tuple[torch.Tensor, int]:
    values = torch.frombuffer(bytearray(mids), dtype=torch.float32)
    log = _search_log(values.numel())
    padded = torch.full((1 << log,), float("inf"), dtype=torch.float32)
    padded[: values.numel()] = values
    return padded.to(device), log


def _book(book: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The codebook on ``device``, copied there once per codebook and device."""
    return book if book.device == device else _book_cached(book.detach().float().cpu().numpy().tobytes(), str(device))


@lru_cache(maxsize=64)
def _book_cached(book: bytes, device: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(book), dtype=torch.float32).to(device)


def block_absmax(flat: torch.Tensor, block0: int, n_blocks: int) -> tuple[torch.Tensor, bool]:
    """(absmax of each of ``n_blocks`` blocks of ``block0`` entries, whether any entry is NaN/Inf). Entries past
    ``flat``'s end count as zero padding. ``flat`` is a 1-D contiguous float32 tensor."""
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    bad = torch.empty(n_blocks, dtype=torch.int8, device=flat.device)
    _absmax_kernel[_grid(n_blocks, _ROWS)](flat, flat.numel(), absmax, bad, n_blocks, B0=block0, ROWS=_ROWS)
    return absmax, bool(bad.any())


def encode(flat: torch.Tensor, block0: int, scales: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """uint8 code of every entry (padding included, as zeros) for dequantized block scales ``scales``."""
    total = scales.numel() * block0
    codes = torch.empty(total, dtype=torch.uint8, device=flat.device)
    padded, log = _padded_mids(mids, flat.device)
    _encode_kernel[_grid(total, _BLOCK)](flat, flat.numel(), total, scales, padded, codes, B0=block0, LOG=log,
                                         BLOCK=_BLOCK)
    return codes


def fake_quantize_values(
    flat: torch.Tensor, block0: int, scales: torch.Tensor, mids: torch.Tensor, book: torch.Tensor
) -> torch.Tensor:
    """codebook[nearest code] · ŝ for every real entry of ``flat``: the fake-quantized matrix, flattened."""
    out = torch.empty_like(flat)
    padded, log = _padded_mids(mids, flat.device)
    _fake_quantize_kernel[_grid(flat.numel(), _BLOCK)](flat, flat.numel(), scales, padded,
                                                       _book(book, flat.device), out, B0=block0, LOG=log, BLOCK=_BLOCK)
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`.packing.pack` for a 1-D uint8 tensor, any width 1..8."""
    group = packing.group_size(bits)
    group_bytes = group * bits // 8
    n_groups = -(-codes.numel() // group)
    out = torch.empty(n_groups * group_bytes, dtype=torch.uint8, device=codes.device)
    _pack_kernel[_grid(n_groups, _BLOCK)](codes, codes.numel(), out, n_groups, BITS=bits, GROUP=group,
                                          GROUP_BYTES=group_bytes, BLOCK=_BLOCK)
    return out


def dequantize_packed(
    packed: torch.Tensor, bits: int, block0: int, numel: int, scale_codes: torch.Tensor, scale_bits: int,
    block1: int, step: torch.Tensor, offset: torch.Tensor, book: torch.Tensor, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode in one pass: packed codes and packed scale codes straight to codebook value · ŝ, the first ``numel``
    entries, into ``out`` (a contiguous float32 tensor of at least ``numel`` entries on the codes' device, e.g. a
    reused scratch buffer) or a new tensor. ``step`` = t̂ / M0 per second-level block and ``offset`` = o (float32),
    as :func:`.fused.dequantize_packed` takes them."""
    group, scale_group = packing.group_size(bits), packing.group_size(scale_bits)
    device = packed.device
    target = torch.empty(numel, dtype=torch.float32, device=device) if out is None else out.view(-1)[:numel]
    _decode_kernel[_grid(numel, _BLOCK)](
        packed, numel, scale_codes, step.to(device=device, dtype=torch.float32), float(offset.item()),
        _book(book, device), target, B0=block0, B1=block1, BITS=bits, GROUP=group, GROUP_BYTES=group * bits // 8,
        SCALE_BITS=scale_bits, SCALE_GROUP=scale_group, SCALE_GROUP_BYTES=scale_group * scale_bits // 8,
        BLOCK=_BLOCK, enable_fp_fusion=False,
    )
    return target
