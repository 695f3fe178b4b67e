import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.quant import packing


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packing.packed_nbytes(n, bits)
    assert torch.equal(packing.unpack(packed, bits, n), codes)


def test_dense_sizes():
    # 3-bit: 8 codes in 3 bytes; 4-bit: 2 per byte; 2-bit: 4 per byte
    assert packing.packed_nbytes(16, 3) == 6
    assert packing.packed_nbytes(16, 4) == 8
    assert packing.packed_nbytes(16, 2) == 4
    assert packing.packed_nbytes(16, 8) == 16


def test_msb_first_layout_matches_bitsandbytes_nibbles():
    packed = packing.pack(torch.tensor([0xA, 0x3], dtype=torch.uint8), 4)
    assert packed.tolist() == [0xA3]


def test_byte_lookup_table_decodes_like_unpack():
    values = torch.linspace(-1, 1, 4)
    table = packing.byte_lookup_table(values, 2)
    codes = torch.randint(0, 4, (64,)).to(torch.uint8)
    packed = packing.pack(codes, 2)
    assert torch.equal(table[packed.long()].reshape(-1), values[codes.long()])
    assert packing.byte_lookup_table(values, 3) is None


def test_bad_input():
    with pytest.raises(ValueError, match="1..8"):
        packing.pack(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="uint8"):
        packing.pack(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        packing.unpack(torch.zeros(3, dtype=torch.uint8), 4, 8)
