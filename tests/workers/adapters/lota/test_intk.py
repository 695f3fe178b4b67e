"""LoTA-QAF on asymmetric INTk groups (workers/adapters/lota/intk.py): what issue 17 asks the tests to show."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import save_file

from workers.adapters.lota import (
    LoTALinear,
    LoTAModel,
    TernarySignSGD,
    UpdateSchedule,
    load_merged,
    save_merged,
    train_lota,
)
from workers.quant.files import tensor_bytes
from workers.quant.intk import quantize_int
from workers.registry import ModuleRegistry


def random_ternary_(layer: LoTALinear, seed: int) -> None:
    """Dense random ternary factors: many codes move, many would leave the grid without the masks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lota_A.copy_(torch.randint(-1, 2, layer.lota_A.shape, generator=g).float())
        layer.lota_B.copy_(torch.randint(-1, 2, layer.lota_B.shape, generator=g).float())


def test_step_zero_is_the_quantized_base_exactly(make_model, make_batch):
    reference = make_model("bert")
    lota = LoTAModel(copy.deepcopy(reference), bits=3, rank=4, group_size=16)
    for target in ModuleRegistry.from_model(reference):
        linear = target_module = reference.get_submodule(target.name)
        with torch.no_grad():
            linear.weight.copy_(quantize_int(target_module.weight, 3, 16).dequantize())
    batch = make_batch("bert")
    assert torch.equal(lota(**batch).logits, reference(**batch).logits)
    assert all(bool(layer.lota_A.detach().abs().sum() > 0) and not layer.lota_B.detach().any() for layer in lota.layers)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_merged_codes_stay_on_the_grid(bits):
    torch.manual_seed(bits)
    layer = LoTALinear(torch.nn.Linear(96, 40), rank=8, bits=bits, group_size=32, omega=2.0,
                       generator=torch.Generator().manual_seed(0))
    random_ternary_(layer, seed=bits)
    before = layer.quantized.int_codes().long()
    after = layer.merge().quantized.int_codes().long()
    top = 2**bits - 1
    assert int(after.min()) >= 0 and int(after.max()) <= top
    moved = after - before
    assert int(moved.abs().max()) == 1 and int((moved != 0).sum()) > 0
    # what the unmasked threshold asks for: the masks are what keeps the boundary codes in range
    delta = layer.lota_B.detach() @ layer.lota_A.detach()
    wanted = torch.sign(delta) * (delta.abs() > layer.omega)
    wanted = torch.nn.functional.pad(wanted, (0, layer.quantized.padded_cols - 96))
    blocked = ((before == top) & (wanted > 0)) | ((before == 0) & (wanted < 0))
    assert int(blocked.sum()) > 0
    assert torch.equal(moved[blocked], torch.zeros_like(moved[blocked]))
    assert torch.equal(moved[~blocked], wanted[~blocked].long())
    assert torch.equal(moved[:, 96:], torch.zeros_like(moved[:, 96:]))  # padding is not adapted


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_merged_model_computes_what_training_computed(kind, make_model, make_batch):
    lota = LoTAModel(make_model(kind), bits=2, rank=4, group_size=16, omega=1.0, seed=1)
    batches = [make_batch(kind, seed=s) for s in range(2)]
    losses = train_lota(lota, batches, steps=6)
    assert all(math.isfinite(x) for x in losses)
    merged = lota.merged_model()
    moved = sum(int((m.quantized.int_codes() != layer.quantized.int_codes()).sum())
                for layer, m in zip(lota.layers, lota.merge().values()))
    assert moved > 0, "training moved no code: the comparison below would be vacuous"
    with torch.no_grad():
        for batch in batches:
            gap = (lota(**batch).logits - merged(**batch).logits).abs().max()
            assert float(gap) <= 1e-4
    assert not any(type(m).__name__ == "LoTALinear" for m in merged.modules())


def test_merged_bytes_are_the_base_plus_mu(tmp_path, make_model):
    lota = LoTAModel(make_model("llama"), bits=3, rank=4, group_size=16, omega=1.0)
    for i, layer in enumerate(lota.layers):
        random_ternary_(layer, seed=i)
    base = tmp_path / "base.safetensors"
    save_file({f"{l.name}.{part}": getattr(l.quantized, part).contiguous()
               for l in lota.layers for part in ("codes", "scale", "zero")}, str(base))
    merged = lota.merge()
    path = save_merged(merged, tmp_path / "merged.safetensors")
    mu_bytes = sum(m.mu.numel() * m.mu.element_size() for m in merged.values())
    assert tensor_bytes(path) == tensor_bytes(base) + mu_bytes
    assert sum(m.nbytes for m in merged.values()) == sum(l.quantized.nbytes for l in lota.layers) + mu_bytes
    loaded = load_merged(path)
    assert list(loaded) == list(merged)
    for name, m in merged.items():
        assert torch.equal(loaded[name].dequantize(), m.dequantize())
        assert float(m.mu.abs().max()) > 0


def test_load_refuses_other_files(tmp_path):
    other = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a merged LoTA file"):
        load_merged(other)


def test_schedule():
    s = UpdateSchedule(total_steps=100)
    assert s.fraction(0) == pytest.approx(0.05)
    assert s.fraction(40) == pytest.approx((0.05 + 0.001) / 2)
    assert s.fraction(80) == pytest.approx(0.001)
    assert s.fraction(100) == pytest.approx(0.0001)
    fractions = [s.fraction(t) for t in range(101)]
    assert fractions == sorted(fractions, reverse=True)


def test_sign_sgd_changes_at_most_the_scheduled_fraction():
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randint(-1, 2, (64, 50), generator=g).float())
    schedule = UpdateSchedule(total_steps=20, start=0.1, middle=0.01, end=0.002)
    opt = TernarySignSGD([p], schedule)
    for step in range(20):
        before = p.detach().clone()
        p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        changed = int((p.detach() != before).sum())
        allowed = math.floor(schedule.fraction(step) * p.numel())
        assert changed <= allowed
        if step == 0:
            assert changed > allowed // 2  # it does update: only entries already at the clip bound stay
        assert set(p.detach().unique().tolist()) <= {-1.0, 0.0, 1.0}
        # each changed entry moved one step against its gradient's sign
        diff = p.detach() - before
        assert torch.equal(diff[diff != 0], -torch.sign(p.grad[diff != 0]))
    assert opt.state_dict()["param_groups"][0]["step"] == 20


def test_training_lowers_the_loss(make_model, make_batch):
    # ω = 0.5: any non-zero product moves a code, so a 32-wide model learns within a few steps (the paper's
    # 0.75·r needs r-fold agreement, and its update fractions round to zero entries on tensors this small)
    lota = LoTAModel(make_model("llama"), bits=2, rank=8, group_size=16, omega=0.5, seed=0)
    batch = make_batch("llama", batch=8, length=16)
    with torch.no_grad():
        start = float(lota(**batch).loss)
    train_lota(lota, [batch], steps=30)
    with torch.no_grad():
        end = float(lota(**batch).loss)
    assert end < start - 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=8, bits=4, omega=8.0), "ω must lie"),
    (dict(rank=8, bits=4, omega=0.0), "ω must lie"),
    (dict(rank=40, bits=4), "rank must be"),
    (dict(rank=4, bits=1), "bits must be"),
])
def test_bad_input(kwargs, message):
    rank, bits = kwargs.pop("rank"), kwargs.pop("bits")
    with pytest.raises(ValueError, match=message):
        LoTALinear(torch.nn.Linear(32, 16), rank, bits, 16, name="m", **kwargs)


def test_one_adapter_serves_every_configuration_of_bit_widths(make_model, make_batch):
    """The configuration-aware variant: at step 0 each configuration is its INTk base exactly (the same logits as a
    uniform model of that width); after training over a set of configurations, every configuration merges
    losslessly (logits within 1e-4), into codes on its own grid, at the base's bytes plus μ, and the shared factors
    move codes at every width, each by its own ω."""
    reference = make_model("llama")
    widths, omegas = (2, 3, 4), {2: 1.5, 3: 1.0, 4: 0.5}
    lota = LoTAModel(copy.deepcopy(reference), bits=widths, rank=4, group_size=16, omega=omegas, seed=1)
    n = len(lota.layers)
    mixed = [widths[i % 3] for i in range(n)]
    configurations = [2, 3, 4, mixed]
    batch = make_batch("llama", seed=0)
    with torch.no_grad():
        for k in widths:
            uniform = LoTAModel(copy.deepcopy(reference), bits=k, rank=4, group_size=16, seed=1)
            lota.set_configuration(k)
            assert torch.equal(lota(**batch).logits, uniform(**batch).logits)
    losses = train_lota(lota, [make_batch("llama", seed=s) for s in range(2)], steps=6,
                        configurations=configurations, configs_per_step=2, seed=3)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    for i, layer in enumerate(lota.layers):
        random_ternary_(layer, seed=i)  # dense moves on every grid, so the checks below are not vacuous
    for config in configurations:
        lota.set_configuration(config)
        merged = lota.merge()
        bits = [config] * n if isinstance(config, int) else config
        for layer, k, m in zip(lota.layers, bits, merged.values()):
            assert layer.quantized.bits == k == m.quantized.bits and layer.omega == omegas[k]
            codes = m.quantized.int_codes().long()
            assert int(codes.min()) >= 0 and int(codes.max()) <= 2**k - 1
            assert int((codes != layer.quantized.int_codes().long()).sum()) > 0
        mu_bytes = sum(m.mu.numel() * m.mu.element_size() for m in merged.values())
        assert sum(m.nbytes for m in merged.values()) == sum(l.quantized.nbytes for l in lota.layers) + mu_bytes
        with torch.no_grad():
            gap = (lota(**batch).logits - lota.merged_model()(**batch).logits).abs().max()
        assert float(gap) <= 1e-4, (config, float(gap))


def test_configuration_errors_name_what_is_allowed(make_model):
    lota = LoTAModel(make_model("llama"), bits=(2, 4), rank=4, group_size=16)
    with pytest.raises(ValueError, match=r"built for \[2, 4\] bits, not \[3\]"):
        lota.set_configuration(3)
    with pytest.raises(ValueError, match="one bit-width per target matrix"):
        lota.set_configuration([2, 4])
    with pytest.raises(ValueError, match=r"must name exactly the bit-widths \[2, 4\]"):
        LoTAModel(make_model("llama"), bits=(2, 4), rank=4, group_size=16, omega={2: 1.0})
    with pytest.raises(ValueError, match="configurations must be non-empty"):
        train_lota(lota, [], steps=1, configurations=[])
