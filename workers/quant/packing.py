"""Bit packing of k-bit codes into bytes (most significant bits first, like bitsandbytes' 4-bit layout).

Codes are packed in groups of g = 8/gcd(8, k) codes into k·g/8 bytes, so every k in 1..8 packs densely: 2-bit codes
four to a byte, 3-bit codes eight to three bytes. A trailing partial group is zero-padded; callers that pad their
matrices to a multiple of 16 entries never produce one.
"""

from __future__ import annotations

import math

import torch


def group_size(bits: int) -> int:
    """Codes per packing group."""
    return 8 // math.gcd(8, bits)


def packed_nbytes(n_codes: int, bits: int) -> int:
    g = group_size(bits)
    return -(-n_codes // g) * g * bits // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1..8-bit codes, got {bits} bits")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of ``bits``-bit codes into a 1-D uint8 byte tensor."""
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"pack expects a 1-D uint8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    if bits == 8:
        return codes.clone()
    g = group_size(bits)
    if codes.numel() % g:
        codes = torch.cat([codes, codes.new_zeros(g - codes.numel() % g)])
    if 8 % bits == 0:  # whole codes per byte: shift-or in uint8
        cols = codes.view(-1, g)
        out = cols[:, 0] << (bits * (g - 1))
        for j in range(1, g):
            out |= cols[:, j] << (bits * (g - 1 - j))
        return out
    # k ∤ 8: join each group into one int64 word (≤ 56 bits), then cut it into bytes
    nb = bits * g // 8
    shifts = torch.arange(g - 1, -1, -1, device=codes.device, dtype=torch.int64) * bits
    words = (codes.view(-1, g).to(torch.int64) << shifts).sum(dim=1)
    byte_shifts = torch.arange(nb - 1, -1, -1, device=codes.device, dtype=torch.int64) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n_codes`` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"unpack expects a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {n_codes} {bits}-bit codes")
    if bits == 8:
        return packed[:n_codes].clone()
    g = group_size(bits)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(g - 1, -1, -1, device=packed.device, dtype=torch.uint8) * bits
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:n_codes]
    nb = bits * g // 8
    byte_shifts = torch.arange(nb - 1, -1, -1, device=packed.device, dtype=torch.int64) * 8
    words = (packed.view(-1, nb).to(torch.int64) << byte_shifts).sum(dim=1)
    shifts = torch.arange(g - 1, -1, -1, device=packed.device, dtype=torch.int64) * bits
    return ((words.unsqueeze(1) >> shifts) & mask).to(torch.uint8).reshape(-1)[:n_codes]


def byte_lookup_table(values: torch.Tensor, bits: int) -> torch.Tensor | None:
    """For k dividing 8, a (256, 8/k) table mapping a packed byte straight to its decoded values, so decoding is
    one gather per byte instead of unpack-then-gather. None when k does not divide 8."""
    if 8 % bits:
        return None
    all_bytes = torch.arange(256, dtype=torch.uint8, device=values.device)
    return values[unpack(all_bytes, bits, 256 * (8 // bits)).long()].view(256, 8 // bits)
