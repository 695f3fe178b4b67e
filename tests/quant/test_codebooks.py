import numpy as np
import pytest
import torch

from workers.quant.codebooks import codebook, nearest_code, nf_values

# QLoRA's NF4 table (Dettmers et al. 2023, Appendix E / bitsandbytes), as float32.
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_equals_qlora_table_exactly():
    assert torch.equal(codebook("nf4"), torch.tensor(QLORA_NF4, dtype=torch.float32))


def test_nf4_equals_bitsandbytes_table():
    import bitsandbytes.functional as bnbf

    assert torch.equal(codebook("nf4"), bnbf.get_4bit_type("nf4", device="cpu").float())


def test_nf2_nf3_match_method_md():
    np.testing.assert_allclose(codebook("nf2").numpy(), [-1, 0, 0.3379, 1], atol=1e-4)
    np.testing.assert_allclose(
        codebook("nf3").numpy(), [-1, -0.4786, -0.2171, 0, 0.1609, 0.3379, 0.5626, 1], atol=1e-4
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_nf_shape_and_asymmetry(bits):
    v = nf_values(bits)
    assert len(v) == 2**bits
    assert np.all(np.diff(v) > 0)
    assert v[0] == -1.0 and v[-1] == 1.0
    assert (v == 0).sum() == 1
    assert (v < 0).sum() == 2 ** (bits - 1) - 1 and (v > 0).sum() == 2 ** (bits - 1)


def test_int_family_is_uniform_on_unit_interval():
    v = codebook("int3").numpy()
    np.testing.assert_allclose(np.diff(v), 2 / 7, rtol=1e-6)
    assert v[0] == -1 and v[-1] == 1


@pytest.mark.parametrize("code", ["nf2", "nf4", "nf8", "int4"])
def test_nearest_code_rule(code):
    v = codebook(code)
    mids = (v[1:] + v[:-1]) / 2
    # exactly on a midpoint -> lower code; just above -> upper code; beyond ±1 -> end codes
    assert torch.equal(nearest_code(mids, code), torch.arange(len(mids), dtype=torch.uint8))
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    assert torch.equal(nearest_code(above, code), torch.arange(1, len(v), dtype=torch.uint8))
    ends = nearest_code(torch.tensor([-5.0, 5.0]), code)
    assert ends.tolist() == [0, len(v) - 1]
    # the fast compare path and the binary-search path agree on random data
    x = torch.randn(100_000) * 0.6
    assert torch.equal(nearest_code(x, code), torch.bucketize(x, mids).to(torch.uint8))


def test_bad_code_names():
    for bad in ["nf9", "nf1", "fp4", "int"]:
        with pytest.raises(ValueError, match="unknown code"):
            codebook(bad)
    with pytest.raises(ValueError, match="2..8"):
        nf_values(9)
