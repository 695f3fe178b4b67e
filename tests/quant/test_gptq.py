"""GPTQ over the blockwise formats (workers/quant/gptq.py)."""

from __future__ import annotations

import pytest
import torch

from search.space import QuantSetting
from workers.quant import blockwise
from workers.quant.gptq import gptq_quantize


pytestmark = pytest.mark.usefixtures("one_thread")


def weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    e = (w.double() - q.double())
    return float(torch.einsum("ij,jk,ik->", e, h, e))


@pytest.mark.parametrize("code", ["nf2", "nf3", "nf4", "int3"])
def test_gptq_beats_round_to_nearest_on_real_matrices(minilm_calibration, code):
    setting = QuantSetting(code, 8, "fp32", 64, 256)
    for name, (w, h) in minilm_calibration.items():
        rtn = weighted_error(w, blockwise.fake_quantize(w, setting), h)
        gptq = weighted_error(w, blockwise.dequantize(gptq_quantize(w, setting, h, name=name)), h)
        assert gptq < 0.9 * rtn, (name, code, gptq, rtn)


def test_storage_form_is_the_settings_own(minilm_calibration):
    w, h = minilm_calibration["encoder.layer.1.output.dense"]
    setting = QuantSetting("nf3", 4, "bf16", 32, 64)
    packed = gptq_quantize(w, setting, h)
    rtn = blockwise.quantize(w, setting)
    assert packed.nbytes == blockwise.packed_nbytes(w.numel(), setting) == rtn.nbytes
    for part in ("scale_codes", "scale2", "offset"):  # scales fixed up front, as round-to-nearest computes them
        assert torch.equal(packed.tensors()[part], rtn.tensors()[part])
    assert not torch.equal(packed.codes, rtn.codes)
    dense = blockwise.dequantize(packed)
    assert torch.equal(blockwise.dequantize(packed, reference=True), dense)
    # re-encoding the GPTQ weights with the stored scales gives the same codes: every value is on the grid
    again = blockwise._codes(blockwise._flat(dense), blockwise._encode_scales(blockwise._flat(w), setting, "w", None),
                             setting, None)
    assert torch.equal(blockwise.packing.pack(again, setting.code_bits), packed.codes)


def test_a_diagonal_hessian_gives_round_to_nearest_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 50, generator=g) ** 3  # pads, and blocks that span rows
    for setting in (QuantSetting("nf2", 8, "fp32", 64, 256), QuantSetting("int4", 3, "fp16", 16, 16)):
        h = torch.diag(torch.rand(50, generator=g) + 0.1).double()
        assert gptq_quantize(w, setting, h).tensors().keys() == blockwise.quantize(w, setting).tensors().keys()
        for part, t in gptq_quantize(w, setting, h).tensors().items():
            assert torch.equal(t, blockwise.quantize(w, setting, reference=True).tensors()[part]), (setting, part)


def test_the_callers_weight_is_untouched():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(200, 64, generator=g).double()
    before = w.clone()
    gptq_quantize(w, QuantSetting("nf2", 8, "fp32", 64, 256), x.T @ x)
    assert torch.equal(w, before)


@pytest.mark.parametrize("hessian, setting, message", [
    (torch.eye(8), QuantSetting("nf4", 8, "fp32", 64, 256), "must be 64×64"),
    (torch.full((64, 64), float("nan")), QuantSetting("nf4", 8, "fp32", 64, 256), "NaN"),
    (torch.eye(64), QuantSetting("q4_k"), "llama.cpp type"),
])
def test_bad_input(hessian, setting, message):
    with pytest.raises(ValueError, match=message):
        gptq_quantize(torch.randn(4, 64), setting, hessian, name="m")


def test_gptq_on_the_asymmetric_int_grid(minilm_calibration):
    """LoTA-QAF's base (workers/quant/intk.py): same scales and zero-points as round to nearest, lower
    Hessian-weighted error, and a diagonal Hessian gives round to nearest's codes."""
    from workers.quant.intk import quantize_int

    w, h = minilm_calibration["encoder.layer.1.output.dense"]
    for bits in (2, 3, 4):
        rtn, gptq = quantize_int(w, bits, 128), quantize_int(w, bits, 128, hessian=h)
        assert torch.equal(gptq.scale, rtn.scale) and torch.equal(gptq.zero, rtn.zero)
        assert gptq.nbytes == rtn.nbytes
        assert weighted_error(w, gptq.dequantize(), h) < 0.9 * weighted_error(w, rtn.dequantize(), h), bits
    small = torch.randn(8, 100)  # padded to 128 columns
    diagonal = torch.diag(torch.rand(100) + 0.5).double()
    assert torch.equal(quantize_int(small, 3, 64, hessian=diagonal).codes, quantize_int(small, 3, 64).codes)
    with pytest.raises(ValueError, match="must be 100×100"):
        quantize_int(small, 3, 64, hessian=torch.eye(8), name="m")
