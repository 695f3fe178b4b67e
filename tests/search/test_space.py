import numpy as np
import pytest

from search.space import DEFAULT_SPACE_FILE, QuantSetting, SearchSpace, average_bits, bits_per_param

SPACE = SearchSpace.default()


def test_paper_space_facts():
    assert SPACE.cardinalities == (4, 4, 3, 3, 3)
    assert SPACE.n_settings == 432 == len(SPACE.settings)
    assert len(np.unique(SPACE.setting_bits.round(12))) == 184
    assert SPACE.bits_range == pytest.approx((2.0322265625, 8.625))


@pytest.mark.parametrize(
    "setting, bits",
    [
        (("nf4", 8, "fp32", 64, 256), 4.126953125),  # QLoRA NF4 ≈ 4.1270
        (("nf3", 8, "fp32", 64, 256), 3.126953125),
        (("nf2", 2, "bf16", 64, 256), 2.0322265625),
        (("nf8", 8, "fp32", 16, 16), 8.625),
    ],
)
def test_bits_per_param(setting, bits):
    assert bits_per_param(QuantSetting(*setting)) == pytest.approx(bits, abs=1e-12)


def test_encode_decode_round_trip_and_flat_index():
    rng = np.random.default_rng(0)
    x = rng.integers(0, SPACE.upper_bounds(10) + 1)
    settings = SPACE.decode(x)
    assert np.array_equal(SPACE.encode(settings), x)
    for s in settings:
        assert SPACE.settings[SPACE.flat_index(s)] == s


def test_average_bits_is_parameter_weighted():
    a, b = QuantSetting("nf2", 2, "bf16", 64, 256), QuantSetting("nf8", 8, "fp32", 16, 16)
    assert average_bits([a, b], [3, 1]) == pytest.approx((3 * a.bits_per_param + b.bits_per_param) / 4)
    x = SPACE.encode([a, b])
    assert SPACE.encoded_average_bits(x, [3, 1]) == pytest.approx(average_bits([a, b], [3, 1]))
    batch = np.stack([x, SPACE.encode([b, a])])
    np.testing.assert_allclose(
        SPACE.encoded_average_bits(batch, [3, 1]), [average_bits([a, b], [3, 1]), average_bits([b, a], [3, 1])]
    )


def test_restrict_from_yaml(tmp_path):
    import yaml

    conf = SPACE.to_dict()
    conf["code"] = ["nf3", "nf4"]
    conf["block1"] = [256]
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(conf))
    small = SearchSpace.from_yaml(path)
    assert small.n_settings == 2 * 4 * 3 * 3 * 1
    assert small.bits_range[0] > 3


def test_shipped_extended_and_integer_spaces():
    ext = SearchSpace.from_yaml(DEFAULT_SPACE_FILE.parent / "extended.yaml")
    assert ext.code == ("nf2", "nf3", "nf4", "nf5", "nf6", "nf8") and ext.n_settings == 648
    integer = SearchSpace.from_yaml(DEFAULT_SPACE_FILE.parent / "integer.yaml")
    assert {s.family for s in integer.settings} == {"int"}
    assert integer.bits_range == SPACE.bits_range


def test_bare_integers_mean_normalfloat():
    space = SearchSpace.from_dict({**SPACE.to_dict(), "code": [2, 4]})
    assert space.code == ("nf2", "nf4")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"code": ["nf4", "fp4"]}, "unknown code"),
        ({"scale_bits": [0]}, "scale_bits"),
        ({"scale2_format": ["fp8"]}, "scale2_format"),
        ({"block0": [48]}, "power of two"),
        ({"block1": []}, "no values"),
        ({"code": ["nf4", "nf4"]}, "repeats"),
        ({"colour": ["red"]}, "unknown space field"),
    ],
)
def test_bad_space_definitions(change, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace.from_dict({**SPACE.to_dict(), **change})


def test_setting_outside_space_names_matrix_and_field():
    small = SearchSpace.from_dict({**SPACE.to_dict(), "code": ["nf3", "nf4"]})
    with pytest.raises(ValueError, match=r"layers\.0\.attn.*code \(b0\) = 'nf8'"):
        small.validate_setting(QuantSetting("nf8", 8, "fp32", 64, 256), matrix="layers.0.attn")


def test_decode_rejects_bad_vectors():
    with pytest.raises(ValueError, match="length 5N"):
        SPACE.decode(np.zeros(7, dtype=int))
    with pytest.raises(ValueError, match="out of range"):
        SPACE.decode(np.array([4, 0, 0, 0, 0]))


def test_missing_file():
    with pytest.raises(ValueError, match="does not exist"):
        SearchSpace.from_yaml("/nonexistent/space.yaml")


def test_shipped_gguf_spaces_are_llama_cpp_types_with_exact_costs():
    from fractions import Fraction

    from search.allocation import exact_setting_bits

    root = DEFAULT_SPACE_FILE.parent
    full = SearchSpace.from_yaml(root / "gguf.yaml")
    assert full.is_gguf and full.cardinalities == (11, 1, 1, 1, 1)
    assert list(full.setting_bits) == sorted(full.setting_bits) and full.bits_range == (2.625, 8.5)
    k = SearchSpace.from_yaml(root / "gguf-k.yaml")
    assert exact_setting_bits(k)[:2] == [Fraction(21, 8), Fraction(55, 16)]
    assert k.to_dict() == {"code": ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]}
    x = k.encode([QuantSetting("q2_k"), QuantSetting("q8_0")])
    assert k.decode(x) == [QuantSetting("q2_k"), QuantSetting("q8_0")]
    assert k.encoded_average_bits(x, [100, 300]) == pytest.approx((2.625 * 100 + 8.5 * 300) / 400)
    assert str(QuantSetting("q4_k")) == "q4_k" and QuantSetting("q4_k").fields() == {"code": "q4_k"}
    assert not SearchSpace.default().is_gguf


def test_each_matrix_takes_the_types_whose_blocks_fit_its_rows():
    full = SearchSpace.from_yaml(DEFAULT_SPACE_FILE.parent / "gguf.yaml")
    allowed = full.allowed([576, 1536, 4096])  # SmolLM2's q/k/v/o/gate/up rows, its down rows, a 7B model's rows
    blocks = np.array([s.row_multiple for s in full.settings])
    assert allowed[0].tolist() == (blocks == 32).tolist() and allowed[1].all() and allowed[2].all()
    assert SearchSpace.default().allowed([7, 576]).all()  # blockwise codes pad: every setting fits every matrix
    # SmolLM2's per-layer mix: 75% of the weights in 576-wide rows, 25% (down) in 1536-wide rows.
    numels = [576 * 576, 192 * 576, 192 * 576, 576 * 576, 1536 * 576, 1536 * 576, 576 * 1536]
    lo, hi = full.achievable_bits_range(numels, full.allowed([576] * 6 + [1536]))
    assert lo == pytest.approx(0.75 * 4.5 + 0.25 * 2.625) and hi == 8.5
    assert full.achievable_bits_range(numels) == full.bits_range
    with pytest.raises(ValueError, match="positive integers"):
        full.allowed([576, 0])


@pytest.mark.parametrize("build, message", [
    (lambda: QuantSetting("q4_k", 4, "fp16", 64, 64), "fixes its own blocks and scales"),
    (lambda: QuantSetting("nf4"), "scale_bits"),
    (lambda: QuantSetting("q7_k"), "llama.cpp type"),
    (lambda: SearchSpace(("q4_0", "nf4"), (0,), ("none",), (1,), (1,)), "not both"),
])
def test_gguf_settings_refuse_blockwise_fields_and_mixing(build, message):
    with pytest.raises(ValueError, match=message):
        build()
