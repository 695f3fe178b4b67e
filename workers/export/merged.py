"""Export one configuration of an ``adapter.kind: lota`` run as a merged integer model: no adapter, no θ, nothing
to run beside the quantized weights.

The directory holds ``quantized_base.safetensors`` (the :mod:`.peft` packed format: every target matrix's codes
moved by its ternary adapter, the configuration's own scales, and μ, one fp32 zero-point shift per second-level
group), ``trained_modules.safetensors`` (a trained task head, if the model has one) and
``quant_configuration.json``. :func:`load_merged_model` decodes both into the original Hugging Face model, which then
computes what the run evaluated, to float rounding. The packed file is the deployable artifact: its bytes are the
configuration's plus μ's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.lota import BlockwiseLoTAModel
from .peft import CONFIGURATION_FILE, QUANTIZED_BASE_FILE, configuration_to_json, load_quantized_base, save_packed

TRAINED_MODULES_FILE = "trained_modules.safetensors"


def export_merged(lota: BlockwiseLoTAModel, configuration: Any, directory: str | Path) -> Path:
    """Write ``configuration``'s merged model (and the trained head) to ``directory`` and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merged = lota.merge(configuration)
    save_packed({name: m.packed for name, m in merged.items()}, directory / QUANTIZED_BASE_FILE,
                shifts={name: m.mu for name, m in merged.items()})
    heads = {f"{module}.{name}": p.detach().contiguous().clone()
             for module in lota.trainable_modules for name, p in lota.model.get_submodule(module).named_parameters()}
    if heads:
        save_file(heads, str(directory / TRAINED_MODULES_FILE))
    (directory / CONFIGURATION_FILE).write_text(json.dumps(configuration_to_json(lota, configuration), indent=1))
    return directory


@torch.no_grad()
def load_merged_model(model: nn.Module, directory: str | Path) -> nn.Module:
    """``model`` (the run's base, as loaded by transformers) with an :func:`export_merged` directory's weights:
    the merged target matrices decoded and the trained head loaded (in place; returned)."""
    directory = Path(directory)
    load_quantized_base(model, directory / QUANTIZED_BASE_FILE)
    heads = directory / TRAINED_MODULES_FILE
    if heads.exists():
        params = dict(model.named_parameters())
        for name, tensor in load_file(str(heads)).items():
            if name not in params or params[name].shape != tensor.shape:
                raise ValueError(f"{heads}: {name} {tuple(tensor.shape)} does not fit the model")
            params[name].copy_(tensor)
    return model
