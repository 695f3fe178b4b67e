"""The configuration encoder θ."""

import torch

from workers.adapters.coa import CoAModel
from workers.adapters.lora import LoRAModel
from workers.adapters.encoder import ConfigurationEncoder, encode_settings


def test_parameter_count_matches_reference_tables():
    # RoBERTa tables of the official code: 32 positions, 5 module patterns; r = 64 → 536,225 (method.md §3.3)
    enc = ConfigurationEncoder([4, 4, 3, 3, 3], 32, 5, 64)
    assert sum(p.numel() for p in enc.parameters()) == 536_225
    assert sum(p.numel() for p in enc.out.parameters()) == 528_384


def test_tables_sized_from_space_and_registry(space, make_model):
    coa = CoAModel(make_model("llama"), space, rank=4, alpha=8.0)
    sizes = [e.num_embeddings for e in coa.encoder.embeddings]
    assert sizes == [*space.cardinalities, coa.registry.n_blocks, len(coa.registry.module_types)] == [4, 4, 3, 3, 3, 2, 7]


def test_identity_at_init_and_one_batched_call(space, pool, make_model):
    for kind in ("bert", "roberta", "llama", "qwen2"):
        coa = CoAModel(make_model(kind), space, rank=4, alpha=8.0)
        calls = []
        coa.encoder.register_forward_hook(lambda *a: calls.append(1))
        n = len(coa.registry)
        for setting in pool:
            m = coa.mixing_matrices([setting] * n)
            assert m.shape == (n, 4, 4)
            dev = (m - torch.eye(4)).abs()
            assert dev.max() <= 1e-2
            assert dev.max() > 0  # U is random, not zero: θ can learn from step 0
        assert len(calls) == len(pool)  # one θ call per configuration, not per layer
        assert float(coa.encoder.gamma.detach()) == 1.0
        assert torch.all(coa.encoder.out.bias == 0)


def test_identity_at_init_at_paper_scale(space):
    """RoBERTa-large's registry (24 blocks × 6 types = 144 matrices) at r = 64: 590k entries of U."""
    encoder = ConfigurationEncoder(space.cardinalities, 24, 6, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randint(0, c, (144,), generator=g) for c in space.cardinalities], dim=1)
    blocks = torch.arange(24).repeat_interleave(6)
    types = torch.arange(6).repeat(24)
    with torch.no_grad():
        m = encoder(idx, blocks, types)
    assert m.shape == (144, 64, 64)
    assert (m - torch.eye(64)).abs().max() <= 1e-2


def test_distinct_inputs_give_distinct_matrices(space, pool, make_model):
    coa = CoAModel(make_model("bert"), space, rank=4, alpha=8.0)
    m = coa.mixing_matrices([pool[0]] * len(coa.registry))
    assert not torch.allclose(m[0], m[1])  # different module types
    assert not torch.allclose(m[0], m[6])  # different blocks, same type
    idx = encode_settings(space, [pool[0], pool[2]], ["a", "b"])
    assert idx.tolist() == [[0, 3, 2, 2, 2], [2, 3, 2, 2, 2]]


def test_step0_logits_equal_plain_lora(space, pool, make_model, make_batch):
    for init in ("zero_B", "svd_of_W"):
        coa = CoAModel(make_model("bert"), space, rank=4, alpha=8.0, init=init)
        plain = LoRAModel(make_model("bert"), space, rank=4, alpha=8.0, init=init)
        plain.load_trainable_state({k: v for k, v in coa.trainable_state().items() if not k.startswith("encoder.")})
        batch = make_batch("bert")
        config = [pool[1]] * len(coa.registry)
        with torch.no_grad():
            a, b = coa(config, **batch).logits, plain(config, **batch).logits
        if init == "zero_B":
            assert torch.equal(a, b)  # B = 0: M cannot matter
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=5e-3)
        with torch.no_grad():
            coa.encoder.out.weight.zero_()  # U = 0 exactly ⇒ M = I ⇒ identical
            assert torch.equal(coa(config, **batch).logits, b)


def test_the_reference_configuration_maps_to_identity_exactly(space, pool, make_model, make_batch):
    """M(C) = I + γ·(U(C) − U(reference)): I exactly on the reference's settings, θ's constant part cancels (a
    shifted output bias changes nothing), and θ still gets gradients from every other configuration."""
    from workers.adapters.coa import theta_spread

    coa = CoAModel(make_model("bert"), space, rank=4, alpha=8.0, reference=space.most_precise)
    n, eye = len(coa.registry), torch.eye(4)
    assert space.most_precise.bits_per_param == max(space.setting_bits)
    with torch.no_grad():
        coa.encoder.out.weight.normal_(0, 0.1)  # a trained-looking θ
    ref = coa.mixing_matrices([space.most_precise] * n)
    assert torch.equal(ref, eye.expand(n, 4, 4))
    mixed = coa.mixing_matrices([space.most_precise] * (n // 2) + [pool[0]] * (n - n // 2))
    assert torch.equal(mixed[: n // 2], eye.expand(n // 2, 4, 4)) and not torch.allclose(mixed[n // 2 :], eye)
    before = coa.mixing_matrices([pool[0]] * n)
    with torch.no_grad():
        coa.encoder.out.bias.add_(0.5)
    torch.testing.assert_close(coa.mixing_matrices([pool[0]] * n), before)
    batch = make_batch("bert")
    with torch.no_grad():
        for layer in coa.layers:
            layer.lora_B.normal_(0, 0.1)  # θ's gradient flows through B·M·A
    coa([pool[0]] * n, **batch).loss.backward()
    assert coa.encoder.out.weight.grad.abs().sum() > 0
    spread = theta_spread(coa, [[pool[0]] * n, [pool[2]] * n])
    assert spread["theta_spread"] > 0 and theta_spread(coa, [[pool[0]] * n] * 2)["theta_spread"] == 0.0
    plain = LoRAModel(make_model("bert"), space, rank=4, alpha=8.0)
    assert theta_spread(plain, [[pool[0]] * n]) == {"theta_common": 0.0, "theta_spread": 0.0}


def test_encoder_width_is_configurable(space, make_model):
    coa = CoAModel(make_model("bert"), space, rank=4, alpha=8.0, encoder_hidden=16)
    assert coa.encoder.hidden.out_features == 16 and coa.encoder.out.in_features == 16
