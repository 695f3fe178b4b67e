"""A configuration of a ``gguf`` run as the two files llama.cpp loads: ``model.gguf`` and ``adapter.gguf``.

``model.gguf`` is the run's base GGUF file with every target matrix replaced by the bytes ggml produced for the
configuration's type (the very bytes CoA-LoRA trained and was scored on, :mod:`workers.quant.ggml`) and every
other tensor (embeddings, norms) copied as it was, with all of the base's metadata (tokenizer, chat template,
hyperparameters). ``general.file_type`` is dropped, since no single type describes a mixed file; llama.cpp then
names the file by its most common tensor type. ``adapter.gguf`` is the LoRA in llama.cpp's adapter layout
(``general.type = adapter``, ``adapter.lora.alpha``, ``<tensor>.lora_a`` of shape r×in and ``.lora_b`` out×r, scale
alpha/r as in PEFT), with θ folded in (A' = M(C)·A, as the PEFT export).

``merge=True`` writes one file instead: each target is W + (alpha/r)·B·A' (the residual the run quantizes, plus the
folded adapter) quantized by ggml to its type, so llama.cpp runs with no adapter matmul. The adapter then goes
through the quantizer too, which costs accuracy: bench/deploy.py measures how much.

One convention has to be undone: llama.cpp's converter stores the query and key projections of a ``llama`` model
with their rows permuted for its rotary layout (``convert_hf_to_gguf.py``, ``LlamaModel.permute``), and
transformers' GGUF loader inverts that when it builds the model coalora trains. ggml quantizes each row on its
own, so permuting the quantized rows back equals quantizing the permuted matrix, and the adapter's B takes the
same row permutation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from search.space import GGUF_TYPES, QuantSetting

from ..adapters.lora import LoRAModel
from ..models import ModelSource
from ..quant import ggml
from ..quant.ggml import GGMLWeight
from .peft import folded_adapter

SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {"llama": ("attn_q", "attn_k")}
"""Architectures coalora can write, with the tensors whose rows llama.cpp's converter permutes."""


@dataclass(frozen=True)
class GGUFExport:
    model: Path
    adapter: Path | None  # None when the adapter was merged into model.gguf
    tensor_types: dict[str, str]  # GGUF tensor name -> type of every target
    target_bytes: int  # bytes of the target tensors' data in model.gguf


class GGUFExportError(ValueError):
    """The run or its model cannot be written as GGUF; the message says why and what would work."""


def base_file(source: ModelSource) -> Path:
    """The GGUF file the run's model came from; an error naming the alternative when it came from elsewhere."""
    if not source.gguf_file:
        raise GGUFExportError(
            f"the run's model ({source.path}) was not loaded from a GGUF file; GGUF export rewrites the base GGUF's "
            "tensors, so point model.name at a .gguf file (e.g. one made by llama.cpp's convert_hf_to_gguf.py) "
            "or export with --format peft")
    return Path(source.path) / source.gguf_file


def open_base(path: Path) -> tuple[gguf.GGUFReader, str]:
    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFExportError(f"{path.name} is a {arch!r} model; coalora writes GGUF for "
                              f"{sorted(SUPPORTED_ARCHITECTURES)} (export with --format peft instead)")
    return reader, arch


def tensor_names(coa: LoRAModel, arch: str, reader: gguf.GGUFReader) -> dict[str, str]:
    """Target name (e.g. ``model.layers.0.self_attn.q_proj``) → GGUF tensor name (``blk.0.attn_q.weight``)."""
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    mapping = gguf.get_tensor_name_map(by_name[arch], coa.registry.n_blocks)
    present = {t.name for t in reader.tensors}
    out = {}
    for name in coa.registry.names:
        mapped = mapping.get_name(name)
        if mapped is None or f"{mapped}.weight" not in present:
            raise GGUFExportError(f"target {name} has no tensor in the base GGUF file (mapped to {mapped!r})")
        out[name] = f"{mapped}.weight"
    return out


def exported_settings(coa: LoRAModel, directory: str | Path, source: ModelSource) -> list[QuantSetting]:
    """The configuration an export wrote (the tensor types in its ``coalora_export.json``), in ``coa``'s registry
    order: what to configure coalora's own model with to compare it against the exported files."""
    names = tensor_names(coa, *reversed(open_base(base_file(source))))
    types = json.loads((Path(directory) / "coalora_export.json").read_text())["tensor_types"]
    return [QuantSetting(types[names[n]]) for n in coa.registry.names]


def write_f32(source: Path, path: Path) -> Path:
    """``source`` with every tensor stored as its F32 values (gguf-py's dequantization): the same weights, which
    llama.cpp then multiplies in F32, without quantizing the activations."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(None, str(reader.fields["general.architecture"].contents()))
    _metadata(reader, writer, skip={"general.file_type"})
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    _write(writer, path)
    return path


def _permutation(arch: str, gguf_name: str, rows: int, reader: gguf.GGUFReader) -> np.ndarray | None:
    """Row order llama.cpp stores ``gguf_name`` in (None: as is): ``LlamaModel.permute`` applied to row indices."""
    kind = gguf_name.split(".")[-2]
    if kind not in SUPPORTED_ARCHITECTURES[arch]:
        return None
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    if kind == "attn_k":
        heads = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: set[str]) -> None:
    """Every key of the base except the writer's own and ``skip``, with its original value types."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in skip:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def _write(writer: gguf.GGUFWriter, path: Path) -> None:
    """The writer's content to ``path`` atomically: a partial file never carries the final name."""
    partial = path.with_name(path.name + ".partial")
    writer.path = partial
    writer.write_header_to_file(partial)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, path)


@torch.no_grad()
def _targets(coa: LoRAModel, settings: list[QuantSetting], merge: bool) -> dict[str, GGMLWeight]:
    """Target name → its stored form: the run's own quantized residual, or (merge) residual + scaled folded
    adapter quantized now."""
    if not merge:
        stored = {layer.name: layer.packed_weight(s) for layer, s in zip(coa.layers, settings)}
    else:
        folded = folded_adapter(coa, settings)
        stored = {}
        for layer, setting in zip(coa.layers, settings):
            a, b = folded[layer.name]
            merged = layer.residual.float() + layer.scaling * (b.float() @ a.float())
            stored[layer.name] = ggml.quantize(merged, setting, name=layer.name)
    for name, weight in stored.items():
        if not isinstance(weight, GGMLWeight):
            raise GGUFExportError(f"{name} is not in a llama.cpp type")
    return stored


def write_model(coa: LoRAModel, settings: list[QuantSetting], reader: gguf.GGUFReader, arch: str,
                names: dict[str, str], path: Path, extra: dict[str, Any],
                merge: bool = False) -> tuple[dict[str, str], int]:
    """model.gguf: the base with each target in its configuration's type (merge: with the adapter folded into
    it). Returns (types, target bytes)."""
    replaced = {names[name]: weight for name, weight in _targets(coa, settings, merge).items()}
    writer = gguf.GGUFWriter(None, arch)
    _metadata(reader, writer, skip={"general.file_type"})
    writer.add_string("coalora.export", json.dumps(extra, sort_keys=True))
    for tensor in reader.tensors:
        if tensor.name not in replaced:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            continue
        stored = replaced[tensor.name]
        expected = [int(d) for d in tensor.shape]  # ggml order: (in, out)
        if expected != [stored.shape[1], stored.shape[0]]:
            raise GGUFExportError(f"{tensor.name}: the base GGUF holds shape {expected[::-1]} (out, in) but the run's "
                                  f"model has {list(stored.shape)}; was the run made from this file?")
        order = _permutation(arch, tensor.name, stored.shape[0], reader)
        data = stored.data if order is None else stored.data[order]
        kind = gguf.GGMLQuantizationType(GGUF_TYPES[stored.setting.code][0])
        writer.add_tensor(tensor.name, np.ascontiguousarray(data), raw_dtype=kind)
    _write(writer, path)
    return ({n: replaced[n].setting.code for n in sorted(replaced)},
            sum(int(w.data.nbytes) for w in replaced.values()))


def write_adapter(coa: LoRAModel, configuration: list[QuantSetting], reader: gguf.GGUFReader, arch: str,
                  names: dict[str, str], path: Path) -> None:
    """adapter.gguf: the configuration's folded LoRA pairs in llama.cpp's adapter layout, float32."""
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(coa.alpha))
    for name, (a, b) in folded_adapter(coa, configuration).items():
        target = names[name]
        b_rows = b.to(torch.float32).numpy()
        order = _permutation(arch, target, b_rows.shape[0], reader)
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(a.to(torch.float32).numpy()))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b_rows if order is None else b_rows[order]))
    _write(writer, path)


def export_gguf(coa: LoRAModel, configuration: Any, source: ModelSource, directory: str | Path,
                extra: dict[str, Any] | None = None, merge: bool = False) -> GGUFExport:
    """Write ``model.gguf`` and ``adapter.gguf`` for ``configuration`` (llama.cpp types) into ``directory``; with
    ``merge``, ``model.gguf`` alone with the adapter merged before quantization."""
    settings = coa.resolve(configuration)
    if not coa.space.is_gguf:
        raise GGUFExportError("this run's space holds coalora's blockwise codes (nf/int), which llama.cpp cannot "
                              "load; export it with --format peft, or run over llama.cpp types (conf/gguf.yaml)")
    if coa.trainable_modules:
        raise GGUFExportError(f"the run also trained {coa.trainable_modules}, which a llama.cpp LoRA file cannot "
                              "carry; export with --format peft")
    reader, arch = open_base(base_file(source))
    names = tensor_names(coa, arch, reader)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    types, nbytes = write_model(coa, settings, reader, arch, names, directory / "model.gguf",
                                {**(extra or {}), "merged": merge}, merge)
    if merge:
        return GGUFExport(directory / "model.gguf", None, types, nbytes)
    write_adapter(coa, settings, reader, arch, names, directory / "adapter.gguf")
    return GGUFExport(directory / "model.gguf", directory / "adapter.gguf", types, nbytes)
