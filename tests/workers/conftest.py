"""Tiny random models (hidden 32–64, 2 layers) for the worker tests, built from configs: no downloads."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from search.space import QuantSetting, SearchSpace

VOCAB = 128


def tiny_model(kind: str, seed: int = 0, *, layers: int = 2, intermediate: int = 64) -> torch.nn.Module:
    """A random model of ``kind`` ('bert', 'roberta', 'llama', 'qwen2') with hidden size 32, in eval mode, seeded."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=intermediate)
    if kind == "bert":
        model = BertForSequenceClassification(
            BertConfig(**common, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
        )
    elif kind == "roberta":
        model = RobertaForSequenceClassification(
            RobertaConfig(**common, max_position_embeddings=72, num_labels=2, pad_token_id=1,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        )
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=64))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=64))
    else:
        raise ValueError(kind)
    return model.eval()


def tiny_batch(kind: str, batch: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    if kind in ("bert", "roberta"):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch,), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny-model work is dominated by thread sync: on 2 shared cores, 2 torch threads spin against other
    processes (measured up to 8x slower backward). Restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_model():
    """Factory fixture: ``make_model(kind, seed=0, layers=2, intermediate=64)`` (tests cannot import this conftest by name: the suite-level
    tests/conftest.py owns that module name)."""
    return tiny_model


@pytest.fixture(scope="session")
def make_batch():
    return tiny_batch


@pytest.fixture(scope="session")
def space() -> SearchSpace:
    return SearchSpace.default()


@pytest.fixture(scope="session")
def pool() -> list[QuantSetting]:
    """Three uniform settings (≈2, 3 and 4 bits) used to build small configuration pools."""
    return [
        QuantSetting("nf2", 8, "fp32", 64, 256),
        QuantSetting("nf3", 4, "bf16", 32, 64),
        QuantSetting("nf4", 8, "fp32", 64, 256),
    ]
