"""Apply a whole-model quantization configuration to a model and measure it.

A configuration is given as one :class:`QuantSetting` per target (registry order), as a mapping from target name to
setting, or as its integer encoding. It is validated in full (length, names, every value inside the space) before
any matrix is touched, and :func:`applied_configuration` restores every weight on exit or on error, so a failure
leaves the model exactly as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from search.space import QuantSetting, SearchSpace

from .quant.formats import StoredWeight, dequantize, quantize
from .registry import ModuleRegistry

Configuration = Union[Sequence[QuantSetting], Mapping[str, QuantSetting], np.ndarray]


def resolve_configuration(
    registry: ModuleRegistry, configuration: Configuration, space: SearchSpace | None = None
) -> list[QuantSetting]:
    """One validated setting per target in registry order. ValueError names the matrix and the field at fault."""
    if isinstance(configuration, np.ndarray):
        if space is None:
            raise ValueError("an encoded configuration needs the space it was encoded in")
        settings = space.decode(configuration)
    elif isinstance(configuration, Mapping):
        for name in configuration:
            registry.get(name)
        missing = [n for n in registry.names if n not in configuration]
        if missing:
            raise ValueError(f"configuration has no setting for {len(missing)} target(s), e.g. {missing[0]!r}")
        settings = [configuration[n] for n in registry.names]
    else:
        settings = list(configuration)
    if len(settings) != len(registry):
        raise ValueError(f"configuration has {len(settings)} settings but the model has {len(registry)} targets")
    for target, setting in zip(registry, settings):
        if not isinstance(setting, QuantSetting):
            raise ValueError(f"{target.name}: expected a QuantSetting, got {type(setting).__name__}")
        if space is not None:
            space.validate_setting(setting, matrix=target.name)
        if target.shape[1] % setting.row_multiple:
            raise ValueError(f"{target.name} has rows of {target.shape[1]} weights (input features), but {setting} "
                             f"quantizes rows in blocks of {setting.row_multiple}: choose another type for it")
    return settings


def check_space_fits(registry: ModuleRegistry, space: SearchSpace) -> None:
    """ValueError, before any compute, when a target matrix can take no setting of the space: llama.cpp types
    quantize each row in blocks and never pad, so a matrix takes a type only when its row length is a multiple of
    the type's block. A matrix that fits some types is searched over those (:meth:`SearchSpace.allowed`)."""
    stuck = [t for t, ok in zip(registry, space.allowed(registry.row_lengths).any(axis=1)) if not ok]
    if stuck:
        t = stuck[0]
        blocks = sorted({s.row_multiple for s in space.settings})
        raise ValueError(
            f"{t.name} has rows of {t.shape[1]} weights (input features), which no type of this space fits "
            f"(their blocks: {blocks} weights); {len(stuck)} target(s) are affected. Add a 32-weight type such as "
            "q8_0 or q4_0 (see conf/space/gguf.yaml)"
        )


def uniform_configuration(registry: ModuleRegistry, setting: QuantSetting) -> list[QuantSetting]:
    return [setting] * len(registry)


@dataclass(frozen=True)
class ConfigurationReport:
    """What a configuration costs on this model: the paper's average bit-width (target matrices only, no padding
    or offsets) and the bytes its packed form actually holds."""

    average_bits: float
    packed_bytes: int
    full_precision_bytes: int  # the same matrices in fp16, for scale
    per_matrix_bytes: dict[str, int]


def quantize_configuration(
    model: nn.Module, registry: ModuleRegistry, configuration: Configuration, space: SearchSpace | None = None
) -> tuple[dict[str, StoredWeight], ConfigurationReport]:
    """Pack every target matrix under its setting. The model is not modified."""
    settings = resolve_configuration(registry, configuration, space)
    packed = {
        t.name: quantize(registry.module(model, t).weight, s, name=t.name) for t, s in zip(registry, settings)
    }
    per_matrix = {name: p.nbytes for name, p in packed.items()}
    numels = registry.numels
    bits = float(np.dot(numels, [s.bits_per_param for s in settings]) / sum(numels))
    report = ConfigurationReport(bits, sum(per_matrix.values()), 2 * sum(numels), per_matrix)
    return packed, report


@contextmanager
def applied_configuration(
    model: nn.Module, registry: ModuleRegistry, configuration: Configuration, space: SearchSpace | None = None
) -> Iterator[ConfigurationReport]:
    """Within the block the model's target weights are their quantized-dequantized values; afterwards (or after
    any error) they are the original weights again, bit for bit."""
    packed, report = quantize_configuration(model, registry, configuration, space)
    originals: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, p in packed.items():
                weight = registry.module(model, name).weight
                originals[name] = weight.detach().clone()
                weight.copy_(dequantize(p).to(weight.device))
        yield report
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                registry.module(model, name).weight.copy_(original)
