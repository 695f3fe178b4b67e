"""The module registry: every target linear layer of a model with (block index, canonical module type, shape).

Everything model-specific (the number of matrices N, table sizes of the configuration encoder, the denominator of
the average bit-width) is derived from here, never from constants (method.md §6 B14).

The official code's two bugs (method.md §3.3, §6 A6) cannot recur by construction: the block index comes from a
named regex group anchored on each architecture's real path (``layers.N`` and ``layer.N``), and module types are
canonical per position, so BERT's attention ``output.dense`` (``attn.o``) and FFN ``output.dense`` (``mlp.down``)
are distinct types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import nn

MODULE_TYPES: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
"""Canonical module types, shared across architectures so one vocabulary serves encoders and decoders."""


@dataclass(frozen=True)
class TargetRule:
    """A target: fully qualified module names matching ``pattern`` (with a ``block`` group) get ``module_type``."""

    pattern: str
    module_type: str

    def __post_init__(self) -> None:
        if self.module_type not in MODULE_TYPES:
            raise ValueError(f"unknown module type {self.module_type!r}; allowed: {list(MODULE_TYPES)}")
        if "(?P<block>" not in self.pattern:
            raise ValueError(f"target pattern {self.pattern!r} needs a (?P<block>\\d+) group")
        re.compile(self.pattern)


_DECODER = r"(?:^|\.)layers\.(?P<block>\d+)\."
_ENCODER = r"(?:^|\.)encoder\.layer\.(?P<block>\d+)\."

DEFAULT_RULES: tuple[TargetRule, ...] = (
    # Llama, Qwen2, Mistral and other decoders with the same module names
    TargetRule(_DECODER + r"self_attn\.q_proj$", "attn.q"),
    TargetRule(_DECODER + r"self_attn\.k_proj$", "attn.k"),
    TargetRule(_DECODER + r"self_attn\.v_proj$", "attn.v"),
    TargetRule(_DECODER + r"self_attn\.o_proj$", "attn.o"),
    TargetRule(_DECODER + r"mlp\.gate_proj$", "mlp.gate"),
    TargetRule(_DECODER + r"mlp\.up_proj$", "mlp.up"),
    TargetRule(_DECODER + r"mlp\.down_proj$", "mlp.down"),
    # BERT, RoBERTa
    TargetRule(_ENCODER + r"attention\.self\.query$", "attn.q"),
    TargetRule(_ENCODER + r"attention\.self\.key$", "attn.k"),
    TargetRule(_ENCODER + r"attention\.self\.value$", "attn.v"),
    TargetRule(_ENCODER + r"attention\.output\.dense$", "attn.o"),
    TargetRule(_ENCODER + r"intermediate\.dense$", "mlp.up"),
    TargetRule(_ENCODER + r"output\.dense$", "mlp.down"),
)


@dataclass(frozen=True)
class TargetMatrix:
    """One quantized matrix. ``shape`` is the weight's (out_features, in_features)."""

    index: int
    name: str
    block: int
    module_type: str
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class ModuleRegistry:
    """The ordered target matrices of one model. Order is the model's module order, which is also the order of a
    whole-model configuration and of its integer encoding."""

    def __init__(self, targets: Sequence[TargetMatrix]):
        if not targets:
            raise ValueError("a registry needs at least one target matrix")
        self._targets = tuple(targets)
        self._by_name = {t.name: t for t in self._targets}
        if len(self._by_name) != len(self._targets):
            raise ValueError("target names must be unique")

    @classmethod
    def from_model(cls, model: nn.Module, rules: Sequence[TargetRule] = DEFAULT_RULES) -> "ModuleRegistry":
        """Find the targets of ``model``. ValueError if none match, naming the architecture, so an unsupported
        model fails before any compute; pass custom ``rules`` for other architectures."""
        compiled = [(re.compile(r.pattern), r.module_type) for r in rules]
        targets: list[TargetMatrix] = []
        for name, module in model.named_modules():
            matches = [(m, t) for rx, t in compiled if (m := rx.search(name))]
            if not matches:
                continue
            if len(matches) > 1:
                raise ValueError(f"module {name!r} matches {len(matches)} target rules; rules must be exclusive")
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target {name!r} is a {type(module).__name__}, not an nn.Linear")
            match, module_type = matches[0]
            shape = (int(module.weight.shape[0]), int(module.weight.shape[1]))
            targets.append(TargetMatrix(len(targets), name, int(match.group("block")), module_type, shape))
        if not targets:
            arch = type(model).__name__
            raise ValueError(
                f"no target linear layers found in {arch}; supported: Llama/Qwen2/Mistral-style decoders and "
                "BERT/RoBERTa encoders (pass custom target rules for other architectures)"
            )
        return cls(targets)

    # ---- lookups --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._targets)

    def __iter__(self) -> Iterator[TargetMatrix]:
        return iter(self._targets)

    def __getitem__(self, index: int) -> TargetMatrix:
        return self._targets[index]

    def get(self, name: str) -> TargetMatrix:
        """The target named ``name``; ValueError naming it if it is not a target."""
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a target matrix of this model ({len(self)} targets)") from None

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._targets]

    @property
    def numels(self) -> list[int]:
        return [t.numel for t in self._targets]

    @property
    def row_lengths(self) -> list[int]:
        """Each target's input features: the length of the rows a llama.cpp type quantizes in blocks."""
        return [t.shape[1] for t in self._targets]

    @property
    def total_numel(self) -> int:
        return sum(self.numels)

    @property
    def n_blocks(self) -> int:
        """Rows of the block-index embedding table: max block index + 1."""
        return max(t.block for t in self._targets) + 1

    @property
    def module_types(self) -> list[str]:
        """The module types present, in canonical order (rows of the module-type embedding table)."""
        present = {t.module_type for t in self._targets}
        return [m for m in MODULE_TYPES if m in present]

    def module_type_ids(self) -> list[int]:
        lookup = {m: i for i, m in enumerate(self.module_types)}
        return [lookup[t.module_type] for t in self._targets]

    def blocks(self) -> list[int]:
        return [t.block for t in self._targets]

    def module(self, model: nn.Module, target: TargetMatrix | str) -> nn.Linear:
        name = target if isinstance(target, str) else target.name
        self.get(name)
        module = model.get_submodule(name)
        assert isinstance(module, nn.Linear)
        return module

    def to_dict(self) -> list[dict]:
        return [
            {"name": t.name, "block": t.block, "module_type": t.module_type, "shape": list(t.shape)}
            for t in self._targets
        ]
