"""``adapter.kind: lota`` (workers/adapters/lota/blockwise.py): LoTA-QAF over the space's int codes, one pair of
ternary factors for every configuration, merged losslessly into each configuration's packed codes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from orchestrator.loop.optim import MasterState
from search.space import QuantSetting, SearchSpace
from workers.adapters.lora import LoRAModel
from workers.adapters.lota import BlockwiseLoTALinear, BlockwiseLoTAModel
from workers.adapters.lota.ternary import UpdateSchedule
from workers.quant.blockwise import block_scales, code_indices, dequantize_shifted, quantize
from workers.training import TrainConfig

INT_SPACE = SearchSpace.from_dict({"code": ["int2", "int3", "int4", "int8"], "scale_bits": [4, 8],
                                   "scale2_format": ["fp32"], "block0": [16], "block1": [4]})


def random_ternary_(layer: BlockwiseLoTALinear, seed: int) -> None:
    """Dense random ternary factors: many codes move, many would leave the grid without the masks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randint(-1, 2, layer.lora_A.shape, generator=g).float())
        layer.lora_B.copy_(torch.randint(-1, 2, layer.lora_B.shape, generator=g).float())


def uniform(model: LoRAModel, code: str) -> list[QuantSetting]:
    return [QuantSetting(code, 8, "fp32", 16, 4)] * len(model.layers)


def mixed(model: LoRAModel) -> list[QuantSetting]:
    codes = ["int2", "int3", "int4", "int8"]
    return [QuantSetting(codes[i % 4], 4 if i % 2 else 8, "fp32", 16, 4) for i in range(len(model.layers))]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_step_zero_is_the_quantized_base_exactly(kind, make_model, make_batch):
    lota = BlockwiseLoTAModel(make_model(kind), INT_SPACE, rank=4, seed=0)
    batch = make_batch(kind)
    with torch.no_grad():
        for config in (uniform(lota, "int3"), mixed(lota)):
            adapted = lota(config, **batch).logits
            with lota.adapters_disabled():
                base = lota(config, **batch).logits
            assert torch.equal(adapted, base)
    assert all(bool(layer.lora_A.abs().sum() > 0) and not layer.lora_B.any() for layer in lota.layers)
    assert set(torch.unique(torch.cat([layer.lora_A.reshape(-1) for layer in lota.layers])).tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("code", ["int2", "int3", "int4", "int8"])
def test_merged_codes_stay_on_the_grid(code):
    torch.manual_seed(0)
    layer = BlockwiseLoTALinear(torch.nn.Linear(96, 40), 8, 8.0, omega=2.0, generator=torch.Generator().manual_seed(0))
    random_ternary_(layer, seed=3)
    setting = QuantSetting(code, 8, "fp32", 16, 4)
    before = code_indices(layer.packed_weight(setting)).long()
    merged = layer.merge(setting)
    after = code_indices(merged.packed).long()
    top = 2 ** setting.code_bits - 1
    assert int(after.min()) >= 0 and int(after.max()) <= top
    moved = after - before
    assert int(moved.abs().max()) == 1 and int((moved != 0).sum()) > 0
    delta = (layer.lora_B.detach() @ layer.lora_A.detach()).reshape(-1)
    wanted = torch.nn.functional.pad(torch.sign(delta) * (delta.abs() > layer.omega(setting.code_bits)), (0, before.numel() - 96 * 40))
    blocked = ((before == top) & (wanted > 0)) | ((before == 0) & (wanted < 0))
    assert int(blocked.sum()) > 0, "no code at the grid's edge wanted to leave it: the masks went untested"
    assert not moved[blocked].any()
    assert torch.equal(moved[~blocked], wanted[~blocked].long())
    # same scales: the merged matrix is the configuration's own format, byte for byte the size of the base
    base = layer.packed_weight(setting)
    for part in ("scale_codes", "scale2", "offset"):
        assert torch.equal(getattr(merged.packed, part), getattr(base, part))
    assert merged.packed.nbytes == base.nbytes
    assert merged.nbytes == base.nbytes + 4 * (base.padded_numel // setting.group_size)


def test_a_per_width_omega_moves_each_grid_by_its_own_threshold():
    """One pair of factors, ω per code width: each width's merge moves exactly the entries with |B·A| above that
    width's ω (edges aside), so a higher ω moves fewer codes from the same factors."""
    omegas = {2: 3.0, 4: 1.0}
    layer = BlockwiseLoTALinear(torch.nn.Linear(96, 40), 8, 8.0, omega=omegas,
                                generator=torch.Generator().manual_seed(0))
    random_ternary_(layer, seed=3)
    delta = (layer.lora_B.detach() @ layer.lora_A.detach()).reshape(-1)
    moved = {}
    for bits, omega in omegas.items():
        setting = QuantSetting(f"int{bits}", 8, "fp32", 16, 4)
        before = code_indices(layer.packed_weight(setting)).long()[: 96 * 40]
        after = code_indices(layer.merge(setting).packed).long()[: 96 * 40]
        top = 2**bits - 1
        free = (before > 0) & (before < top)  # codes that could move either way
        wanted = torch.sign(delta) * (delta.abs() > omega)
        assert torch.equal((after - before)[free], wanted[free].long()), bits
        moved[bits] = int((after != before).sum())
    assert 0 < moved[2] < moved[4]
    with pytest.raises(ValueError, match="no ω for 3-bit codes"):
        layer.merge(QuantSetting("int3", 8, "fp32", 16, 4))
    assert "2 bits: 3" in layer.extra_repr()


def test_a_per_width_omega_must_cover_the_space_and_stay_a_fraction(make_model):
    with pytest.raises(ValueError, match=r"misses \[3, 8\] bits"):
        BlockwiseLoTAModel(make_model("bert"), INT_SPACE, rank=4, omega={2: 0.5, 4: 0.5})
    with pytest.raises(ValueError, match="fraction of the rank"):
        BlockwiseLoTAModel(make_model("bert"), INT_SPACE, rank=4, omega={2: 0.5, 3: 1.5, 4: 0.5, 8: 0.5})
    lota = BlockwiseLoTAModel(make_model("bert"), INT_SPACE, rank=4, omega={"2": 0.5, 3: 0.5, 4: 0.25, 8: 0.25})
    assert lota.omega == {2: 0.5, 3: 0.5, 4: 0.25, 8: 0.25}  # keys as JSON gives them are read as widths
    assert lota.layers[0].omega(2) == 2.0 and lota.layers[0].omega(8) == 1.0


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_driver_optimizer_trains_it_and_the_merge_is_lossless(kind, make_model, make_batch):
    """t-SignSGD on the ternary factors and AdamW on the head, as the driver's master state steps them; then every
    configuration's merged weights give the training forward's logits."""
    lota = BlockwiseLoTAModel(make_model(kind), INT_SPACE, rank=4, omega=0.25, seed=1)
    ternary = lota.ternary_names()
    assert ternary and all(n.endswith(("lora_A", "lora_B")) for n in ternary)
    steps = 8
    master = MasterState(lota.trainable_state(), lota.no_decay_names(), TrainConfig(lr=1e-2, total_steps=steps),
                         ternary)
    schedule = UpdateSchedule(steps)
    configs = [uniform(lota, "int2"), uniform(lota, "int4"), mixed(lota)]
    batches = [make_batch(kind, seed=s) for s in range(2)]
    losses = []
    for step in range(steps):
        before = master.state()
        lota.load_trainable_state(before)
        loss = sum(lota(configs[(step + i) % 3], **batches[step % 2]).loss for i in range(2)) / 2
        lota.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for n, p in lota.named_parameters() if p.requires_grad}
        master.step(grads)
        losses.append(float(loss.detach()))
        after = master.state()
        for name in ternary:
            changed = int((after[name] != before[name]).sum())
            assert changed <= math.floor(schedule.fraction(step) * before[name].numel())
            assert set(torch.unique(after[name]).tolist()) <= {-1.0, 0.0, 1.0}
    assert all(math.isfinite(x) for x in losses)
    lota.load_trainable_state(master.state())
    moved = 0
    with torch.no_grad():
        for config in configs:
            merged = lota.merge(config)
            moved += sum(int((code_indices(m.packed) != code_indices(layer.packed_weight(s))).sum())
                         for layer, s, m in zip(lota.layers, config, merged.values()))
            deployed = copy.deepcopy(lota.model)
            for name, m in merged.items():  # a plain model: the merged weights decoded into its Linear layers
                original = deployed.get_submodule(name)
                plain = torch.nn.Linear(original.in_features, original.out_features, bias=original.bias is not None)
                plain.weight.copy_(m.dequantize())
                if original.bias is not None:
                    plain.bias.copy_(original.bias)
                parent, _, child = name.rpartition(".")
                setattr(deployed.get_submodule(parent), child, plain)
            for batch in batches:
                trained = lota(config, **batch).logits
                served = deployed(**batch).logits
                assert float((trained - served).abs().max()) <= 1e-4
    assert moved > 0, "training moved no code: the comparison above would be vacuous"


def test_the_merged_decode_is_the_base_plus_its_shifted_zero_point():
    torch.manual_seed(0)
    weight = torch.randn(24, 32)
    setting = QuantSetting("int3", 4, "fp32", 16, 4)
    packed = quantize(weight, setting)
    mu = torch.linspace(-0.5, 0.5, 12)  # 24·32 = 768 entries: 12 groups of B0·B1 = 64
    step = 2 / 7  # int3's levels are 2/7 apart on [-1, 1]
    expected = packed.dequantize().reshape(-1, 16) + (block_scales(packed) * step).unsqueeze(1) * \
        mu.repeat_interleave(64).view(-1, 16)
    assert torch.allclose(dequantize_shifted(packed, mu), expected.view(24, 32), atol=1e-6)
    with pytest.raises(ValueError, match="one shift per 64-entry group"):
        dequantize_shifted(packed, mu[:3])
    with pytest.raises(ValueError, match="not an integer grid"):
        dequantize_shifted(quantize(weight, QuantSetting("nf3", 4, "fp32", 16, 4)), mu)


def test_bad_input(make_model):
    with pytest.raises(ValueError, match="int codes only"):
        BlockwiseLoTAModel(make_model("bert"), SearchSpace.default(), rank=4)
    with pytest.raises(ValueError, match="fraction of the rank"):
        BlockwiseLoTAModel(make_model("bert"), INT_SPACE, rank=4, omega=1.5)
    with pytest.raises(ValueError, match="zero_B"):
        BlockwiseLoTALinear(torch.nn.Linear(8, 8), 2, 2.0, omega=1.0, init="svd_of_W")
