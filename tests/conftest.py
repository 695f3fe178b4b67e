"""Suite-wide set-up: offline, deterministic, and single-threaded where BoTorch runs beside other work."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT saved with the packaged MiniLM tokenizer: a real local model path, loaded the way users'
    models are, that runs a whole coalora job in seconds."""
    from transformers import BertConfig, BertForSequenceClassification

    from workers.models import load_tokenizer, resolve_model

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer(resolve_model("minilm"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, num_labels=2)
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
