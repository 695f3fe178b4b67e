import pytest
import torch


from search.space import QuantSetting, SearchSpace
from workers.quant import blockwise as bw

SPACE = SearchSpace.default()
QLORA = QuantSetting("nf4", 8, "fp32", 64, 256)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU path runs on GPU machines


def test_every_setting_packs_to_the_storage_formula_and_round_trips_exactly():
    """All 432 settings on a 256x1024 matrix: bytes = numel·bits_per_param/8 + 4-byte offset (256·1024 is a
    multiple of every B0·B1, so there is no padding), and the packed form decodes bit-identically to fake-quant."""
    w = torch.randn(256, 1024)
    assert len(SPACE.settings) == 432
    for s in SPACE.settings:
        packed = bw.quantize(w, s)
        expected = w.numel() * s.bits_per_param / 8 + bw.OFFSET_BYTES
        assert packed.nbytes == expected == bw.packed_nbytes(w.numel(), s), s
        assert torch.equal(packed.dequantize(), bw.fake_quantize(w, s)), s


@pytest.mark.parametrize("reference", [False, True])
def test_each_setting_in_one_pass_equals_one_call_per_setting(reference):
    """fake_quantize_each shares one scale encoding among settings that differ only in their code: the result
    must still be bit-identical to a call per setting, in space order (here with padding: 37·41 entries)."""
    w = torch.randn(37, 41)
    together = list(bw.fake_quantize_each(w, SPACE.settings, reference=reference))
    assert len(together) == len(SPACE.settings)
    for s, q in zip(SPACE.settings, together):
        assert torch.equal(q, bw.fake_quantize(w, s, reference=reference)), s


@pytest.mark.parametrize("shape", [(192, 576), (7, 33), (1, 5)])
def test_padding_is_counted_in_bytes(shape):
    w = torch.randn(*shape)
    s = QuantSetting("nf3", 4, "bf16", 64, 256)  # B0·B1 = 16384 > numel
    packed = bw.quantize(w, s)
    n_pad = bw.padded_numel(w.numel(), s)
    assert n_pad % s.group_size == 0 and n_pad >= w.numel()
    assert packed.nbytes == n_pad * s.bits_per_param / 8 + bw.OFFSET_BYTES
    out = packed.dequantize()
    assert out.shape == w.shape
    assert torch.equal(out, bw.fake_quantize(w, s))
    # padding must not drag the offset to zero: the offset is the smallest absmax over real blocks
    absmax = w.reshape(-1).abs()
    assert packed.offset.item() > 0 or absmax.max().item() == 0


def test_error_falls_as_code_bits_rise():
    w = torch.randn(256, 1024)
    for rest in [(8, "fp32", 64, 256), (4, "bf16", 32, 64), (2, "fp16", 16, 16)]:
        errors = [(bw.fake_quantize(w, QuantSetting(c, *rest)) - w).norm().item() for c in SPACE.code]
        assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1] * 10, (rest, errors)


def test_follows_method_md_step_by_step():
    """Re-derive the double quantization of §1.4 with plain loops-free arithmetic and compare."""
    w = torch.randn(64, 256)
    s = QuantSetting("nf3", 3, "bf16", 16, 16)
    blocks = w.reshape(-1, 16, 16)  # G × B1 × B0
    absmax = blocks.abs().amax(dim=2)
    o = absmax.min()
    t_hat = (absmax - o).amax(dim=1).to(torch.bfloat16).float()
    qs = torch.round((absmax - o) * 7 / t_hat.unsqueeze(1)).clamp(0, 7)
    s_hat = qs * (t_hat / 7).unsqueeze(1) + o
    from workers.quant.codebooks import codebook, nearest_code

    codes = nearest_code(blocks / s_hat.unsqueeze(2), "nf3")
    expected = codebook("nf3")[codes.long()] * s_hat.unsqueeze(2)
    torch.testing.assert_close(bw.fake_quantize(w, s), expected.reshape(w.shape), rtol=0, atol=1e-6)


def test_degenerate_scales_are_guarded():
    # every block has the same absmax: s' = 0 everywhere and t̂ = 0 -> no 0/0
    w = torch.ones(32, 64)
    w[:, ::2] = -1
    out = bw.fake_quantize(w, QLORA)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, w)
    # an all-zero matrix stays zero
    z = torch.zeros(16, 64)
    assert torch.equal(bw.quantize(z, QLORA).dequantize(), z)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_devices(device, dtype):
    w = torch.randn(128, 256, device=device).to(dtype)
    for s in [QLORA, QuantSetting("nf3", 4, "fp16", 32, 64), QuantSetting("nf2", 2, "bf16", 16, 16)]:
        fake = bw.fake_quantize(w, s)
        packed = bw.quantize(w, s)
        assert fake.dtype == dtype and fake.device.type == device
        assert packed.codes.device.type == device
        assert torch.equal(packed.dequantize(), fake)
        # the result depends only on the fp32 values of the input
        assert torch.equal(fake, bw.fake_quantize(w.float(), s).to(dtype))


@pytest.mark.parametrize(
    "weight, message",
    [
        (torch.tensor([[1.0, float("nan")]] * 8), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]] * 8), "NaN or Inf"),
        (torch.ones(4, 4, dtype=torch.int32), "not a float type"),
        (torch.empty(0, 16), "empty"),
    ],
)
def test_bad_weights_name_matrix_and_setting(weight, message):
    for fn in (bw.quantize, bw.fake_quantize):
        with pytest.raises(ValueError, match=message) as err:
            fn(weight, QLORA, name="layers.3.mlp.up_proj")
        assert "layers.3.mlp.up_proj" in str(err.value) and "nf4" in str(err.value)


def test_packed_tensors_serialise_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    packed = bw.quantize(torch.randn(64, 64), QuantSetting("nf3", 4, "bf16", 32, 16))
    save_file(packed.tensors(), tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    restored = bw.PackedWeight(packed.setting, packed.shape, packed.dtype, **loaded)
    assert torch.equal(restored.dequantize(), packed.dequantize())
