"""The plain-LoRA adapter kind (``adapter.kind: lora``) and the layer every LoRA-family kind is built on
(method.md §3.1): our own module, not PEFT's.

    y = x · W_q(C)ᵀ + bias + s · B · M · A · x,    M = I + γ·U_θ(C),   s = alpha / r

W_q(C) is the active setting's quantized copy of the layer's frozen full-precision weight (of the residual
W − L1·L2 for the SVD/LQ inits, method.md §2.5), produced on demand, so switching configurations re-quantizes
instead of reloading pickled models from disk (method.md §6 B15). What is kept is what a quantized model stores:
packed codes and scales, in a byte-bounded LRU (:class:`~workers.quant.cache.QuantCache`) that one model's layers share. The dense W_q
lives only inside the matmul: decoded into a scratch buffer for the forward and decoded again for the backward
(QLoRA's recompute), so memory grows with the quantized size of the cached settings, not with fp32 copies.
A and B are shared by every configuration; the bias is kept (method.md §6 A7).

:class:`LoRAModel` wraps every registry target of a Hugging Face model in that layer with M = I: one LoRA for
every configuration (Shared-LoRA, coa-no-theta) or for one (QLoRA). CoA-LoRA (:mod:`.coa`) is this model plus θ.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from search.space import QuantSetting, SearchSpace

from ..apply import check_space_fits, resolve_configuration
from ..quant.cache import DEFAULT_CACHE_MB, QuantCache
from ..quant.formats import StoredWeight, dequantize, quantize
from ..registry import ModuleRegistry

Init = Literal["zero_B", "svd_of_W"]
CLASSIFIER_HEADS: tuple[str, ...] = ("classifier", "score")
"""Module names of sequence-classification heads in BERT/RoBERTa (``classifier``) and decoders (``score``)."""


class _QuantizedLinear(torch.autograd.Function):
    """y = x·Ŵᵀ + bias with Ŵ decoded from its packed form into the cache's scratch buffer, in the forward and
    again in the backward: no dense copy of Ŵ outlives the op (the weight and bias are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, packed: StoredWeight,
                cache: QuantCache) -> torch.Tensor:
        ctx.packed, ctx.cache = packed, cache
        weight = _decode(packed, cache, x.device)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight = _decode(ctx.packed, ctx.cache, grad.device)
        return grad.matmul(weight.to(grad.dtype)), None, None, None


def _decode(packed: StoredWeight, cache: QuantCache, device: torch.device) -> torch.Tensor:
    return dequantize(packed, out=cache.scratch(packed.numel, device))


def _stored_on(stored: StoredWeight, device: torch.device) -> StoredWeight:
    """A stored matrix with every tensor on ``device`` (codes keep their dtypes)."""
    moved = {f.name: getattr(stored, f.name).to(device) for f in dataclasses.fields(stored)
             if isinstance(getattr(stored, f.name), torch.Tensor)}
    return dataclasses.replace(stored, **moved)


def truncated_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r SVD of ``weight`` split symmetrically: L1 = U_r·√S_r (m×r), L2 = √S_r·V_rᵀ (r×n)."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


class CoALoRALinear(nn.Module):
    """A frozen target ``nn.Linear`` with a shared LoRA pair (A: r×in, B: out×r) and an optional r×r mixing
    matrix M set per configuration. With no active setting the base is the full-precision weight; with no
    mixing matrix M = I (plain LoRA)."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        *,
        init: Init = "zero_B",
        name: str = "linear",
        cache: QuantCache | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        out_features, in_features = base.weight.shape
        if rank > min(out_features, in_features):
            raise ValueError(f"{name}: rank {rank} exceeds min(out, in) = {min(out_features, in_features)}")
        self.name = name
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.in_features = in_features
        self.out_features = out_features
        # The full-precision weight is a frozen parameter so ``state_dict`` and ``.to()`` treat it like the
        # original; ``residual`` is what gets quantized (W itself, or W − L1·L2 after an SVD/LQ init).
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.register_buffer("residual", self.weight.detach(), persistent=False)  # shares W's storage
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=base.weight.device))
        self.setting: QuantSetting | None = None
        self.mixing: torch.Tensor | None = None
        self.hessian: torch.Tensor | None = None  # inputs' XᵀX/N: set, codes are chosen by GPTQ (quant.method)
        self.pinned: dict[QuantSetting, StoredWeight] = {}  # settings whose codes were chosen for this adapter
        self.adapter_enabled = True
        self.cache = QuantCache() if cache is None else cache  # CoAModel passes one cache to all its layers
        self.reset_lora(init, generator)

    # ---- initialisation -----------------------------------------------------------------------------------
    def reset_lora(self, init: Init = "zero_B", generator: torch.Generator | None = None) -> None:
        """``zero_B``: A Kaiming-uniform (a=√5, PEFT's default), B = 0, base = quant(W).
        ``svd_of_W``: L1·L2 = rank-r SVD of W, A = L2/√s, B = L1/√s, base = quant(W − L1·L2) for every C
        (method.md §2.5: consistent because L1·L2 does not depend on C)."""
        if init == "zero_B":
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) on a (r, in) matrix
            with torch.no_grad():
                self.lora_A.copy_(
                    torch.rand(self.lora_A.shape, generator=generator, device=self.lora_A.device) * 2 * bound - bound
                )
                self.lora_B.zero_()
            self.residual = self.weight.detach()  # no copy: the residual is W itself
            self.cache.drop(self.name)
        elif init == "svd_of_W":
            l1, l2 = truncated_svd_factors(self.weight, self.rank)
            self.set_decomposition(l1, l2)
        else:
            raise ValueError(f"unknown LoRA init {init!r}; allowed: 'zero_B', 'svd_of_W'")

    def set_decomposition(self, l1: torch.Tensor, l2: torch.Tensor) -> None:
        """Adopt W ≈ Q + L1·L2: A = L2/√s, B = L1/√s (so s·B·A = L1·L2) and quantize the residual W − L1·L2."""
        root = math.sqrt(self.scaling)
        with torch.no_grad():
            self.lora_A.copy_(l2 / root)
            self.lora_B.copy_(l1 / root)
        self.set_residual(self.weight.detach().float() - l1 @ l2)

    def set_residual(self, residual: torch.Tensor) -> None:
        self.residual = residual.detach().to(self.weight.dtype).clone()
        self.pinned.clear()
        self.cache.drop(self.name)

    def set_hessian(self, hessian: torch.Tensor | None) -> None:
        """Choose codes by GPTQ under ``hessian`` (the layer's input statistics), or by round to nearest (None)."""
        self.hessian = hessian
        self.pinned.clear()
        self.cache.drop(self.name)

    def pin(self, setting: QuantSetting, stored: StoredWeight) -> None:
        """Serve ``stored`` as ``setting``'s codes instead of quantizing the residual: codes chosen together with
        this layer's adapter (ProjQ shapes them for it), so they cannot be re-derived from W alone. A new residual
        or Hessian unpins every setting."""
        self.pinned[setting] = stored

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "CoALoRALinear":
        """``.to()`` / ``.cuda()`` move W, the bias and the adapter as for any module; what the layer derives from W
        follows it: a residual that is W itself stays the same tensor (one copy, not two), a residual W − L moves,
        the Hessian and pinned codes move to W's new device, and cached codes made on the old one are dropped."""
        tied = self.residual.untyped_storage().data_ptr() == self.weight.untyped_storage().data_ptr()
        residual = self.residual
        del self.residual  # a buffer: moved below by hand, so a tied one is not copied on its own
        super()._apply(fn, recurse)
        self.register_buffer("residual", self.weight.detach() if tied else fn(residual), persistent=False)
        device = self.weight.device
        self.hessian = None if self.hessian is None else self.hessian.to(device)
        self.pinned = {s: _stored_on(p, device) for s, p in self.pinned.items()}
        self.cache.drop(self.name)
        return self

    # ---- configuration ------------------------------------------------------------------------------------
    def packed_weight(self, setting: QuantSetting) -> StoredWeight:
        """The residual quantized under ``setting`` (its pinned codes if it has some), from the cache or now."""
        if setting in self.pinned:
            return self.pinned[setting]
        return self.cache.get(self.name, setting,
                              lambda: quantize(self.residual, setting, name=self.name, hessian=self.hessian))

    def quantized_weight(self, setting: QuantSetting | None = None) -> torch.Tensor:
        """Dense W_q for ``setting`` (default: the active one), a new tensor; the unquantized residual when there
        is none. The forward never materialises this; export and tests do."""
        setting = self.setting if setting is None else setting
        if setting is None:
            return self.residual
        return dequantize(self.packed_weight(setting))

    def folded_A(self) -> torch.Tensor:
        """A' = M·A: the plain-LoRA A that reproduces this layer under the current mixing matrix."""
        if self.mixing is None:
            return self.lora_A.detach().clone()
        return (self.mixing.detach().to(self.lora_A.dtype) @ self.lora_A.detach()).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.setting is None:
            y = F.linear(x, self.residual.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        else:
            y = _QuantizedLinear.apply(x, self.bias, self.packed_weight(self.setting), self.cache)
        if not self.adapter_enabled:
            return y
        h = F.linear(x, self.lora_A.to(x.dtype))
        if self.mixing is not None:
            h = F.linear(h, self.mixing.to(h.dtype))  # h·Mᵀ, i.e. M·(A·x) per row
        return y + self.scaling * F.linear(h, self.lora_B.to(h.dtype))

    def extra_repr(self) -> str:
        return f"{self.name}: in={self.in_features}, out={self.out_features}, r={self.rank}, s={self.scaling:g}"


def wrap_targets(
    model: nn.Module,
    registry: ModuleRegistry,
    rank: int,
    alpha: float,
    *,
    init: Init = "zero_B",
    cache: QuantCache | None = None,
    seed: int = 0,
    layer: Callable[..., CoALoRALinear] = CoALoRALinear,
) -> list[CoALoRALinear]:
    """Replace every registry target of ``model`` in place by a ``layer`` (:class:`CoALoRALinear` or a kind's
    subclass of it; registry order), all sharing ``cache`` (a new default-size one if None). A's random init comes
    from one generator seeded with ``seed``, drawn in registry order."""
    generator = torch.Generator().manual_seed(seed)
    cache = QuantCache() if cache is None else cache
    layers = []
    for target in registry:
        base = registry.module(model, target)
        wrapped = layer(base, rank, alpha, init=init, name=target.name, cache=cache, generator=generator)
        parent_name, _, child = target.name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        layers.append(wrapped)
    return layers


class LoRAModel(nn.Module):
    """A whole model with every registry target wrapped in :class:`CoALoRALinear` and M = I: the frozen base, the
    LoRA pairs and trainable extra modules such as the classification head.

    Call ``model(configuration, **batch)``: it activates ``configuration`` (list of settings in registry order, or
    None for the unquantized base) on every layer and runs the wrapped model; switching configurations costs no
    model reload (method.md §3.5, §6 B15). ``layer`` builds each wrapped target: :class:`CoALoRALinear`, or a kind's
    subclass of it (LoTA's ternary layer)."""

    def __init__(
        self,
        model: nn.Module,
        space: SearchSpace,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        init: Init = "zero_B",
        trainable_modules: Sequence[str] | None = None,
        cache_mb: float = DEFAULT_CACHE_MB,
        seed: int = 0,
        registry: ModuleRegistry | None = None,
        layer: Callable[..., CoALoRALinear] = CoALoRALinear,
    ):
        super().__init__()
        self.registry = registry or ModuleRegistry.from_model(model)
        check_space_fits(self.registry, space)
        self.space = space
        self.rank = rank
        self.alpha = float(alpha)
        self.init = init
        self.seed = seed
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.cache = QuantCache(cache_mb)  # the quantized weights of every layer, in one byte budget
        self.layers = wrap_targets(model, self.registry, rank, alpha, init=init, cache=self.cache, seed=seed,
                                   layer=layer)
        if trainable_modules is None:
            trainable_modules = [n for n in CLASSIFIER_HEADS if has_submodule(model, n)]
        self.trainable_modules = list(trainable_modules)
        for name in self.trainable_modules:
            model.get_submodule(name).requires_grad_(True)
        self.configuration: list[QuantSetting] | None = None

    # ---- configuration ------------------------------------------------------------------------------------
    def resolve(self, configuration: Any) -> list[QuantSetting]:
        return resolve_configuration(self.registry, configuration, self.space)

    def mixing_matrices(self, configuration: Sequence[QuantSetting]) -> torch.Tensor | None:
        """(N, r, r) M matrices of ``configuration``; None here (M = I), θ's output in :class:`~.coa.CoAModel`."""
        return None

    def set_configuration(self, configuration: Any | None, mixing: torch.Tensor | None = None) -> None:
        """Activate ``configuration`` on every wrapped layer (None: unquantized) with the given M matrices (None:
        :meth:`mixing_matrices`'s)."""
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
        """Trainable parameters that take no weight decay: every bias."""
        return {n for n, p in self.named_parameters() if p.requires_grad and n.endswith("bias")}


def has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
