"""Offline data, task building through workers.models (local paths), evaluation, Fisher and the cost table."""

import math
import time

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from search.space import QuantSetting, SearchSpace
from workers import data
from workers.coa_model import CoAModel
from workers.fisher import cost_table, diagonal_fisher, layer_fisher
from workers.models import load_tokenizer, resolve_model
from workers.quant.blockwise import fake_quantize
from workers.registry import ModuleRegistry
from workers.tasks import build_review_task, build_shakespeare_task, evaluate
from workers.training import TrainConfig, train

SMALL_SPACE = SearchSpace.from_dict(
    {"code": ["nf2", "nf4"], "scale_bits": [8], "scale2_format": ["fp32"], "block0": [16, 64], "block1": [16]}
)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer(resolve_model("minilm"))


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reviews_split_is_seeded_and_disjoint():
    a, b = data.load_reviews(n_train=300, n_validation=100, seed=1), data.load_reviews(300, 100, seed=1)
    assert a == b and len(a.train) == 300 and len(a.validation) == 100
    assert {label for _, label in a.train + a.validation} == {0, 1}
    assert not {t for t, _ in a.train} & {t for t, _ in a.validation}
    assert data.load_reviews(300, 100, seed=2).validation != a.validation
    full = data.load_reviews(n_validation=100)
    assert len(full.train) + 100 == 7403 + 5405  # plot rows dropped


def test_shakespeare_blocks(minilm_tokenizer):
    split = data.load_shakespeare(n_validation_plays=2, seed=0)
    assert len(split.train) + 2 == len(data.shakespeare_files()) == 78
    blocks = data.token_blocks(split.validation, minilm_tokenizer, block_size=32, max_blocks=10)
    assert blocks.shape == (10, 32)
    batch = next(iter(data.lm_loader(blocks, batch_size=4)))
    assert torch.equal(batch["input_ids"], batch["labels"]) and batch["input_ids"].shape == (4, 32)


def test_classification_task_from_local_tiny_bert(tmp_path, minilm_tokenizer, space, pool):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=2)
    path = _save(BertForSequenceClassification(config), minilm_tokenizer, tmp_path / "bert")
    task = build_review_task(path, n_train=64, n_validation=32, batch_size=16, max_length=32)
    batch = next(iter(task.train_loader))
    assert batch["input_ids"].shape[1] <= 32 and batch["labels"].shape == (16,)
    coa = CoAModel(task.model, space, rank=4, alpha=8.0)
    config3 = [pool[1]] * len(coa.registry)
    metrics = evaluate(coa, config3, task.validation_loader)
    assert set(metrics) == {"loss", "perplexity", "accuracy", "macro_f1"} and 0 <= metrics["accuracy"] <= 1
    bare = evaluate(coa, config3, task.validation_loader, adapter=False)
    assert bare == metrics  # B = 0 at init: the adapter adds nothing yet


def test_causal_lm_task_from_local_tiny_llama(tmp_path, minilm_tokenizer, space, pool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    path = _save(LlamaForCausalLM(config), minilm_tokenizer, tmp_path / "llama")
    task = build_shakespeare_task(path, block_size=16, n_train_blocks=16, n_validation_blocks=8, batch_size=4)
    coa = CoAModel(task.model, space, rank=4, alpha=8.0)
    configs = [[s] * len(coa.registry) for s in pool]
    before = evaluate(coa, configs[2], task.validation_loader)
    assert math.isclose(before["perplexity"], math.exp(before["loss"]))
    assert before["perplexity"] > 1000  # a random model over a 30k vocabulary
    train(coa, task.train_loader, configs, TrainConfig(lr=2e-2, total_steps=6))
    assert evaluate(coa, configs[2], task.validation_loader)["loss"] < before["loss"]


def test_fisher_is_sum_of_per_example_squared_gradients(make_model, make_batch):
    model = make_model("bert")
    model.bert.embeddings.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    registry = ModuleRegistry.from_model(model)
    examples = [make_batch("bert", batch=1, seed=s) for s in range(3)]
    fisher = diagonal_fisher(model, registry, examples, n_examples=2)
    name = registry.names[0]
    manual = torch.zeros_like(fisher[name])
    weight = registry.module(model, name).weight
    for ex in examples[:2]:
        manual += torch.autograd.grad(model(**ex).loss, weight)[0].square()
    torch.testing.assert_close(fisher[name], manual)
    assert set(fisher) == set(registry.names)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}  # restored
    with pytest.raises(ValueError):
        diagonal_fisher(model, registry, [make_batch("bert", batch=2)])


def test_layer_fisher_of_wrapped_model_equals_fisher_of_original(make_model, make_batch, space):
    examples = [make_batch("llama", batch=1, seed=s) for s in range(3)]
    original = make_model("llama")
    registry = ModuleRegistry.from_model(original)
    expected = diagonal_fisher(original, registry, examples)
    for init in ("zero_B", "svd_of_W"):  # the residual differs from W under svd_of_W; the Fisher must not
        coa = CoAModel(make_model("llama"), space, rank=4, alpha=8.0, init=init)
        fisher = layer_fisher(coa, examples)
        assert set(fisher) == set(expected)
        for name in expected:
            torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-10)
    with pytest.raises(ValueError, match="batch size 1"):
        layer_fisher(coa, [make_batch("llama", batch=2)])


def test_cost_table(make_model, make_batch):
    model = make_model("llama")
    registry = ModuleRegistry.from_model(model)
    fisher = diagonal_fisher(model, registry, [make_batch("llama", batch=1, seed=s) for s in range(2)])
    table = cost_table(model, registry, SMALL_SPACE, fisher)
    assert table.shape == (len(registry), SMALL_SPACE.n_settings) == (14, 4)
    nf2 = SMALL_SPACE.flat_index(QuantSetting("nf2", 8, "fp32", 16, 16))
    nf4 = SMALL_SPACE.flat_index(QuantSetting("nf4", 8, "fp32", 16, 16))
    assert np.all(table[:, nf4] < table[:, nf2])
    w = registry[3]
    weight = registry.module(model, w.name).weight.detach()
    setting = SMALL_SPACE.settings[nf2]
    expected = float(((weight - fake_quantize(weight, setting)).square() * fisher[w.name]).sum())
    assert math.isclose(table[3, nf2], expected, rel_tol=1e-6)
    plain = cost_table(model, registry, SMALL_SPACE)
    assert math.isclose(plain[3, nf2], float((weight - fake_quantize(weight, setting)).square().sum()), rel_tol=1e-6)


@pytest.mark.integration
def test_minilm_reviews_coa_lora_beats_no_adapter_at_3_bits(space):
    """A short CoA-LoRA run on the packaged MiniLM and review snippets; validation at ≈3 bits."""
    start = time.perf_counter()
    task = build_review_task("minilm", n_train=1024, n_validation=256, batch_size=32, max_length=64, seed=0)
    coa = CoAModel(task.model, space, rank=8, alpha=16.0, seed=0)
    n = len(coa.registry)
    three_bit = [QuantSetting("nf3", 4, "bf16", 64, 256)] * n
    assert 3.0 <= space.average_bits(three_bit, coa.registry.numels) <= 3.1
    pool = [
        [QuantSetting("nf2", 8, "fp32", 32, 256)] * n,
        [QuantSetting("nf3", 8, "fp32", 64, 256)] * n,
        [QuantSetting("nf4", 4, "fp16", 64, 64)] * n,
    ]
    bare = evaluate(coa, three_bit, task.validation_loader, adapter=False)["accuracy"]
    config = TrainConfig(lr=2e-3, warmup_steps=3, total_steps=32, configs_per_step=2, seed=0)
    losses = train(coa, task.train_loader, pool, config)
    tuned = evaluate(coa, three_bit, task.validation_loader)["accuracy"]
    print(f"no adapter {bare:.3f} → CoA-LoRA {tuned:.3f}; loss {losses[0]:.3f} → {losses[-1]:.3f}; "
          f"{time.perf_counter() - start:.0f}s")
    assert tuned >= bare + 0.1 and tuned >= 0.65


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    from workers.tasks import macro_f1

    g = torch.Generator().manual_seed(0)
    for n_classes in (2, 3, 5):
        predicted = torch.randint(n_classes, (200,), generator=g)
        labels = torch.randint(n_classes, (200,), generator=g)
        expected = f1_score(labels.numpy(), predicted.numpy(), average="macro", labels=list(range(n_classes)),
                            zero_division=0)
        assert abs(macro_f1(predicted, labels, n_classes) - expected) < 1e-12
