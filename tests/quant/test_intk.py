import pytest
import torch

from workers.quant.intk import dequantize_codes, fake_quantize_int, quantize_int


@pytest.mark.parametrize("group_size", [64, 100])
def test_round_trip_and_range(group_size):
    w = torch.randn(32, 200)
    errors = []
    for bits in (2, 3, 4, 8):
        q = quantize_int(w, bits, group_size)
        codes = q.int_codes()
        assert int(codes.max()) <= 2**bits - 1
        out = q.dequantize()
        assert out.shape == w.shape
        # the reconstruction error of round-to-nearest is at most half a step per entry
        step = q.scale.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
        assert ((out - w).abs() <= step / 2 + 1e-6).all()
        errors.append((out - w).norm().item())
    assert errors == sorted(errors, reverse=True)


def test_formula_and_zero_rows():
    w = torch.randn(8, 64)
    w[3] = 0
    q = quantize_int(w, 4, 32)
    manual = dequantize_codes(q.int_codes(), q.scale, q.zero, 32)
    assert torch.equal(manual, q.dequantize())
    assert torch.equal(q.dequantize()[3], torch.zeros(64))
    assert torch.equal(q.zero, q.zero.round())


def test_bytes_counted_with_padding():
    q = quantize_int(torch.randn(4, 70), 3, 64)  # 70 columns -> 2 groups of 64 -> 128 padded columns
    assert q.padded_cols == 128
    assert q.codes.numel() == 4 * 128 * 3 // 8
    assert q.nbytes == 4 * 128 * 3 // 8 + 2 * (4 * 2 * 4)


def test_dtypes():
    w = torch.randn(8, 64).to(torch.bfloat16)
    assert fake_quantize_int(w, 4, 64).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "weight, bits, group, message",
    [
        (torch.randn(4, 8), 1, 4, "bits"),
        (torch.randn(4, 8), 4, 0, "group_size"),
        (torch.ones(4, 8, dtype=torch.int64), 4, 4, "float"),
        (torch.randn(8), 4, 4, "2-D"),
        (torch.full((2, 4), float("nan")), 4, 4, "NaN"),
    ],
)
def test_bad_input(weight, bits, group, message):
    with pytest.raises(ValueError, match=message):
        quantize_int(weight, bits, group, name="m")
