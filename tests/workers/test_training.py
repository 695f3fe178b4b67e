"""The training step: pure gradient function, optimizer step, sampling, schedule."""

import pytest
import torch

from workers.baselines import plain_lora
from workers.adapters.coa import CoAModel
from workers.training import (
    TrainConfig,
    apply_gradients,
    average_gradients,
    build_optimizer,
    compute_gradients,
    lr_factor,
    sample_configurations,
    train,
)


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama", "qwen2"])
def test_loss_decreases(kind, space, pool, make_model, make_batch):
    coa = CoAModel(make_model(kind), space, rank=4, alpha=8.0)
    configs = [[s] * len(coa.registry) for s in pool]
    losses = train(coa, [make_batch(kind)], configs, TrainConfig(lr=1e-2, total_steps=6, configs_per_step=2))
    assert losses[-1] < losses[0]


def test_compute_gradients_is_pure_and_is_the_mean(space, pool, make_model, make_batch):
    coa = CoAModel(make_model("llama"), space, rank=4, alpha=8.0)
    with torch.no_grad():
        for layer in coa.layers:
            layer.lora_B.normal_(std=0.1)
    before = {n: p.detach().clone() for n, p in coa.named_parameters()}
    batch = make_batch("llama")
    configs = [[s] * len(coa.registry) for s in pool[:2]]
    state = coa.trainable_state()
    losses, grads = compute_gradients(coa, state, batch, configs)
    assert all(torch.equal(p, before[n]) for n, p in coa.named_parameters())
    assert all(p.grad is None for p in coa.parameters())
    singles = [compute_gradients(coa, state, batch, [c]) for c in configs]
    torch.testing.assert_close(losses, torch.cat([singles[0][0], singles[1][0]]))  # each configuration's own loss
    mean = average_gradients([g for _, g in singles])  # two one-config shards = one two-config step
    for name in grads:
        torch.testing.assert_close(grads[name], mean[name], rtol=1e-5, atol=1e-7)
    assert any(grads[n].abs().sum() > 0 for n in grads if n.startswith("encoder."))
    # a different state gives a different loss: the function reads the state, not the model
    shifted = {n: (t + 0.05 if n.endswith("lora_A") else t) for n, t in state.items()}
    assert compute_gradients(coa, shifted, batch, configs[:1])[0] != singles[0][0]


def test_k1_frozen_theta_step_equals_per_configuration_lora_step(space, pool, make_model, make_batch):
    config = TrainConfig(lr=1e-2, total_steps=10, weight_decay=0.01)
    coa = CoAModel(make_model("bert"), space, rank=4, alpha=8.0, init="svd_of_W")
    with torch.no_grad():
        coa.encoder.out.weight.zero_()  # θ's output frozen at U = 0
    coa.encoder.requires_grad_(False)
    per = plain_lora(make_model("bert"), space, rank=4, alpha=8.0)
    for layer_p, layer_c in zip(per.layers, coa.layers):
        layer_p.set_residual(layer_c.residual)
    per.load_trainable_state(coa.trainable_state())
    batch, configuration = make_batch("bert"), [pool[1]] * len(coa.registry)
    for model in (coa, per):
        optimizer, scheduler = build_optimizer(model, config)
        _, grads = compute_gradients(model, model.trainable_state(), batch, [configuration])
        apply_gradients(model, optimizer, scheduler, grads)
    a, b = coa.trainable_state(), per.trainable_state()
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_sampling_uses_its_generator_only(pool):
    state = torch.random.get_rng_state()
    draws = [sample_configurations(pool, 2, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) == 2
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sample_configurations(pool, 10, torch.Generator().manual_seed(0)).__len__() == len(pool)


def test_schedule_and_weight_decay_groups(space, make_model):
    config = TrainConfig(lr=1.0, warmup_steps=4, total_steps=14, schedule="cosine")
    assert [round(lr_factor(s, config), 3) for s in (0, 3, 4, 9, 14)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor(9, TrainConfig(warmup_steps=4, total_steps=14, schedule="linear")) == 0.5
    coa = CoAModel(make_model("bert"), space, rank=4, alpha=8.0)
    optimizer, _ = build_optimizer(coa, config)
    names = {id(p): n for n, p in coa.named_parameters()}
    no_decay = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert {"encoder.gamma", "encoder.norm.weight", "encoder.embeddings.0.weight"} <= no_decay
    assert not any(n.endswith("lora_A") for n in no_decay)


def test_apply_gradients_clips(space, make_model):
    coa = CoAModel(make_model("bert"), space, rank=4, alpha=8.0)
    optimizer, scheduler = build_optimizer(coa, TrainConfig(lr=0.0))
    grads = {n: torch.full_like(p, 100.0) for n, p in coa.named_parameters() if p.requires_grad}
    assert apply_gradients(coa, optimizer, scheduler, grads, max_grad_norm=1.0) > 1.0
    with pytest.raises(ValueError):
        apply_gradients(coa, optimizer, scheduler, {})


def test_lora_lr_moves_only_the_lora_factors(space, make_model):
    coa = CoAModel(make_model("bert"), space, rank=4, alpha=8.0)
    optimizer, scheduler = build_optimizer(coa, TrainConfig(lr=0.0, lora_lr=1e-2, weight_decay=0.0))
    lrs = {n: g["lr"] for g in optimizer.param_groups for n, p in coa.named_parameters() if any(p is q for q in g["params"])}
    assert {lr for n, lr in lrs.items() if n.endswith(("lora_A", "lora_B"))} == {1e-2}
    assert {lr for n, lr in lrs.items() if not n.endswith(("lora_A", "lora_B"))} == {0.0}
    before = coa.trainable_state()
    grads = {n: torch.ones_like(p) for n, p in coa.named_parameters() if p.requires_grad}
    apply_gradients(coa, optimizer, scheduler, grads, max_grad_norm=1e9)
    moved = {n for n, p in coa.trainable_state().items() if not torch.equal(p, before[n])}
    assert moved and all(n.endswith(("lora_A", "lora_B")) for n in moved)
    assert any(n.endswith("lora_A") for n in moved) and any(n.endswith("lora_B") for n in moved)


def test_negative_learning_rates_are_rejected():
    with pytest.raises(ValueError, match="learning rates"):
        TrainConfig(lora_lr=-1.0)


def test_encoder_lr_moves_theta_at_its_own_rate(space, make_model):
    coa = CoAModel(make_model("bert"), space, rank=4, alpha=8.0)
    optimizer, _ = build_optimizer(coa, TrainConfig(lr=3e-3, encoder_lr=1e-4))
    lrs = {n: g["lr"] for g in optimizer.param_groups for n, p in coa.named_parameters() if any(p is q for q in g["params"])}
    assert {lr for n, lr in lrs.items() if n.startswith("encoder.")} == {1e-4}
    assert {lr for n, lr in lrs.items() if not n.startswith("encoder.")} == {3e-3}
    with pytest.raises(ValueError, match="learning rates"):
        TrainConfig(encoder_lr=-1.0)
