"""llama.cpp types through ggml itself: the type table against libggml and gguf-py, quantized bytes against gguf-py's
independent numpy quantizers (legacy types) and dequantized values against its dequantizers (every type), on random
and real matrices; sizes, threads, and the errors a bad matrix gets."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from search.space import GGUF_TYPES, QuantSetting
from workers.quant import formats, ggml

LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]  # the types gguf-py can also quantize


@pytest.fixture(scope="module")
def real_matrix() -> torch.Tensor:
    """A real trained matrix: MiniLM's first FFN input projection (1536 × 384), a multiple of 32 per row."""
    from workers.models import load_model, resolve_model

    model = load_model(resolve_model("minilm"), "base")
    return model.encoder.layer[0].intermediate.dense.weight.detach().clone()


def qtype(code: str) -> GGMLQuantizationType:
    return GGMLQuantizationType(GGUF_TYPES[code][0])


@pytest.mark.parametrize("code", list(GGUF_TYPES))
def test_type_table_is_libggml_and_gguf_py(code):
    kind, block, nbytes = GGUF_TYPES[code]
    lib = ggml._lib()
    assert (lib.ggml_blck_size(kind), lib.ggml_type_size(kind)) == (block, nbytes)
    assert gguf.GGML_QUANT_SIZES[qtype(code)] == (block, nbytes)
    assert ggml.row_size(code, 4 * block) == 4 * nbytes
    assert float(QuantSetting(code).exact_bits) == 8 * nbytes / block == QuantSetting(code).bits_per_param


@pytest.mark.parametrize("code", LEGACY)
def test_legacy_types_match_gguf_py_bytes_on_random_and_real_matrices(code, real_matrix):
    random = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    for w in (random, real_matrix):
        ours = ggml.quantize(w, QuantSetting(code))
        assert np.array_equal(ours.data, quants.quantize(w.numpy(), qtype(code)))


@pytest.mark.parametrize("code", list(GGUF_TYPES))
def test_every_type_dequantizes_as_gguf_py_and_sizes_are_the_formula(code):
    w = torch.randn(48, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    setting = QuantSetting(code)
    stored = ggml.quantize(w, setting)
    assert stored.nbytes == ggml.packed_nbytes(w.numel(), setting) == formats.packed_nbytes(w.numel(), setting)
    assert stored.nbytes * 8 == setting.exact_bits * w.numel()
    ours = formats.dequantize(stored)
    assert np.array_equal(ours.numpy(), quants.dequantize(stored.data, qtype(code)).reshape(48, 1024))
    assert torch.equal(formats.fake_quantize(w, setting), ours)
    rel = ((w - ours).square().sum() / w.square().sum()).item()
    assert 0 < rel < 0.15  # a real quantizer: not the identity, not garbage


def test_k_quants_on_a_real_matrix_lower_error_with_more_bits(real_matrix):
    w = real_matrix.T.contiguous()  # 384 × 1536: rows a multiple of 256
    errors = [(w - formats.fake_quantize(w, QuantSetting(c))).square().sum().item()
              for c in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")]
    assert errors == sorted(errors, reverse=True)


def test_threads_do_not_change_bytes(real_matrix):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ggml.quantize(real_matrix, QuantSetting("q4_k" if real_matrix.shape[1] % 256 == 0 else "iq4_nl"))
        torch.set_num_threads(2)
        two = ggml.quantize(real_matrix, one.setting)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(one.data, two.data)
    assert torch.equal(ggml.dequantize(one), ggml.dequantize(two))


def test_dequantize_into_a_larger_buffer_and_to_another_dtype():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    stored = ggml.quantize(w, QuantSetting("q8_0"))
    buffer = torch.full((1000,), 7.0)
    view = formats.dequantize(stored, out=buffer)
    assert view.shape == (8, 64) and torch.equal(view, ggml.dequantize(stored)) and buffer[600] == 7.0
    half = formats.fake_quantize(w.to(torch.bfloat16), QuantSetting("q8_0"))
    assert half.dtype == torch.bfloat16 and half.shape == w.shape


def test_bad_matrices_get_clear_errors():
    with pytest.raises(ValueError, match="blocks of 256 weights.*rows hold 576"):
        ggml.quantize(torch.zeros(4, 576), QuantSetting("q4_k"))
    with pytest.raises(ValueError, match="2-D"):
        ggml.quantize(torch.zeros(64), QuantSetting("q8_0"))
    bad = torch.zeros(2, 64)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ggml.quantize(bad, QuantSetting("q8_0"), name="m")
