"""The Numba kernels (workers/quant/fused.py) against the pure-torch reference path: bit-identical codes, scales,
packed bytes and decoded floats for every setting of every shipped blockwise space, on random and real matrices
(llama.cpp types are ggml's: test_ggml.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from search.space import QuantSetting, SearchSpace
from workers.quant import blockwise as bw
from workers.quant import fused, packing
from workers.quant.codebooks import codebook, midpoints

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")

SPACES = Path(__file__).resolve().parents[2] / "conf" / "space"
ALL_SETTINGS = sorted(
    {s for f in sorted(SPACES.glob("*.yaml")) for s in SearchSpace.from_yaml(f).settings if s.family != "gguf"},
    key=lambda s: s.as_tuple()
)
QLORA = QuantSetting("nf4", 8, "fp32", 64, 256)


def assert_same(weight: torch.Tensor, setting: QuantSetting) -> None:
    """Fused and reference agree on everything: fake-quant floats, all four packed tensors, both decoders."""
    fake = bw.fake_quantize(weight, setting)
    reference = bw.fake_quantize(weight, setting, reference=True)
    assert torch.equal(fake, reference), setting
    packed = bw.quantize(weight, setting)
    packed_ref = bw.quantize(weight, setting, reference=True)
    for name, tensor in packed.tensors().items():
        assert torch.equal(tensor, packed_ref.tensors()[name]), (setting, name)
    assert torch.equal(bw.dequantize(packed), reference), setting
    assert torch.equal(bw.dequantize(packed, reference=True), reference), setting


def test_every_setting_of_every_space_on_a_random_matrix():
    """All settings of default, extended and integer spaces; 37x50 pads (numel is no multiple of any B0·B1) and a
    heavy-tailed matrix puts entries beyond a block's dequantized scale (x/ŝ > 1)."""
    assert len(ALL_SETTINGS) == 6 * 4 * 3 * 3 * 3 + 4 * 4 * 3 * 3 * 3  # nf2..nf8 (5 codes + nf5/nf6) and int2..int8
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 50, generator=generator) ** 3
    for setting in ALL_SETTINGS:
        assert_same(weight, setting)


@pytest.mark.integration
@pytest.mark.parametrize("code", sorted({s.code for s in ALL_SETTINGS}))
def test_a_real_matrix_under_every_code(minilm_query, code):
    for scale_bits, scale2 in [(8, "fp32"), (2, "bf16")]:
        assert_same(minilm_query, QuantSetting(code, scale_bits, scale2, 64, 256))


@pytest.mark.parametrize("code", ["nf2", "nf3", "nf4", "nf8", "int2", "int8"])
def test_values_on_thresholds_and_beyond_the_ends(code):
    """Entries exactly on a midpoint go to the lower code, as in bucketize(right=False); ±1.5 and ±1e30 clamp to
    the end codes. One block with absmax 1 and scale code M0 gives ŝ = 1 exactly, so x/ŝ is the entry itself."""
    mids = midpoints(code)
    values = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, 2.0)), torch.tensor([1.0, -1.0, 0.0])])
    block = torch.zeros(64)
    block[: values.numel()] = values[:64]
    setting = QuantSetting(code, 8, "fp32", 64, 1)
    assert torch.equal(bw.fake_quantize(block, setting), bw.fake_quantize(block, setting, reference=True))
    lone = torch.tensor([1.0] + [0.0] * 63)
    for x in (1.5, -1.5, 1e30, -1e30):
        scales = torch.tensor([1.0])
        got = fused.encode(torch.tensor([x]), 1, scales, mids)
        assert int(got) == (len(mids) if x > 0 else 0)
    assert_same(lone, setting)


def test_constant_zero_and_single_entry_matrices():
    for weight in (torch.zeros(8, 8), torch.full((3, 70), 0.25), torch.tensor([[2.0]]), -torch.ones(1, 17)):
        for setting in (QLORA, QuantSetting("int3", 2, "bf16", 16, 16)):
            assert_same(weight, setting)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_entries_are_refused_like_the_reference(bad):
    weight = torch.randn(10, 64)
    weight[7, 3] = bad
    for reference in (False, True):
        with pytest.raises(ValueError, match="m with setting .* holds NaN or Inf"):
            bw.fake_quantize(weight, QLORA, name="m", reference=reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes(dtype):
    weight = torch.randn(33, 64).to(dtype)
    assert_same(weight, QLORA)
    assert bw.fake_quantize(weight, QLORA).dtype == dtype


def test_thread_count_does_not_change_a_bit():
    weight = torch.randn(256, 300)
    previous = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append((bw.fake_quantize(weight, QLORA), bw.quantize(weight, QLORA).codes))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_equals_the_reference_packing(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(fused.pack(codes, bits), packing.pack(codes, bits))


def test_dequantize_decodes_every_width_straight_from_bytes():
    """Every code width 2..8 at block sizes that hold whole packing groups, and the reference fallback for a block
    too small to (B0 = 4 with 3-bit codes, packed 8 to 3 bytes)."""
    weight = torch.randn(24, 40)
    for code, block0 in itertools.product(["nf2", "nf3", "nf5", "nf6", "int4", "nf8"], [8, 16]):
        assert_same(weight, QuantSetting(code, 4, "fp16", block0, 4))
    assert_same(weight, QuantSetting("nf3", 4, "fp16", 4, 4))
    assert codebook("nf3").numel() == 8


@pytest.mark.parametrize("env, layer", [({}, "workqueue"), ({"NUMBA_THREADING_LAYER": "omp"}, "omp")])
def test_kernels_use_sleeping_threads_unless_the_user_chose(env, layer):
    """OpenMP's spinning threads took the cores of co-located workers (the demo ran 3x slower); a user's explicit
    NUMBA_THREADING_LAYER is respected. In a child process: the layer is fixed at a process's first kernel."""
    import os
    import subprocess
    import sys

    code = ("import torch, numba; from workers.quant import blockwise as bw; from search.space import QuantSetting; "
            "bw.fake_quantize(torch.randn(8, 64), QuantSetting('nf4', 8, 'fp32', 64, 256)); "
            "print(numba.threading_layer())")
    environment = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"} | env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    if out.returncode and env and "threading layer" in out.stderr.lower():
        pytest.skip(f"this machine's numba has no {layer} threading layer")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == layer
