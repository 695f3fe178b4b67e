"""A whole Hugging Face model with every registry target wrapped in :class:`CoALoRALinear`, plus θ.

One model instance holds the full-precision weights, the shared LoRA pairs, θ and any extra trainable head; a
configuration is switched by setting each layer's active setting and its M (one batched θ call), so K
configurations per step cost K forward/backward passes and no model reloads (method.md §3.5, §6 B15, B16).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from search.space import QuantSetting, SearchSpace

from .apply import check_space_fits, resolve_configuration
from .encoder import HIDDEN_DIM, ConfigurationEncoder, encode_settings, no_decay_parameter_names
from .lora import DEFAULT_CACHE_MB, CoALoRALinear, Init, QuantCache
from .registry import ModuleRegistry

FIT_LR = 1e-2
"""Adam's rate when θ is fitted to given mixing matrices (:meth:`CoAModel.fit_encoder`): a regression of a small MLP
on a few thousand r×r targets, far from the task's rates."""
CLASSIFIER_HEADS: tuple[str, ...] = ("classifier", "score")
"""Module names of sequence-classification heads in BERT/RoBERTa (``classifier``) and decoders (``score``)."""


def wrap_targets(
    model: nn.Module,
    registry: ModuleRegistry,
    rank: int,
    alpha: float,
    *,
    init: Init = "zero_B",
    cache: QuantCache | None = None,
    seed: int = 0,
) -> list[CoALoRALinear]:
    """Replace every registry target of ``model`` in place by a :class:`CoALoRALinear` (registry order), all
    sharing ``cache`` (a new default-size one if None). A's random init comes from one generator seeded with
    ``seed``, drawn in registry order."""
    generator = torch.Generator().manual_seed(seed)
    cache = QuantCache() if cache is None else cache
    layers = []
    for target in registry:
        base = registry.module(model, target)
        layer = CoALoRALinear(
            base, rank, alpha, init=init, name=target.name, cache=cache, generator=generator,
        )
        parent_name, _, child = target.name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers.append(layer)
    return layers


class CoAModel(nn.Module):
    """The trainable system: base model (frozen, targets wrapped), θ (optional: ``use_encoder=False`` is plain
    shared LoRA, M = I) and trainable extra modules such as the classification head.

    Call ``model(configuration, **batch)``: it activates ``configuration`` (list of settings in registry order,
    or None for the unquantized base), computes all M in one θ call and runs the wrapped model.

    ``reference`` (a configuration, one setting for every matrix, or None) anchors θ: M(C) = I + γ·(U(C) −
    U(reference)), so the reference maps to M = I exactly and only differences between configurations move M.
    Without it, θ's output bias and every other configuration-independent part of U rescale all adapters alike, a
    change Shared-LoRA can make as well."""

    def __init__(
        self,
        model: nn.Module,
        space: SearchSpace,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        init: Init = "zero_B",
        use_encoder: bool = True,
        trainable_modules: Sequence[str] | None = None,
        cache_mb: float = DEFAULT_CACHE_MB,
        seed: int = 0,
        registry: ModuleRegistry | None = None,
        reference: Sequence[QuantSetting] | QuantSetting | None = None,
        encoder_hidden: int = HIDDEN_DIM,
    ):
        super().__init__()
        self.registry = registry or ModuleRegistry.from_model(model)
        check_space_fits(self.registry, space)
        self.space = space
        self.rank = rank
        self.alpha = float(alpha)
        self.init = init
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.cache = QuantCache(cache_mb)  # the quantized weights of every layer, in one byte budget
        self.layers = wrap_targets(model, self.registry, rank, alpha, init=init, cache=self.cache, seed=seed)
        self.encoder = (
            ConfigurationEncoder.for_model(space, self.registry, rank, hidden=encoder_hidden,
                                           generator=torch.Generator().manual_seed(seed + 1))
            if use_encoder
            else None
        )
        if trainable_modules is None:
            trainable_modules = [n for n in CLASSIFIER_HEADS if has_submodule(model, n)]
        self.trainable_modules = list(trainable_modules)
        for name in self.trainable_modules:
            model.get_submodule(name).requires_grad_(True)
        self.register_buffer("block_ids", torch.tensor(self.registry.blocks(), dtype=torch.long), persistent=False)
        self.register_buffer(
            "type_ids", torch.tensor(self.registry.module_type_ids(), dtype=torch.long), persistent=False
        )
        self.configuration: list[QuantSetting] | None = None
        self.reference: list[QuantSetting] | None = None
        self.register_buffer("reference_idx", torch.zeros(0, dtype=torch.long), persistent=False)
        if reference is not None and self.encoder is not None:
            uniform = isinstance(reference, QuantSetting)
            self.reference = self.resolve([reference] * len(self.registry) if uniform else reference)
            self.reference_idx = encode_settings(space, self.reference, self.registry.names)

    # ---- configuration ------------------------------------------------------------------------------------
    def resolve(self, configuration: Any) -> list[QuantSetting]:
        return resolve_configuration(self.registry, configuration, self.space)

    def mixing_matrices(self, configuration: Sequence[QuantSetting]) -> torch.Tensor | None:
        """(N, r, r) M matrices of ``configuration`` in one batched θ call; None without θ."""
        if self.encoder is None:
            return None
        idx = encode_settings(self.space, configuration, self.registry.names).to(self.block_ids.device)
        if self.reference is None:
            return self.encoder(idx, self.block_ids, self.type_ids)
        n, ref = len(idx), self.reference_idx
        both = self.encoder(torch.cat([idx, ref]), self.block_ids.repeat(2), self.type_ids.repeat(2))
        same = (idx == ref).all(-1).view(n, 1, 1)  # exactly I on the reference's own settings, not merely ≈ I
        eye = torch.eye(self.rank, dtype=both.dtype, device=both.device)
        return torch.where(same, eye, both[:n] - both[n:] + eye)

    def set_configuration(self, configuration: Any | None, mixing: torch.Tensor | None = None) -> None:
        """Activate ``configuration`` on every wrapped layer (None: unquantized) with the given M matrices (None:
        computed by θ if there is one, else M = I)."""
        settings = None if configuration is None else self.resolve(configuration)
        if mixing is None and settings is not None:
            mixing = self.mixing_matrices(settings)
        for i, layer in enumerate(self.layers):
            layer.setting = None if settings is None else settings[i]
            layer.mixing = None if mixing is None else mixing[i]
        self.configuration = settings

    def forward(self, configuration: Any | None, **batch: Any) -> Any:
        self.set_configuration(configuration)
        return self.model(**batch)

    def fit_encoder(self, configurations: Sequence[Any], targets: torch.Tensor, weights: torch.Tensor, *,
                    steps: int, lr: float = FIT_LR, seed: int = 0) -> float:
        """Start θ from ``seed``'s draw and fit it by Adam so that M(configuration k) of matrix n approaches
        ``targets[k, n]`` (an r×r matrix), each entry's squared error weighted by ``weights[k, n]``; a warm start
        for θ from corrections computed in closed form (``adapter.init: projq-shared``). Returns the final
        weighted error relative to M = I's (1.0: θ learned nothing; 0: exact)."""
        if self.encoder is None:
            raise ValueError("this model has no configuration encoder to fit")
        settings = [self.resolve(c) for c in configurations]
        self.encoder.reset_parameters(torch.Generator().manual_seed(seed + 1))
        optimizer = torch.optim.Adam(self.encoder.parameters(), lr=lr)
        eye = torch.eye(self.rank)
        baseline = float((weights * (targets - eye).square()).sum())
        if baseline == 0.0:
            return 0.0
        loss = torch.tensor(baseline)
        for _ in range(steps):
            mixing = torch.stack([self.mixing_matrices(s) for s in settings])
            loss = (weights * (mixing - targets).square()).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            mixing = torch.stack([self.mixing_matrices(s) for s in settings])
            return float((weights * (mixing - targets).square()).sum()) / baseline

    def set_calibration(self, hessians: Mapping[str, torch.Tensor] | None) -> None:
        """GPTQ codes under each target's input statistics (:mod:`workers.calibration`), or round to nearest."""
        for layer in self.layers:
            layer.set_hessian(None if hessians is None else hessians[layer.name])

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Within the block every layer is its quantized base alone: the no-adapter baseline."""
        for layer in self.layers:
            layer.adapter_enabled = False
        try:
            yield
        finally:
            for layer in self.layers:
                layer.adapter_enabled = True

    # ---- parameters ---------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of every trainable tensor (LoRA pairs, θ, heads), keyed by parameter name."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Strict: a missing or unexpected key is an error (method.md §6 B22)."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise ValueError(f"trainable state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def no_decay_names(self) -> set[str]:
        """Trainable parameters that take no weight decay: θ's γ, LayerNorm and embeddings, and every bias."""
        names = no_decay_parameter_names(self.encoder, "encoder.") if self.encoder is not None else set()
        return names | {n for n, p in self.named_parameters() if p.requires_grad and n.endswith("bias")}


@torch.no_grad()
def theta_spread(model: CoAModel, configurations: Sequence[Any]) -> dict[str, float]:
    """How configuration-specific θ's output is over ``configurations`` (RMS over matrices, Frobenius norms):
    ``theta_common`` = ‖M̄ − I‖ (what every configuration gets alike, a rescaling Shared-LoRA could learn too) and
    ``theta_spread`` = ‖M_k − M̄‖ (the configuration-dependent part CoA-LoRA exists for). Zeros without θ."""
    if model.encoder is None or not configurations:
        return {"theta_common": 0.0, "theta_spread": 0.0}
    ms = torch.stack([model.mixing_matrices(model.resolve(c)) for c in configurations])  # (K, N, r, r)
    mean = ms.mean(0)
    eye = torch.eye(model.rank, dtype=ms.dtype, device=ms.device)
    return {"theta_common": float((mean - eye).square().sum((-2, -1)).mean().sqrt()),
            "theta_spread": float((ms - mean).square().sum((-2, -1)).mean().sqrt())}


def has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
