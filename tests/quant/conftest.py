"""Real matrices of the packaged MiniLM with real calibration inputs (review snippets), for GPTQ and ProjQ."""

from __future__ import annotations

import pytest
import torch

CALIBRATION_TEXTS = 48
TARGETS = ("encoder.layer.1.attention.self.query", "encoder.layer.1.output.dense")
"""An attention input (384 wide) and a down projection (1536 wide, post-GELU inputs: strongly anisotropic)."""


@pytest.fixture
def one_thread():
    """GPTQ's column sweep is thousands of small ops: on 2 shared cores a second torch thread spins against other
    processes (measured 20x slower under load). Restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def minilm_calibration() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name → (W out×in, X tokens×in): each target's weight and the inputs it saw on 48 review snippets."""
    from workers import data
    from workers.data.packaged import packaged_source
    from workers.models import load_model, load_tokenizer, resolve_model

    source = resolve_model("minilm")
    model, tokenizer = load_model(source, "base").eval(), load_tokenizer(source)
    rows = data.read_source(packaged_source("reviews")[0]).train[:CALIBRATION_TEXTS]
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
    keep = batch["attention_mask"].reshape(-1).bool()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: inputs.__setitem__(n, args[0].reshape(-1, args[0].shape[-1])[keep]))
        for n in TARGETS]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return {n: (model.get_submodule(n).weight.detach().clone(), inputs[n].double()) for n in TARGETS}
