"""The driver's master optimizer: checkpoint round trip, state naming, per-group learning rates."""

import pytest
import torch

from orchestrator.config import build_config
from orchestrator.loop.optim import MasterState, train_config
from workers.training import TrainConfig


def _state() -> dict[str, torch.Tensor]:
    # names chosen so that sorted order (a, b, c) differs from the optimizer's group order (decay, then no decay)
    g = torch.Generator().manual_seed(0)
    return {"a.bias": torch.randn(3, generator=g), "b.lora_A": torch.randn(2, 5, generator=g),
            "c.weight": torch.randn(4, 4, generator=g)}


def _grads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) for n, t in _state().items()}


CONFIG = TrainConfig(lr=1e-2, lora_lr=1e-3, warmup_steps=1, total_steps=6, max_grad_norm=1e9)


def test_checkpoint_slots_are_named_after_their_tensor():
    master = MasterState(_state(), {"a.bias"}, CONFIG)
    master.step(_grads(1))
    _, tensors, _ = master.to_tensors()
    for name, grad in _grads(1).items():  # AdamW after one step: exp_avg = (1 - beta1) * grad
        torch.testing.assert_close(tensors[f"{name}::exp_avg"], 0.1 * grad)


def test_restored_state_continues_exactly():
    straight = MasterState(_state(), {"a.bias"}, CONFIG)
    for seed in (1, 2):
        straight.step(_grads(seed))
    params, tensors, meta = straight.to_tensors()
    resumed = MasterState(_state(), {"a.bias"}, CONFIG)
    resumed.load(params, tensors, meta)
    for seed in (3, 4):
        straight.step(_grads(seed))
        resumed.step(_grads(seed))
    assert all(torch.equal(straight.state()[n], resumed.state()[n]) for n in params)


def test_lora_lr_reaches_the_master_optimizer():
    master = MasterState(_state(), {"a.bias"}, CONFIG)
    by_name = {n: g["lr"] for g in master.optimizer.param_groups for n, p in master.params.items()
               if any(p is q for q in g["params"])}
    assert by_name == {"a.bias": pytest.approx(1e-2), "b.lora_A": pytest.approx(1e-3), "c.weight": pytest.approx(1e-2)}


def test_train_config_follows_the_run_configuration():
    cfg = build_config({"model": {"name": "minilm"}},
                       ["training.lora_lr=0.0001", "training.steps_per_round=7", "search.rounds=3"])
    config = train_config(cfg, configs_per_step=1)
    assert (config.lora_lr, config.total_steps, config.configs_per_step) == (1e-4, 21, 1)
    assert config.lr == cfg.training.lr


def test_weighted_mean_of_shards_is_the_full_batch_mean_per_configuration():
    """Two shards of 3 and 1 examples, two configurations each: every figure is the 3:1-weighted mean."""
    from orchestrator.loop.optim import weighted_mean

    shards = [([1.0, 3.0], {"w": torch.tensor([4.0])}, 3), ([5.0, 7.0], {"w": torch.tensor([8.0])}, 1)]
    loss, grads, per_config = weighted_mean(shards)
    assert per_config == [(3 * 1.0 + 5.0) / 4, (3 * 3.0 + 7.0) / 4]
    assert loss == sum(per_config) / 2
    torch.testing.assert_close(grads["w"], torch.tensor([(3 * 4.0 + 8.0) / 4]))


@pytest.mark.parametrize("ternary", [{"b.lora_A"}, {"a.bias", "b.lora_A", "c.weight"}])
def test_ternary_tensors_take_t_sign_sgd_and_a_resume_continues_its_schedule(ternary):
    """LoTA's factors (``ternary``) stay in {−1, 0, 1} under t-SignSGD, the rest under AdamW; with every tensor
    ternary (a causal LM has no head) there is no AdamW at all. A checkpoint taken mid-way and loaded into a fresh
    master continues exactly as the uninterrupted one."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a.bias": (300,), "b.lora_A": (20, 50), "c.weight": (40, 40)}  # big enough that 5% is many entries
    start = {n: torch.randint(-1, 2, s, generator=g).float() if n in ternary else torch.randn(s, generator=g)
             for n, s in shapes.items()}

    def grads(seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {n: torch.randn(s, generator=gen) for n, s in shapes.items()}

    full = MasterState(start, {"a.bias"}, CONFIG, ternary)
    assert (full.optimizer is None) == (len(ternary) == 3)
    for step in range(3):
        full.step(grads(step))
    params, opt, meta = full.to_tensors()
    assert meta["ternary_step"] == 3
    resumed = MasterState(start, {"a.bias"}, CONFIG, ternary)
    resumed.load(params, opt, meta)
    for step in range(3, 6):
        full.step(grads(step))
        resumed.step(grads(step))
    after = full.state()
    for n in ternary:
        assert set(torch.unique(after[n]).tolist()) <= {-1.0, 0.0, 1.0}
        assert not torch.equal(after[n], start[n])
    for n, t in after.items():
        assert torch.equal(t, resumed.state()[n]), n
