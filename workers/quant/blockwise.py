"""Blockwise quantization with double-quantized scales (method.md §1.4), as fake-quant and as a packed form.

Both forms come from the same steps (block absmax, scales, nearest codes), and the packed form decodes with the
same arithmetic, so ``dequantize(quantize(W, s))`` is bit-identical to ``fake_quantize(W, s)``. The two passes over
the matrix run as fused kernels (:func:`kernels`: Numba's on the CPU, Triton's on CUDA); ``reference=True`` selects
the pure-torch path, which is also the path on other devices, and the tests hold them bit-identical.

Padding: a matrix of n entries is flattened row-major and zero-padded to a multiple of B0·B1. The offset o is the
minimum absmax over blocks that hold at least one real entry (a padding-only block would otherwise force o = 0),
and padding-only blocks get scale code 0. Packed bytes are exactly

    padded_numel · bits_per_param / 8 + 4        (the +4 is the fp32 offset)

The codebook is implied by the code name and not stored; the shape and dtype are metadata.

Guards the official code lacks (method.md §6 A11): a second-level scale t̂ of 0 (all blocks of a group share the
global minimum absmax) yields scale codes 0 instead of 0/0, and a dequantized scale ŝ of 0 yields zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType
from typing import Iterator, Sequence

import numpy as np
import torch

from search.space import FLOAT_FORMAT_BITS, QuantSetting

from . import fused, packing
from .codebooks import codebook, midpoints, nearest_code

SCALE2_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ACCEPTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OFFSET_BYTES = 4


def padded_numel(numel: int, setting: QuantSetting) -> int:
    """Entries after padding to a whole number of second-level blocks."""
    g = setting.group_size
    return -(-numel // g) * g


def packed_nbytes(numel: int, setting: QuantSetting) -> int:
    """Exact bytes of the packed form of a matrix of ``numel`` entries (see the module docstring)."""
    n = padded_numel(numel, setting)
    return (
        packing.packed_nbytes(n, setting.code_bits)
        + packing.packed_nbytes(n // setting.block0, setting.scale_bits)
        + (n // setting.group_size) * FLOAT_FORMAT_BITS[setting.scale2_format] // 8
        + OFFSET_BYTES
    )


def validate_weight(weight: torch.Tensor, setting: QuantSetting, name: str) -> None:
    """ValueError naming the matrix and the setting for anything the quantizer cannot take."""
    where = f"{name} with setting {setting}"
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{where}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in ACCEPTED_DTYPES:
        raise ValueError(f"{where}: dtype {weight.dtype} is not a float type; accepted: fp32, bf16, fp16, fp64")
    if weight.numel() == 0:
        raise ValueError(f"{where}: the matrix is empty (shape {tuple(weight.shape)})")


def _check_finite(finite: bool, setting: QuantSetting, name: str) -> None:
    """NaN and Inf propagate into their block's absmax (or the fused pass flags them), so checking the (numel/B0)
    absmaxes is enough and saves a full pass over the matrix."""
    if not finite:
        raise ValueError(f"{name} with setting {setting}: the matrix holds NaN or Inf values")


@dataclass(frozen=True)
class _Scales:
    scale_codes: torch.Tensor  # uint8 (padded_numel / B0,)
    scale2: torch.Tensor  # (padded_numel / (B0·B1),) in the b2 format
    offset: torch.Tensor  # fp32 scalar
    scales: torch.Tensor  # fp32 (padded_numel / B0,), dequantized first-level scales ŝ


def _dequantize_scales(
    scale_codes: torch.Tensor, scale2: torch.Tensor, offset: torch.Tensor, setting: QuantSetting
) -> torch.Tensor:
    """ŝ = q_s · t̂ / M0 + o, one fp32 value per first-level block. Shared by encoding and decoding so both see
    the very same floats."""
    step = _scale_step(scale2, setting)
    return (scale_codes.view(-1, setting.block1).float() * step.unsqueeze(1)).reshape(-1) + offset


def _scale_step(scale2: torch.Tensor, setting: QuantSetting) -> torch.Tensor:
    """t̂ / M0 per second-level block: the scale-code step, in float32."""
    return scale2.float() / float(2**setting.scale_bits - 1)


def kernels(device: torch.device, reference: bool = False) -> ModuleType | None:
    """The fused kernels that make the passes over a matrix on ``device``: Numba's (:mod:`.fused`) on the CPU,
    Triton's (:mod:`.fused_triton`, imported on first use) on CUDA. None selects the pure-torch reference path: on
    request (``reference``), on other devices, or where the library is missing. Both kernel modules offer the same
    functions with the same arguments."""
    if reference:
        return None
    if device.type == "cpu":
        return fused if fused.AVAILABLE else None
    if device.type == "cuda":
        from . import fused_triton

        return fused_triton if fused_triton.AVAILABLE else None
    return None


def _flat(weight: torch.Tensor) -> torch.Tensor:
    """The matrix as one contiguous float32 row (a view when it already is one)."""
    return weight.detach().reshape(-1).float().contiguous()


def _padded(flat: torch.Tensor, setting: QuantSetting) -> torch.Tensor:
    n_pad = padded_numel(flat.numel(), setting)
    return flat if n_pad == flat.numel() else torch.cat([flat, flat.new_zeros(n_pad - flat.numel())])


def _absmax(flat: torch.Tensor, setting: QuantSetting, name: str, k: ModuleType | None) -> torch.Tensor:
    """s: the absmax of every first-level block of the zero-padded matrix (first pass over the matrix)."""
    n_blocks = padded_numel(flat.numel(), setting) // setting.block0
    if k is not None:
        absmax, bad = k.block_absmax(flat, setting.block0, n_blocks)
        _check_finite(not bad, setting, name)
        return absmax
    absmax = _padded(flat, setting).view(-1, setting.block0).abs().amax(dim=1)
    _check_finite(bool(torch.isfinite(absmax).all()), setting, name)
    return absmax


def _scales(absmax: torch.Tensor, numel: int, setting: QuantSetting) -> _Scales:
    """Offset, second-level scales and scale codes from the block absmaxes: one value per B0 entries or fewer,
    so this stays in torch and is shared by both paths."""
    n_real_blocks = -(-numel // setting.block0)
    offset = absmax[:n_real_blocks].min()  # o
    shifted = (absmax - offset).clamp_(min=0)  # s' (padding-only blocks clamp to 0)
    scale2 = shifted.view(-1, setting.block1).amax(dim=1).to(SCALE2_DTYPES[setting.scale2_format])  # t̂ in b2
    t_hat = scale2.float()
    m0 = float(2**setting.scale_bits - 1)
    safe_t = torch.where(t_hat > 0, t_hat, torch.ones_like(t_hat))  # t̂ = 0 ⇒ s' = 0 in that group ⇒ code 0
    scale_codes = torch.round(shifted.view(-1, setting.block1) * m0 / safe_t.unsqueeze(1)).clamp_(0, m0)
    scale_codes = scale_codes.to(torch.uint8).reshape(-1)
    scales = _dequantize_scales(scale_codes, scale2, offset, setting)
    return _Scales(scale_codes=scale_codes, scale2=scale2, offset=offset, scales=scales)


def _encode_scales(flat: torch.Tensor, setting: QuantSetting, name: str, k: ModuleType | None) -> _Scales:
    return _scales(_absmax(flat, setting, name, k), flat.numel(), setting)


def _codes(flat: torch.Tensor, sc: _Scales, setting: QuantSetting, k: ModuleType | None) -> torch.Tensor:
    """uint8 nearest-code index of every padded entry under its block's dequantized scale (second pass)."""
    if k is not None:
        return k.encode(flat, setting.block0, sc.scales, midpoints(setting.code))
    safe_scales = torch.where(sc.scales > 0, sc.scales, torch.ones_like(sc.scales))
    blocks = _padded(flat, setting).view(-1, setting.block0)
    return nearest_code(blocks / safe_scales.unsqueeze(1), setting.code).reshape(-1)


def _decode_values(values: torch.Tensor, scales: torch.Tensor, setting: QuantSetting) -> torch.Tensor:
    """Multiply decoded codebook values by their block scale, in place (the same float op in both paths; in place
    because allocating a second output-sized buffer costs as much as the multiply)."""
    return values.view(-1, setting.block0).mul_(scales.unsqueeze(1)).reshape(-1)


def fake_quantize(
    weight: torch.Tensor, setting: QuantSetting, *, name: str = "weight", reference: bool = False
) -> torch.Tensor:
    """The dequantized matrix Ŵ (same shape, dtype and device as ``weight``): what training multiplies with.
    ``reference=True`` forces the pure-torch path the fused kernels are tested against."""
    return next(fake_quantize_each(weight, [setting], name=name, reference=reference))


def fake_quantize_each(
    weight: torch.Tensor, settings: Sequence[QuantSetting], *, name: str = "weight", reference: bool = False
) -> Iterator[torch.Tensor]:
    """:func:`fake_quantize` of ``weight`` under each of ``settings`` in turn. Settings that differ only in their
    code share one scale encoding (it depends on the blocks and scale formats alone), which is most of the work on
    small matrices: the Fisher cost table asks for every setting of the space."""
    for setting in settings:
        validate_weight(weight, setting, name)
    k = kernels(weight.device, reference)
    flat = _flat(weight)
    encoded: dict[tuple, _Scales] = {}
    for setting in settings:
        shared = (setting.block0, setting.block1, setting.scale_bits, setting.scale2_format)
        if shared not in encoded:
            encoded[shared] = _encode_scales(flat, setting, name, k)
        sc = encoded[shared]
        if k is not None:
            out = k.fake_quantize_values(flat, setting.block0, sc.scales, midpoints(setting.code),
                                         codebook(setting.code))
        else:
            values = codebook(setting.code, str(weight.device))[_codes(flat, sc, setting, None).long()]
            out = _decode_values(values, sc.scales, setting)[: weight.numel()]
        yield out.view(weight.shape).to(weight.dtype)


@dataclass(frozen=True)
class PackedWeight:
    """A matrix in storage form: bit-packed b0-bit codes, bit-packed b1-bit scale codes, second-level scales in
    their b2 float format and one fp32 offset. Tensors only, so it serialises to safetensors as is."""

    setting: QuantSetting
    shape: tuple[int, ...]
    dtype: torch.dtype
    codes: torch.Tensor
    scale_codes: torch.Tensor
    scale2: torch.Tensor
    offset: torch.Tensor

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def padded_numel(self) -> int:
        return padded_numel(self.numel, self.setting)

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the four stored tensors."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale_codes, self.scale2, self.offset))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scale_codes": self.scale_codes, "scale2": self.scale2, "offset": self.offset}

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def quantize(
    weight: torch.Tensor, setting: QuantSetting, *, name: str = "weight", reference: bool = False
) -> PackedWeight:
    """Quantize ``weight`` under ``setting`` into its packed storage form (``reference``: the torch path)."""
    validate_weight(weight, setting, name)
    k = kernels(weight.device, reference)
    flat = _flat(weight)
    sc = _encode_scales(flat, setting, name, k)
    codes = _codes(flat, sc, setting, k)
    pack = k.pack if k is not None else packing.pack
    return PackedWeight(
        setting=setting,
        shape=tuple(weight.shape),
        dtype=weight.dtype,
        codes=pack(codes, setting.code_bits),
        scale_codes=packing.pack(sc.scale_codes, setting.scale_bits),
        scale2=sc.scale2,
        offset=sc.offset.reshape(1),
    )


def dequantize(packed: PackedWeight, *, reference: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode a :class:`PackedWeight` back to a dense matrix of its original shape and dtype.

    Fused: one pass from packed bytes to value · scale. Reference: for code widths dividing 8 each packed byte maps
    to its (8/k) values through one table gather; other widths unpack first. Either way the floats equal
    :func:`fake_quantize`'s exactly. ``out``: a contiguous float32 buffer of at least ``numel`` entries on the
    codes' device to decode into (a reused scratch buffer); the result is then a float32 view of it.
    """
    s = packed.setting
    n_pad = packed.padded_numel
    book = codebook(s.code, str(packed.codes.device))
    k = kernels(packed.codes.device, reference)
    if k is not None and s.block0 % packing.group_size(s.code_bits) == 0:
        flat = k.dequantize_packed(packed.codes, s.code_bits, s.block0, packed.numel, packed.scale_codes,
                                   s.scale_bits, s.block1, _scale_step(packed.scale2, s), packed.offset, book, out)
    else:
        scales = block_scales(packed)
        table = packing.byte_lookup_table(book, s.code_bits)
        if table is not None:
            values = _gather_rows(table, packed.codes)
        else:
            values = book[packing.unpack(packed.codes, s.code_bits, n_pad).long()]
        flat = _decode_values(values, scales, s)[: packed.numel]
        if out is not None:
            flat = out.view(-1)[: packed.numel].copy_(flat)
    return flat.view(packed.shape) if out is not None else flat.view(packed.shape).to(packed.dtype)


def code_indices(packed: PackedWeight) -> torch.Tensor:
    """uint8 code index of every padded entry, unpacked (row-major over the zero-padded matrix)."""
    return packing.unpack(packed.codes, packed.setting.code_bits, packed.padded_numel)


def block_scales(packed: PackedWeight) -> torch.Tensor:
    """ŝ: the dequantized fp32 scale of every first-level block, the very floats :func:`dequantize` multiplies by."""
    s = packed.setting
    scale_codes = packing.unpack(packed.scale_codes, s.scale_bits, packed.padded_numel // s.block0)
    return _dequantize_scales(scale_codes, packed.scale2, packed.offset.reshape(()), s)


def with_codes(packed: PackedWeight, codes: torch.Tensor) -> PackedWeight:
    """``packed`` with other code indices (uint8, one per padded entry) and the same scales: same bytes, same
    setting."""
    if codes.numel() != packed.padded_numel:
        raise ValueError(f"{packed.padded_numel} codes expected, got {codes.numel()}")
    return replace(packed, codes=packing.pack(codes.reshape(-1).to(torch.uint8), packed.setting.code_bits))


def grid_steps(packed: PackedWeight) -> torch.Tensor:
    """The spacing of an ``int`` setting's grid in every first-level block, ŝ·2/(2^k − 1): its levels
    −1 + 2i/(2^k − 1) make ŝ·level(i) = step·(i − (2^k − 1)/2), an asymmetric integer grid whose zero-point is fixed
    at (2^k − 1)/2. A zero-point shifted by μ steps is what LoTA-QAF's merge stores (:func:`dequantize_shifted`)."""
    if packed.setting.family != "int":
        raise ValueError(f"{packed.setting.code} is not an integer grid: only int codes have evenly spaced levels")
    return block_scales(packed) * (2.0 / float(2**packed.setting.code_bits - 1))


def shift_values(steps: torch.Tensor, shift: torch.Tensor, setting: QuantSetting) -> torch.Tensor:
    """step·shift per padded entry: ``steps`` one per first-level block, ``shift`` per padded entry (any float
    tensor of padded_numel entries, differentiable)."""
    return (shift.view(-1, setting.block0) * steps.unsqueeze(1)).reshape(-1)


def dequantize_shifted(packed: PackedWeight, mu: torch.Tensor) -> torch.Tensor:
    """An ``int`` matrix whose zero-point is shifted by ``mu`` grid steps per second-level group (B0·B1 entries;
    LoTA-QAF's sub-step remainder): :func:`dequantize` plus step·μ, as fp32 of the original shape."""
    s = packed.setting
    per_entry = mu.float().repeat_interleave(s.group_size)
    if per_entry.numel() != packed.padded_numel:
        raise ValueError(f"one shift per {s.group_size}-entry group expected ({packed.padded_numel // s.group_size}), "
                         f"got {mu.numel()}")
    flat = dequantize(packed).reshape(-1).float()
    return (flat + shift_values(grid_steps(packed), per_entry, s)[: packed.numel]).view(packed.shape)


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` flattened, for a (256, m) float32 table and a uint8 index. On the CPU numpy's ``take``
    indexes with the uint8 bytes directly (no int32 copy of the index), treating each table row as one opaque
    element, and numpy's large buffers are huge-page backed: measured 1.5-2x faster than ``index_select`` here."""
    if index.device.type != "cpu":
        return torch.index_select(table, 0, index.to(torch.int32)).reshape(-1)
    rows = np.ascontiguousarray(table.numpy()).view(np.dtype((np.void, table.shape[1] * 4))).reshape(-1)
    return torch.from_numpy(np.take(rows, index.numpy()).view(np.float32))


def quantize_absmax(weight: torch.Tensor, code: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-level blockwise absmax quantization (no double quantization): (uint8 code indices, fp32 absmax per
    block). This is what bitsandbytes' ``quantize_4bit(compress_statistics=False)`` computes, and the test suite
    cross-checks the two. ``weight.numel()`` must be a multiple of ``block_size``."""
    if weight.numel() % block_size:
        raise ValueError(f"numel {weight.numel()} is not a multiple of block size {block_size}")
    blocks = weight.detach().reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"weight with {code} block {block_size}: the matrix holds NaN or Inf values")
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return nearest_code(blocks / safe.unsqueeze(1), code).reshape(-1), absmax
