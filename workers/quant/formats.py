"""One entry point over the code families, so models, caches, the Fisher table and export never ask which family a
setting belongs to: ``nf`` and ``int`` codes go to :mod:`.blockwise` (coalora's double-quantized blocks), llama.cpp
types (``gguf``) to :mod:`.ggml` (ggml's own quantizer). Each family's storage form has ``setting``, ``shape``,
``numel`` and ``nbytes``, and decodes with :func:`dequantize`."""

from __future__ import annotations

from typing import Iterator, Sequence, Union

import torch

from search.space import QuantSetting

from . import blockwise, ggml, gptq

StoredWeight = Union[blockwise.PackedWeight, ggml.GGMLWeight]


def quantize(weight: torch.Tensor, setting: QuantSetting, *, name: str = "weight",
             hessian: torch.Tensor | None = None) -> StoredWeight:
    """``weight`` in the storage form of ``setting``'s family; with ``hessian`` (the input statistics XᵀX/N of the
    matrix) its codes are chosen by GPTQ (:mod:`.gptq`, blockwise families only) instead of round to nearest."""
    if hessian is not None:  # refuses llama.cpp types itself
        return gptq.gptq_quantize(weight, setting, hessian, name=name)
    if setting.family == "gguf":
        return ggml.quantize(weight, setting, name=name)
    return blockwise.quantize(weight, setting, name=name)


def dequantize(stored: StoredWeight, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weights of a stored matrix; into ``out`` (a float32 buffer of at least ``numel`` entries)."""
    if isinstance(stored, ggml.GGMLWeight):
        if out is not None and out.device.type != "cpu":  # ggml decodes on the CPU; the device gets a copy
            return out.view(-1)[: stored.numel].view(stored.shape).copy_(ggml.dequantize(stored))
        return ggml.dequantize(stored, out=out)
    return blockwise.dequantize(stored, out=out)


def fake_quantize(weight: torch.Tensor, setting: QuantSetting, *, name: str = "weight") -> torch.Tensor:
    """dequantize(quantize(W)) with W's shape, dtype and device: what training multiplies with."""
    if setting.family == "gguf":
        return ggml.fake_quantize(weight, setting, name=name).to(weight.device)
    return blockwise.fake_quantize(weight, setting, name=name)


def fake_quantize_each(weight: torch.Tensor, settings: Sequence[QuantSetting], *,
                       name: str = "weight") -> Iterator[torch.Tensor]:
    """:func:`fake_quantize` under each of ``settings`` in turn, sharing what settings of one family share (the
    blockwise family encodes the scales once per block and scale format)."""
    if all(s.family != "gguf" for s in settings):
        yield from blockwise.fake_quantize_each(weight, settings, name=name)
        return
    for setting in settings:
        yield fake_quantize(weight, setting, name=name)


def packed_nbytes(numel: int, setting: QuantSetting) -> int:
    """Exact bytes of a matrix of ``numel`` weights in ``setting``'s storage form."""
    if setting.family == "gguf":
        return ggml.packed_nbytes(numel, setting)
    return blockwise.packed_nbytes(numel, setting)
