"""The converted-GGUF cache (workers/models.py): what it holds is the GGUF's weights and tokenizer, keyed so that a
changed file converts again, and ``COALORA_CACHE=off`` bypasses it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants

from workers.models import ModelSource, cache_dir, cache_entry, converted, load_model, load_tokenizer, resolve_model

pytestmark = pytest.mark.integration


def test_the_converted_smollm2_holds_the_gguf_weights_and_tokenizer():
    source = resolve_model("smollm2")
    cached = converted(source)
    assert cached.gguf_file is None and Path(cached.path).parent.parent == cache_dir()
    assert converted(source) == cached  # the second call finds it
    model = load_model(source, "causal-lm")
    reader = GGUFReader(Path(source.path) / source.gguf_file)
    stored = {t.name: t for t in reader.tensors}
    for ours, theirs in [(model.model.layers[3].mlp.down_proj.weight, "blk.3.ffn_down.weight"),
                         (model.model.layers[0].self_attn.v_proj.weight, "blk.0.attn_v.weight"),
                         (model.model.embed_tokens.weight, "token_embd.weight")]:
        tensor = stored[theirs]
        expected = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        assert torch.equal(ours.detach(), torch.from_numpy(expected.reshape(ours.shape))), theirs
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    tokenizer = load_tokenizer(source)
    assert tokenizer.chat_template and tokenizer.pad_token == "<|im_end|>"
    assert tokenizer("To be, or not to be")["input_ids"] == [2068, 325, 28, 355, 441, 288, 325]


def test_a_changed_file_converts_again_and_off_bypasses(tmp_path, monkeypatch):
    monkeypatch.setenv("COALORA_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    not_gguf = ModelSource(str(tmp_path))
    assert converted(not_gguf) is not_gguf
    monkeypatch.setenv("COALORA_CACHE", "off")
    source = resolve_model("smollm2")
    assert cache_dir() is None and converted(source) == source


def test_the_entry_follows_the_file(tmp_path):
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    first = cache_entry(tmp_path, file)
    assert cache_entry(tmp_path, file) == first
    os.utime(file, ns=(1, 1))
    assert cache_entry(tmp_path, file) != first
