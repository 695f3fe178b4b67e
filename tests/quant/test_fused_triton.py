"""The Triton kernels (workers/quant/fused_triton.py) against the pure-torch reference path: bit-identical codes,
scales, packed bytes and decoded floats.

On a machine with a GPU the kernels are compiled and run on CUDA tensors through the product's own dispatch
(``blockwise.kernels``), and compared with the reference computed on the CPU. Without one they run in Triton's
interpreter (``TRITON_INTERPRET=1``, which tests/conftest.py sets before anything imports triton) on CPU tensors:
the same kernel code, each float operation done by numpy in IEEE float32, so the tests check the kernels' logic
(search, packing, scales, masks) everywhere. What the interpreter cannot check is the GPU compiler's float
lowering; the kernels use ``div_rn`` and launch the decoder unfused for that reason (see the module docstring)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it before triton is imported
    pytest.skip("without a GPU these tests need TRITON_INTERPRET=1 from the start of the process",
                allow_module_level=True)

from search.space import QuantSetting  # noqa: E402
from workers.quant import blockwise as bw  # noqa: E402
from workers.quant import fused, fused_triton, packing  # noqa: E402
from workers.quant.codebooks import codebook, midpoints  # noqa: E402

PRODUCT_KERNELS = bw.kernels
pytestmark = pytest.mark.skipif(not fused_triton.AVAILABLE, reason="triton is not installed")

DEVICE = torch.device("cuda" if CUDA else "cpu")
CODES = ["nf2", "nf3", "nf4", "nf5", "nf6", "nf7", "nf8", "int2", "int3", "int4", "int8"]
QLORA = QuantSetting("nf4", 8, "fp32", 64, 256)


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    """Without a GPU, route CPU tensors to the Triton kernels (interpreted) where the product would use Numba's."""
    if not CUDA:
        monkeypatch.setattr(bw, "kernels", lambda device, reference=False: None if reference else fused_triton)


def assert_same(weight: torch.Tensor, setting: QuantSetting) -> None:
    """Triton and the CPU reference agree on everything: fake-quant floats, the four packed tensors, decoding."""
    reference = bw.fake_quantize(weight, setting, reference=True)
    packed_ref = bw.quantize(weight, setting, reference=True)
    on_device = weight.to(DEVICE)
    assert torch.equal(bw.fake_quantize(on_device, setting).cpu(), reference), setting
    packed = bw.quantize(on_device, setting)
    for name, tensor in packed.tensors().items():
        assert torch.equal(tensor.cpu(), packed_ref.tensors()[name]), (setting, name)
    assert torch.equal(bw.dequantize(packed).cpu(), reference), setting


def test_dispatch_picks_triton_on_cuda_numba_on_the_cpu_and_torch_on_request():
    assert PRODUCT_KERNELS(torch.device("cuda")) is fused_triton
    assert PRODUCT_KERNELS(torch.device("cuda", 1)) is fused_triton
    assert PRODUCT_KERNELS(torch.device("cpu")) is (fused if fused.AVAILABLE else None)
    assert PRODUCT_KERNELS(torch.device("cuda"), reference=True) is None
    assert PRODUCT_KERNELS(torch.device("meta")) is None


@pytest.mark.parametrize("code", CODES)
def test_every_code_under_several_block_and_scale_formats(code):
    """37x50 pads (numel is no multiple of any B0·B1); the cube puts entries beyond a block's scale (x/ŝ > 1)."""
    weight = torch.randn(37, 50, generator=torch.Generator().manual_seed(0)) ** 3
    for scale_bits, scale2, block0, block1 in [(8, "fp32", 64, 256), (2, "bf16", 16, 16), (3, "fp16", 32, 4)]:
        assert_same(weight, QuantSetting(code, scale_bits, scale2, block0, block1))


@pytest.mark.parametrize("code", ["nf2", "nf3", "nf4", "nf8", "int2", "int8"])
def test_values_on_thresholds_and_beyond_the_ends(code):
    """An entry exactly on a midpoint goes to the lower code (bucketize right=False); ±1.5 and ±1e30 clamp to the
    end codes. One block of absmax 1 with scale code M0 gives ŝ = 1, so x/ŝ is the entry itself."""
    mids = midpoints(code)
    values = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, 2.0)), torch.tensor([1.0, -1.0, 0.0])])
    block = torch.zeros(64)
    block[: min(64, values.numel())] = values[:64]
    assert_same(block, QuantSetting(code, 8, "fp32", 64, 1))
    for x in (1.5, -1.5, 1e30, -1e30):
        got = fused_triton.encode(torch.tensor([x], device=DEVICE), 1, torch.ones(1, device=DEVICE), mids)
        assert int(got) == (len(mids) if x > 0 else 0)


def test_a_real_matrix(minilm_query):
    for setting in (QLORA, QuantSetting("nf3", 8, "fp32", 64, 256), QuantSetting("int2", 4, "bf16", 32, 8)):
        assert_same(minilm_query, setting)


def test_constant_zero_and_single_entry_matrices():
    for weight in (torch.zeros(8, 8), torch.full((3, 70), 0.25), torch.tensor([[2.0]]), -torch.ones(1, 17)):
        for setting in (QLORA, QuantSetting("int3", 2, "bf16", 16, 16)):
            assert_same(weight, setting)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_entries_are_refused(bad):
    weight = torch.randn(10, 64)
    weight[7, 3] = bad
    with pytest.raises(ValueError, match="m with setting .* holds NaN or Inf"):
        bw.fake_quantize(weight.to(DEVICE), QLORA, name="m")


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_equals_the_reference_packing(bits):
    for n in (1, 7, 8, 9, 300):
        codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        assert torch.equal(fused_triton.pack(codes.to(DEVICE), bits).cpu(), packing.pack(codes, bits))


def test_decoding_into_a_reused_buffer():
    weight = torch.randn(24, 40)
    for code, block0 in itertools.product(["nf3", "int4", "nf8"], [8, 16]):
        setting = QuantSetting(code, 4, "fp16", block0, 4)
        packed = bw.quantize(weight.to(DEVICE), setting)
        buffer = torch.full((weight.numel() + 5,), -7.0, device=DEVICE)
        out = bw.dequantize(packed, out=buffer)
        assert out.data_ptr() == buffer.data_ptr()
        assert torch.equal(out.cpu(), bw.fake_quantize(weight, setting, reference=True))
        assert torch.equal(buffer[weight.numel():].cpu(), torch.full((5,), -7.0))  # nothing written past numel


def test_numba_and_triton_kernels_agree_call_for_call():
    """The two kernel modules take the same arguments and return the same bits (the dispatch relies on it)."""
    if not fused.AVAILABLE:
        pytest.skip("numba is not installed")
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    flat = weight.reshape(-1)
    for setting in (QLORA, QuantSetting("nf5", 3, "fp16", 32, 8)):
        mids, book = midpoints(setting.code), codebook(setting.code)
        scales = torch.rand(weight.numel() // setting.block0, generator=torch.Generator().manual_seed(4)) + 0.5
        on = (flat.to(DEVICE), setting.block0, scales.to(DEVICE), mids)
        assert torch.equal(fused_triton.encode(*on).cpu(), fused.encode(flat, setting.block0, scales, mids))
        assert torch.equal(fused_triton.fake_quantize_values(*on, book).cpu(),
                           fused.fake_quantize_values(flat, setting.block0, scales, mids, book))
        absmax, bad = fused_triton.block_absmax(flat.to(DEVICE), setting.block0, scales.numel())
        assert torch.equal(absmax.cpu(), fused.block_absmax(flat, setting.block0, scales.numel())[0]) and not bad
