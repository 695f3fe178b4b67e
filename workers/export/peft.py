"""Export one configuration's adapter as a standard PEFT LoRA directory (method.md §3.1 "deployment").

M is folded into A (A' = M·A), so the served model is ordinary LoRA with no θ at run time. The directory holds
``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's key names, any trained head as
``modules_to_save``, ``quant_configuration.json`` (target name → setting) and ``quantized_base.safetensors``: the
target matrices exactly as coalora evaluated them, in their packed storage form (codes, scale codes, second-level
scales, offset: the configuration's bytes), which :func:`load_quantized_base` decodes into the original model.
That file is what makes the export self-contained: the codes depend on how they were chosen (round to nearest, or
GPTQ under the run's calibration statistics, ``quant.method``) and on the init (quant_c of W, or of W − L1·L2
after an SVD/LQ init), none of which a consumer could redo from the configuration alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from search.space import QuantSetting

from ..adapters.lora import LoRAModel
from ..quant.blockwise import PackedWeight, dequantize, dequantize_shifted
from ..quant.files import load_tagged, save_tagged

CONFIGURATION_FILE = "quant_configuration.json"
QUANTIZED_BASE_FILE = "quantized_base.safetensors"
PACKED_FORMAT = "coalora-packed"
PEFT_PREFIX = "base_model.model."


@torch.no_grad()
def folded_adapter(coa: LoRAModel, configuration: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Target name → (A' = M(C)·A, B) for ``configuration``: one batched θ call, then one r×r matmul per
    matrix. This is all it takes to serve a new configuration."""
    settings = coa.resolve(configuration)
    mixing = coa.mixing_matrices(settings)
    out = {}
    for i, layer in enumerate(coa.layers):
        a = layer.lora_A.detach()
        out[layer.name] = ((mixing[i].to(a.dtype) @ a) if mixing is not None else a.clone(), layer.lora_B.detach())
    return out


@torch.no_grad()
def quantized_base_weights(coa: LoRAModel, configuration: Any) -> dict[str, torch.Tensor]:
    """``<target>.weight`` → its fake-quantized base under ``configuration``, to load into the original model."""
    settings = coa.resolve(configuration)
    return {
        f"{layer.name}.weight": layer.quantized_weight(s).detach().clone() for layer, s in zip(coa.layers, settings)
    }


def save_quantized_base(coa: LoRAModel, configuration: Any, path: str | Path) -> Path:
    """The configuration's target matrices in packed form, as the adapter was trained on them
    (:func:`save_packed`)."""
    matrices = {}
    for layer, setting in zip(coa.layers, coa.resolve(configuration)):
        packed = layer.packed_weight(setting)
        if not isinstance(packed, PackedWeight):
            raise ValueError(f"{layer.name}: {setting.code} is a llama.cpp type; export it with --format gguf")
        matrices[layer.name] = packed
    return save_packed(matrices, path)


def save_packed(matrices: Mapping[str, PackedWeight], path: str | Path,
                shifts: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Packed matrices (``NAME.codes``, ``.scale_codes``, ``.scale2``, ``.offset``; settings, shapes and dtypes in
    the metadata), written atomically; with ``shifts``, each int matrix's zero-point shift per second-level group
    (``NAME.mu``: LoTA-QAF's merged remainder, :func:`~workers.quant.blockwise.dequantize_shifted`)."""
    tensors, layout = {}, {}
    for name, packed in matrices.items():
        tensors.update({f"{name}.{part}": t for part, t in packed.tensors().items()})
        layout[name] = {"setting": packed.setting.fields(), "shape": list(packed.shape),
                        "dtype": str(packed.dtype).removeprefix("torch.")}
        if shifts is not None:
            tensors[f"{name}.mu"] = shifts[name]
            layout[name]["zero_shift"] = True
    return save_tagged(tensors, layout, PACKED_FORMAT, path)


@torch.no_grad()
def load_quantized_base(model: nn.Module, path: str | Path) -> nn.Module:
    """Decode a :func:`save_packed` file into ``model``'s target weights (in place; returned)."""
    layout, tensors = load_tagged(path, PACKED_FORMAT, "a coalora quantized base")
    for name, spec in layout.items():
        parts = {part: tensors[f"{name}.{part}"] for part in ("codes", "scale_codes", "scale2", "offset")}
        packed = PackedWeight(setting=QuantSetting(**spec["setting"]), shape=tuple(spec["shape"]),
                              dtype=getattr(torch, spec["dtype"]), **parts)
        weight = model.get_submodule(name).weight
        if tuple(weight.shape) != packed.shape:
            raise ValueError(f"{path}: {name} is {packed.shape} there, {tuple(weight.shape)} in the model")
        dense = dequantize_shifted(packed, tensors[f"{name}.mu"]) if spec.get("zero_shift") else dequantize(packed)
        weight.copy_(dense.to(weight.dtype))
    return model


def configuration_to_json(coa: LoRAModel, configuration: Any) -> dict[str, dict[str, Any]]:
    return {name: s.fields() for name, s in zip(coa.registry.names, coa.resolve(configuration))}


def configuration_from_json(data: dict[str, dict[str, Any]]) -> dict[str, QuantSetting]:
    return {name: QuantSetting(**fields) for name, fields in data.items()}


def export_adapter(coa: LoRAModel, configuration: Any, directory: str | Path) -> Path:
    """Write the PEFT adapter of ``configuration`` to ``directory`` and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in folded_adapter(coa, configuration).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous().clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous().clone()
    for module in coa.trainable_modules:
        for pname, p in coa.model.get_submodule(module).named_parameters():
            tensors[f"{PEFT_PREFIX}{module}.{pname}"] = p.detach().contiguous().clone()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    LoraConfig(
        r=coa.rank,
        lora_alpha=coa.alpha,
        lora_dropout=0.0,
        target_modules=coa.registry.names,
        modules_to_save=coa.trainable_modules or None,
        task_type=_task_type(coa),
        bias="none",
    ).save_pretrained(str(directory))
    (directory / CONFIGURATION_FILE).write_text(json.dumps(configuration_to_json(coa, configuration), indent=1))
    save_quantized_base(coa, configuration, directory / QUANTIZED_BASE_FILE)
    return directory


def _task_type(coa: LoRAModel) -> str | None:
    name = type(coa.model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None
