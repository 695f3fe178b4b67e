"""What one worker holds and does: a model replica with its data, running training shards, configuration scoring,
evaluation and sensitivity (cost-table) shards for the driver.

Every method is a pure function of its arguments and the worker's fixed set-up (model, data, seed): the trainable
state travels with each call. That is what makes a retried task (after a worker process died) return exactly what
the first attempt would have, and lets the driver run the same code in-process or in Ray actors
(``workers/actor.py``) with identical numbers. Models stay in eval mode (no dropout) for the same reason.
"""

from __future__ import annotations

import copy
import os
import signal
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from search.space import SearchSpace

from .allocator import pin_mmap_threshold
from .baselines import compensation_error, plain_lora
from .calibration import coa_covariances
from .adapters.coa import CoAModel, theta_spread
from .adapters.lora import LoRAModel
from .adapters.lota import BlockwiseLoTAModel
from .data import DataPlan, DataSpec, on_device
from .fisher import layer_fisher, setting_costs
from .init.lq import SHARED_LQ_INIT, apply_shared_lq
from .init.projq import SHARED_INIT, apply_shared_init
from .quant.cache import DEFAULT_CACHE_MB, merge_cache_stats
from .models import quiet_transformers
from .tasks import Task, build_source_task, evaluate, evaluate_examples
from .training import compute_gradients

METHOD_MODELS = ("main", "shared", "bare")
"""Replicas a worker holds, over one frozen base each: the run's own adapter (``adapter.kind``: CoA-LoRA with θ, or
a plain LoRA); plain LoRA with the run's init (Shared-LoRA and the coa-no-theta ablation); and, when the init
changes what is quantized (``svd_of_W`` and ``lq-shared`` quantize W − L), a zero-B replica whose base is quant(W)
itself, for the no-adapter baseline."""
ADAPTER_KINDS: tuple[str, ...] = ("coa", "lora", "lota")
"""``adapter.kind``: the configuration-aware LoRA (:mod:`workers.adapters.coa`), one plain LoRA for every
configuration (:mod:`workers.adapters.lora`), or LoTA-QAF's ternary factors over a space of int codes
(:mod:`workers.adapters.lota.blockwise`)."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build itself; plain data so it ships to a Ray actor unchanged."""

    model: str
    data: dict[str, Any]  # the source and its reading: {"spec": DataSpec fields, "plan": DataPlan fields}
    space: dict[str, list[Any]]
    rank: int
    alpha: float
    init: str
    seed: int
    max_length: int
    train_examples: int
    val_examples: int
    score_examples: int
    batch_size: int
    fisher_examples: int
    cost_sample: int = 0  # entries per matrix for the cost estimate (0: exact); see fisher.setting_costs
    methods: tuple[str, ...] = ("main",)
    kind: str = "coa"  # adapter.kind of the main replica (ADAPTER_KINDS)
    omega: float | dict[int, float] = 0.75  # kind lota: the threshold ω as a fraction of the rank (or per code width)
    threads: int = 1
    reference: str = "none"  # "most_precise": θ maps the space's most precise configuration to M = I
    encoder_hidden: int = 128
    cache_mb: float = DEFAULT_CACHE_MB  # each replica's quantized-weight cache (workers.quant.cache.QuantCache)
    low_memory: bool = False  # pin glibc's mmap threshold (workers/allocator.py): less memory, slower steps
    preload: str | None = None  # the allocator library the Ray actors start with (LD_PRELOAD; None: the C library's)
    quant_method: str = "rtn"  # "gptq": codes chosen under each matrix's input statistics (workers/calibration.py)
    calibration_examples: int = 128
    prefit_steps: int = 0  # projq-shared: Adam steps fitting θ to the per-configuration corrections (0: none)
    init_iterations: int = 10  # lq-shared: alternations of the shared decomposition (workers/init/lq.py)
    split_seed: int | None = None  # which examples are held out (None: seed); seed alone then sets the training order
    device: str = "cpu"  # where the replicas, their quantized-weight caches and the kernels live ("cuda": a GPU)

    def source(self) -> tuple[DataSpec, DataPlan]:
        """The data source (a user's or a packaged corpus) and how to read it."""
        return DataSpec.from_dict(self.data["spec"]), DataPlan.from_dict(self.data["plan"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_task(spec: WorkerSpec) -> Task:
    return build_source_task(
        spec.model, *spec.source(), n_train=spec.train_examples, n_validation=spec.val_examples + spec.score_examples,
        batch_size=spec.batch_size, max_length=spec.max_length, seed=spec.seed, split_seed=spec.split_seed,
    )


class Worker:
    """A model replica plus its data. ``state`` arguments are trainable-state dicts
    (see :class:`~workers.adapters.lora.LoRAModel`)."""

    def __init__(self, spec: WorkerSpec):
        if spec.quant_method not in ("rtn", "gptq"):
            raise ValueError(f"quant_method must be 'rtn' or 'gptq', got {spec.quant_method!r}")
        if spec.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind must be one of {list(ADAPTER_KINDS)}, got {spec.kind!r}")
        self.device = worker_device(spec.device)
        torch.set_num_threads(max(1, spec.threads))
        if spec.low_memory:
            pin_mmap_threshold()
        torch.manual_seed(spec.seed)
        quiet_transformers()
        self.spec = spec
        self.space = SearchSpace.from_dict(spec.space)
        task = build_task(spec)
        self.kind = task.kind
        self.collate = task.train_loader.collate_fn
        self.train_items = list(task.train_loader.dataset)
        held_out = list(task.validation_loader.dataset)
        # the scoring subset is disjoint from the validation set used for final numbers
        self.score_batches = self._batches(held_out[: spec.score_examples])
        self.val_batches = self._batches(held_out[spec.score_examples :])
        unknown = set(spec.methods) - set(METHOD_MODELS)
        if unknown or "main" not in spec.methods:
            raise ValueError(f"worker methods must include 'main' and be among {list(METHOD_MODELS)}, got {spec.methods}")
        self.models: dict[str, LoRAModel] = {}
        # projq-shared (B, A from the training configurations, later) and lq-shared (below) build from zero_B
        layer_init = "zero_B" if spec.init in (SHARED_INIT, SHARED_LQ_INIT) else spec.init
        for name, init in (("shared", layer_init), ("bare", "zero_B")):
            if name in spec.methods:  # its own copy of the frozen base, so the replicas never interfere
                self.models[name] = plain_lora(copy.deepcopy(task.model), self.space, rank=spec.rank,
                                               alpha=spec.alpha, seed=spec.seed, init=init, cache_mb=spec.cache_mb)
        self.models["main"] = self._main_model(task.model, layer_init)
        for model in self.models.values():
            model.eval()
        self._fisher: dict[str, torch.Tensor] | None = None
        self._init_stats: dict[str, float] = {}
        if spec.init == SHARED_LQ_INIT:  # one L per matrix, adopted by CoA-LoRA and Shared-LoRA alike
            self._init_stats = apply_shared_lq([self.models[n] for n in ("main", "shared") if n in self.models],
                                               self.space, spec.rank, iterations=spec.init_iterations,
                                               fisher=self.fisher(), seed=spec.seed)
        # The replicas and their init are made on the CPU, where an export rebuilds them bit for bit, then moved
        for model in self.models.values():
            model.to(self.device)
        self._covariances: dict[str, torch.Tensor] | None = None  # Σ per matrix, for GPTQ and ProjQ
        if spec.quant_method == "gptq":  # one Σ per matrix, shared by every replica (same frozen W and inputs)
            for model in self.models.values():
                model.set_calibration(self.covariances())
        self._initial = {name: model.trainable_state() for name, model in self.models.items()}

    # ---- bookkeeping --------------------------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def numels(self) -> list[int]:
        return self.models["main"].registry.numels

    def row_lengths(self) -> list[int]:
        return self.models["main"].registry.row_lengths

    def registry(self) -> list[dict[str, Any]]:
        return self.models["main"].registry.to_dict()

    def no_decay_names(self, method: str = "main") -> set[str]:
        return self._model(method).no_decay_names()

    def ternary_names(self, method: str = "main") -> set[str]:
        """Trainable tensors stepped by t-SignSGD rather than AdamW: LoTA's factors (none for the other kinds)."""
        model = self._model(method)
        return model.ternary_names() if isinstance(model, BlockwiseLoTAModel) else set()

    def initial_state(self, method: str = "main") -> dict[str, torch.Tensor]:
        """The replica's trainable state as built from the seed (with ``adapter.init: projq-shared``, before the
        data-dependent part, :meth:`shared_init`)."""
        self._model(method)  # an unknown replica is refused by name
        return _on_host(self._initial[method], copy=True)

    def shared_init(self, method: str, configurations: Sequence[np.ndarray]) -> tuple[dict[str, torch.Tensor],
                                                                                      dict[str, float]]:
        """``adapter.init: projq-shared`` for the training ``configurations``: the replica's built state with B and
        A from their shared error subspace and θ (if it has one) fitted to each one's correction
        (:func:`workers.init.projq.apply_shared_init`). Returns the state and its step-0 compensation errors."""
        if self.spec.init != SHARED_INIT:
            raise ValueError(f"shared_init is adapter.init {SHARED_INIT!r}'s; this worker was built with {self.spec.init!r}")
        if len(configurations) == 0:
            raise ValueError(f"adapter.init {SHARED_INIT!r} starts from the training configurations: none were given")
        model = self._with_state(method, self.initial_state(method))
        stats = apply_shared_init(model, [self.space.decode(np.asarray(c)) for c in configurations],
                                  self.covariances(), fit_steps=self.spec.prefit_steps, seed=self.spec.seed)
        return _on_host(model.trainable_state()), stats

    def init_stats(self) -> dict[str, float]:
        """The figures of an init computed as the replicas were built (``lq-shared``: its error relative to
        quantizing W, and the iterate kept; empty for the others)."""
        return dict(self._init_stats)

    def covariances(self) -> dict[str, torch.Tensor]:
        """Σ = XᵀX/N of every target matrix's inputs on the first ``calibration_examples`` training examples (the
        model in full precision, adapters off), computed once: GPTQ's Hessians and ProjQ's whitening."""
        if self._covariances is None:
            calibration = [on_device(batch, self.device)
                           for batch in self._batches(self.train_items[: self.spec.calibration_examples])]
            self._covariances = coa_covariances(self.models["main"], calibration)
        return self._covariances

    def compensation_error(self, method: str, state: Mapping[str, torch.Tensor] | None,
                           configuration: np.ndarray) -> float:
        """How much of round-to-nearest's output error replica ``method`` at ``state`` leaves on ``configuration``
        before any training (:func:`workers.baselines.compensation_error`, M = I)."""
        return compensation_error(self._with_state(method, state), self._decoded(configuration), self.covariances())

    def n_train(self) -> int:
        return len(self.train_items)

    def _batches(self, items: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
        bs = self.spec.batch_size
        return [self.collate(items[i : i + bs]) for i in range(0, len(items), bs)]

    def _main_model(self, model: torch.nn.Module, init: str) -> LoRAModel:
        """The run's own replica over the task's model: CoA-LoRA (θ, anchored at ``reference``), a plain LoRA, or
        LoTA's ternary factors."""
        spec = self.spec
        if spec.kind == "lota":
            return BlockwiseLoTAModel(model, self.space, rank=spec.rank, omega=spec.omega, seed=spec.seed,
                                      cache_mb=spec.cache_mb)
        if spec.kind == "lora":
            return plain_lora(model, self.space, rank=spec.rank, alpha=spec.alpha, seed=spec.seed, init=init,
                              cache_mb=spec.cache_mb)
        reference = self.space.most_precise if spec.reference == "most_precise" else None
        return CoAModel(model, self.space, rank=spec.rank, alpha=spec.alpha, init=init, seed=spec.seed,
                        reference=reference, encoder_hidden=spec.encoder_hidden, cache_mb=spec.cache_mb)

    def _model(self, method: str) -> LoRAModel:
        if method not in self.models:
            raise ValueError(f"this worker holds no {method!r} model; it holds {sorted(self.models)}")
        return self.models[method]

    def _with_state(self, method: str, state: Mapping[str, torch.Tensor] | None) -> LoRAModel:
        model = self._model(method)
        if state is not None:
            model.load_trainable_state(dict(state))
        return model

    # ---- work -----------------------------------------------------------------------------------------------
    def gradients(
        self,
        method: str,
        state: Mapping[str, torch.Tensor],
        example_ids: Sequence[int],
        configurations: Sequence[np.ndarray | None],
    ) -> tuple[list[float], dict[str, torch.Tensor], int]:
        """One fine-tuning shard: (the loss of each configuration, gradients of their mean, number of examples). A
        configuration of None trains on the unquantized base (the LoRA ceiling a benchmark compares against)."""
        model = self._model(method)
        batch = on_device(self.collate([self.train_items[i] for i in example_ids]), self.device)
        configs = [self._decoded(c) for c in configurations]
        losses, grads = compute_gradients(model, on_device(state, self.device), batch, configs)
        return losses.tolist(), _on_host(grads), len(example_ids)

    def score(self, method: str, state: Mapping[str, torch.Tensor] | None, configuration: np.ndarray) -> float:
        """Mean loss on the fixed scoring subset: the search's objective for this configuration."""
        _injected_fault("score")
        model = self._with_state(method, state)
        return evaluate(model, self.space.decode(np.asarray(configuration)), self.score_batches)["loss"]

    def evaluate(
        self, method: str, state: Mapping[str, torch.Tensor] | None, configuration: np.ndarray | None,
        adapter: bool = True,
    ) -> dict[str, float]:
        """Metrics on the validation set (accuracy and loss, or loss and perplexity)."""
        return evaluate(self._with_state(method, state), self._decoded(configuration), self.val_batches,
                        adapter=adapter)

    def evaluate_examples(
        self, method: str, state: Mapping[str, torch.Tensor] | None, configuration: np.ndarray | None,
        adapter: bool = True,
    ) -> tuple[dict[str, float], torch.Tensor]:
        """:meth:`evaluate`'s metrics and each validation example's scores (``workers.tasks.evaluate_examples``),
        in validation order: the same examples for every method, so differences can be paired."""
        return evaluate_examples(self._with_state(method, state), self._decoded(configuration), self.val_batches,
                                 adapter=adapter)

    def _decoded(self, configuration: np.ndarray | None) -> list[Any] | None:
        """An encoded configuration as settings (None: the unquantized model)."""
        return None if configuration is None else self.space.decode(np.asarray(configuration))

    def cache_stats(self) -> dict[str, float]:
        """Quantized-weight cache counters of every replica since the last call (then reset), and bytes held."""
        stats = merge_cache_stats(model.cache.stats() for model in self.models.values())
        for model in self.models.values():
            model.cache.reset_counters()
        return stats

    def theta_spread(self, state: Mapping[str, torch.Tensor], configurations: Sequence[np.ndarray]) -> dict[str, float]:
        """θ's common and configuration-specific output over ``configurations``
        (:func:`workers.adapters.coa.theta_spread`)."""
        model = self._with_state("main", state)
        return theta_spread(model, [self.space.decode(np.asarray(c)) for c in configurations])

    def cost_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Fisher-weighted reconstruction cost of the given target matrices under every setting: rows of the
        ILP's (N, n_settings) cost table, measured on what is quantized (W, or W − L under ``svd_of_W`` and
        ``lq-shared``). The Fisher is :meth:`fisher`'s."""
        fisher, sample = self.fisher(), self.spec.cost_sample or None
        return np.stack([
            setting_costs(layer.residual, self.space, fisher[layer.name], layer.name, sample)
            for layer in (self.models["main"].layers[i] for i in rows)
        ])

    def fisher(self) -> dict[str, torch.Tensor]:
        """Every target matrix's diagonal Fisher on the first ``fisher_examples`` training examples, estimated once
        per worker on the full-precision model (whatever the init: :func:`workers.fisher.layer_fisher`): the ILP's
        cost weights and lq-shared's."""
        if self._fisher is None:
            single = [self.collate([item]) for item in self.train_items[: self.spec.fisher_examples]]
            self._fisher = layer_fisher(self.models["main"], single, self.spec.fisher_examples)
        return self._fisher


def worker_device(name: str) -> torch.device:
    """The device a worker's replicas live on; a clear error for one this process cannot use (a Ray actor sees the
    GPUs it was given, ``cluster.gpus_per_worker``)."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"worker device {name!r} is not a device name: use 'cpu' or 'cuda'") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"worker device {name!r}: workers run on 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"worker device {name!r}, but this process sees no CUDA device (is torch a CUDA build, and "
                         "did the worker get a GPU: cluster.gpus_per_worker?)")
    return device


def _on_host(tensors: Mapping[str, torch.Tensor], *, copy: bool = False) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU (new copies with ``copy``): what a worker returns, so that the driver, which may have
    no GPU, can take it."""
    return {k: v.detach().to("cpu", copy=copy) for k, v in tensors.items()}


def _injected_fault(call: str) -> None:
    """Fault injection for the fault tests: with ``COALORA_FAULT_KILL_WORKER=<call>:<marker file>`` the first
    worker to reach ``call`` creates the marker and SIGKILLs its own process (mid-call, as a crash would)."""
    spec = os.environ.get("COALORA_FAULT_KILL_WORKER")
    if not spec:
        return
    name, _, marker = spec.partition(":")
    if name == call and marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
