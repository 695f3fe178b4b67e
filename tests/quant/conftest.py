"""Fixtures of the quantizer tests."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from workers.models import resolve_model


@pytest.fixture(scope="module")
def minilm_query() -> torch.Tensor:
    """A real matrix: the packaged MiniLM's first query projection (384 × 384)."""
    with safe_open(f"{resolve_model('minilm').path}/model.safetensors", "pt") as f:
        return f.get_tensor("encoder.layer.0.attention.self.query.weight")
