"""Run configuration: YAML in ``conf/`` validated by a pydantic schema before any compute.

Every error names the field, the value given and what is allowed, e.g.
``adapter.rank = 0: Input should be greater than 0``. ``key=value`` overrides on the command line use the same
dotted names and the same validation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from search.space import DEFAULT_SPACE_FILE, SearchSpace, parse_code, show_value
from workers.allocator import preload_library
from workers.data.packaged import PACKAGED_TASKS
from workers.quant.cache import DEFAULT_CACHE_MB

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_CONFIG = CONF_DIR / "default.yaml"
MAX_CONFIG_BYTES = 1 << 20
"""A run configuration is a page of YAML; anything larger is refused before it is parsed."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_SAFE_NAME_RULE = ("use 1-128 letters, digits, '_', '.', '-', starting with a letter, digit or '_' "
                   "(one directory name inside run.root)")


def check_safe_name(name: str, what: str) -> str:
    """``name`` if it is one path component that cannot leave its parent directory (no separator, no '.' or '..',
    nothing hidden), else a :class:`ConfigError` naming ``what``. Run and sweep directories are named this way."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ConfigError(f"{what} = {show_value(name)}: {_SAFE_NAME_RULE}")
    return name


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which field, what value, and what is allowed."""


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN learning rate or an infinite budget is refused here, not discovered mid-run.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RunSection(_Section):
    name: str | None = Field(None, description="run directory name, one path component; None: run-<UTC timestamp>")
    root: str = Field("runs", min_length=1, max_length=4096)
    seed: int = Field(0, ge=0, lt=2**32)

    @field_validator("name")
    @classmethod
    def _one_component(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_safe_name(v, "name")
            except ConfigError:
                raise ValueError(_SAFE_NAME_RULE) from None
        return v


class ModelSection(_Section):
    name: str = Field("minilm", min_length=1)
    task: Literal["classification", "causal-lm", "instruction"] | None = Field(
        None, description="None: from the data (a label column: classification; alpaca/chat/ShareGPT records: "
                          "instruction); stated in the resolved run")


class DataSection(_Section):
    dataset: Literal["reviews", "shakespeare"] | None = Field("reviews", description="a packaged corpus")
    source: str | None = Field(None, min_length=1, max_length=4096,
                               description="your data: a file, glob, folder, saved dataset or cached hub id; "
                                           "replaces data.dataset")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "txt"] = "auto"
    config_name: str | None = None
    train_split: str = Field("train", min_length=1)
    validation_split: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    labels: tuple[str, ...] | None = Field(None, description="class names in id order; other labels are dropped")
    instruction_format: Literal["alpaca", "chat", "sharegpt"] | None = Field(
        None, description="instruction records' layout; None: from the columns (stated in the resolved run)")
    max_length: int = Field(64, gt=0, le=4096)
    train_examples: int = Field(1024, gt=0)
    val_examples: int = Field(256, gt=0)
    score_examples: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0, le=65536)
    split_seed: int | None = Field(None, ge=0, lt=2**32,
                                   description="seed of which examples are held out (validation, scoring) and which "
                                               "train; None: run.seed. Fix it to compare runs of different "
                                               "run.seed on the same validation examples")

    @model_validator(mode="before")
    @classmethod
    def _source_replaces_dataset(cls, values: Any) -> Any:
        if isinstance(values, Mapping) and values.get("source"):
            return {**values, "dataset": None}
        return values

    @field_validator("labels", mode="before")
    @classmethod
    def _label_names(cls, v: Any) -> Any:
        return None if v is None else tuple(str(x) for x in v) if isinstance(v, (list, tuple)) else v


class AdapterSection(_Section):
    kind: Literal["coa", "lora", "lota"] = Field(
        "coa", description="coa (CoA-LoRA: one LoRA plus θ, which gives every configuration its own r×r correction); "
                           "lora (one plain LoRA for every configuration, M = I: no θ to train, store or run); "
                           "lota (LoTA-QAF: ternary factors trained by t-SignSGD that move integer codes by one "
                           "step, merged into the codes at export: a space of int codes only, docs/lota.md)")
    rank: int = Field(8, gt=0, le=4096)
    omega: float | dict[int, float] = Field(
        0.75, description="kind lota: the threshold ω as a fraction of the rank (a code moves where |B·A| > ω·r; the "
                          "paper's 0.75), or one per code width, e.g. {2: 0.9, 3: 0.75, 4: 0.5}: a width whose grid "
                          "is coarse can then move fewer codes than a fine one, from the same ternary factors")
    alpha: float = Field(16.0, gt=0)
    init: Literal["zero_B", "svd_of_W", "lq-shared", "projq-shared"] = Field(
        "zero_B", description="zero_B (B = 0, base quant(W)); svd_of_W (B·A = rank-r SVD of W, base quant(W − B·A)); "
                              "lq-shared (LQ-LoRA's alternation for one B·A shared by the space's code widths, base "
                              "quant(W − B·A) for every configuration: workers/init/lq.py); "
                              "projq-shared (base quant(W); B, A span the initial pool's common quantization-error "
                              "subspace, whitened by each matrix's inputs, and θ is fitted to each configuration's "
                              "correction in it: docs/projq.md)")
    prefit_steps: int = Field(0, ge=0, le=100_000, description="projq-shared: Adam steps fitting θ to the "
                              "configurations' corrections before training (0: θ starts at M ≈ I). Off by default: "
                              "fitted, θ's M lie far from I and CoA-LoRA stopped learning on MiniLM (docs/projq.md)")
    init_iterations: int = Field(10, gt=0, le=1000, description="lq-shared: at most this many alternations per "
                                 "matrix (it stops at the first rise of the error and keeps the best iterate)")
    encoder_hidden: int = Field(128, gt=0)
    reference: Literal["none", "most_precise"] = Field(
        "most_precise", description="the configuration θ maps to M = I exactly: most_precise (the space's most precise "
                            "setting on every matrix; only differences between configurations move M) or none")

    @field_validator("omega")
    @classmethod
    def _omega_fractions(cls, v: float | dict[int, float]) -> float | dict[int, float]:
        values = v.values() if isinstance(v, dict) else [v]
        if isinstance(v, dict) and (not v or not all(2 <= k <= 8 for k in v)):
            raise ValueError(f"per-width ω needs code widths in 2..8 as keys, got {sorted(v)}")
        if not all(0 < x < 1 for x in values):
            raise ValueError(f"ω is a fraction of the rank in (0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _init_fits_kind(self) -> "AdapterSection":
        if self.kind == "lota" and self.init != "zero_B":
            raise ValueError(f"adapter.kind = 'lota' starts from B = 0 on quant(W): adapter.init must be 'zero_B', "
                             f"not {self.init!r}")
        return self

    @model_validator(mode="after")
    def _init_fits_reference(self) -> "AdapterSection":
        if self.init == "projq-shared" and self.reference != "none":
            raise ValueError("adapter.init = 'projq-shared' gives M = I the mean correction of the training "
                             "configurations, which adapter.reference = 'most_precise' would force on the most precise "
                             "configuration too (it needs almost none): set adapter.reference = 'none'")
        return self

    @property
    def quantizes_residual(self) -> bool:
        """Whether the quantized base is quant(W − L) rather than quant(W) (the no-adapter baseline needs quant(W))."""
        return self.init in ("svd_of_W", "lq-shared")


class QuantSection(_Section):
    method: Literal["rtn", "gptq"] = Field(
        "rtn", description="how a matrix's codes are chosen for a setting: round to nearest, or GPTQ under the "
                           "Hessian of its calibration inputs (NF/INT spaces; the scales are the same either way)")
    calibration_examples: int = Field(128, gt=0, le=65536, description="training examples whose target-matrix "
                                                                       "inputs give GPTQ's Hessians (gathered once)")


class TrainingSection(_Section):
    steps_per_round: int = Field(20, gt=0)
    configs_per_step: int = Field(2, gt=0, description="K: configurations drawn per step (mean of their losses)")
    config_sampling: Literal["uniform", "stratified"] = Field(
        "stratified", description="how a step's K configurations are drawn from the training set: uniform, or one from "
                               "each of K strata along the bit axis")
    lr: float = Field(3e-3, gt=0)
    lora_lr: float | None = Field(None, gt=0, description="peak lr of the LoRA factors alone (None: lr)")
    encoder_lr: float | None = Field(1.5e-4, gt=0, description="peak lr of θ, the configuration encoder (None: lr); "
                                                              "about lr/20: θ moves every adapter at once")
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    cache_mb: float = Field(DEFAULT_CACHE_MB, ge=0, le=2**20,
                            description="bytes (in MiB) of quantized weights each model replica keeps, packed; "
                                        "a configuration whose weights are not kept is quantized again")
    low_memory: bool = Field(False, description="CPU workers: return large freed blocks to the OS (glibc mmap "
                                                "threshold pinned); peak memory about PEFT's, steps ~30% slower")
    allocator: str = Field("auto", description="the Ray workers' memory allocator, preloaded: auto (tcmalloc when "
                                               "the machine has it, else the C library's), system, tcmalloc, "
                                               "jemalloc, mimalloc, or an absolute path to a shared library "
                                               "(workers/allocator.py)")

    @field_validator("allocator")
    @classmethod
    def _allocator_exists(cls, value: str) -> str:
        preload_library(value)  # a missing library is refused here, before any compute
        return value


class SearchSection(_Section):
    space: str = str(DEFAULT_SPACE_FILE)
    rounds: int = Field(2, ge=0)
    initial_budgets: int = Field(12, gt=0)
    budget_min: float = 2.25
    budget_max: float = 4.5  # where the quantization error is (and the evaluation targets): 7 of 12 ILP budgets
                             # over [2.25, 7.25] sat above 4.5 bits, where an adapter has little to correct
    proposals_per_round: int = Field(4, gt=0)
    segments: int = Field(6, gt=0, description="equal-width bit segments of the Pareto selection; about a third of "
                                               "the largest pool, so that selection selects (the paper's 40 suits "
                                               "pools of hundreds)")
    fisher_examples: int = Field(32, gt=0)
    cost_sample: int = Field(65536, ge=0, description="entries per matrix for the ILP cost estimate; 0 = exact")

    @property
    def largest_pool(self) -> int:
        """The most configurations the pool can hold: the initial budgets plus every round's proposals."""
        return self.initial_budgets + self.rounds * self.proposals_per_round

    @model_validator(mode="after")
    def _budget_order(self) -> "SearchSection":
        if self.budget_min >= self.budget_max:
            raise ValueError(f"budget_min ({self.budget_min}) must be below budget_max ({self.budget_max})")
        return self


class EvaluationSection(_Section):
    targets: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0)
    unseen: int = Field(4, ge=0, description="random per-matrix settings (average bits in [2.5, 6]) never trained on")
    unseen_ilp: int = Field(0, ge=0, description="configurations drawn like the pool, never trained on: the ILP "
                                                 "allocation at seeded random budgets in [search.budget_min, "
                                                 "search.budget_max] (named 'ilp-unseen i')")
    baselines: tuple[Literal["no_adapter", "shared_lora", "no_theta", "qlora", "lq_lora"], ...] = (
        "no_adapter", "shared_lora")

    @field_validator("targets")
    @classmethod
    def _non_empty(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("at least one target budget is needed")
        return v


class ClusterSection(_Section):
    executor: Literal["ray", "local"] = "ray"  # local: one in-process replica, no Ray (debugging, benchmarks)
    address: str | None = None
    workers: int = Field(2, gt=0, le=4096, description="checked against the CPUs/GPUs Ray offers before any compute")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="> 0: each worker's models, quantized-weight cache and "
                                                          "quantizer kernels (Triton) live on its GPU, bf16 autocast")
    max_restarts: int = Field(2, ge=0, le=100, description="times Ray restarts a worker actor whose process or "
                                                           "node died; its calls wait and are retried meanwhile")
    connect_timeout_s: float = Field(30.0, gt=0, le=3600, description="bounded wait for a Ray cluster address")


class TrackingSection(_Section):
    uri: str | None = None
    experiment: str = Field("coalora", min_length=1, max_length=256)
    timeout_s: float = Field(30.0, gt=0, le=3600, description="bounded wait for each MLflow server request")
    outage_s: float = Field(300.0, ge=0, le=86400, description="how long the end of a run waits for a tracking "
                                                               "store that went away mid-run (training never waits)")
    system_metrics: bool = Field(True, description="log CPU, memory, disk, network and GPU use to the run "
                                                   "(MLflow's system-metrics monitor, every 10 s)")


class RunConfig(_Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    adapter: AdapterSection = AdapterSection()
    quant: QuantSection = QuantSection()
    training: TrainingSection = TrainingSection()
    search: SearchSection = SearchSection()
    evaluation: EvaluationSection = EvaluationSection()
    cluster: ClusterSection = ClusterSection()
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="before")
    @classmethod
    def _task_of_packaged_corpus(cls, values: Any) -> Any:
        """A packaged corpus implies its task (reviews: classification, shakespeare: causal-lm)."""
        if not isinstance(values, Mapping):
            return values
        data, model = values.get("data") or {}, values.get("model") or {}
        if not isinstance(data, Mapping) or not isinstance(model, Mapping) or data.get("source"):
            return values
        dataset = data.get("dataset", "reviews")
        if model.get("task") is None and dataset in PACKAGED_TASKS:
            return {**values, "model": {**model, "task": PACKAGED_TASKS[dataset]}}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.adapter.kind == "lora" and "no_theta" in self.evaluation.baselines:
            raise ValueError("evaluation.baselines: 'no_theta' replays the run with M = I, which adapter.kind = 'lora' "
                             "already is (the same run twice): leave it out, or use adapter.kind = 'coa'")
        if self.adapter.kind == "lota" and "no_theta" in self.evaluation.baselines:
            raise ValueError("evaluation.baselines: 'no_theta' is CoA-LoRA without θ; adapter.kind = 'lota' has no θ: "
                             "leave it out (shared_lora and no_adapter compare with it)")
        if self.data.source is not None:
            return self
        if self.data.dataset is None:
            raise ValueError("give data.source (your data) or data.dataset (a packaged corpus)")
        if PACKAGED_TASKS[self.data.dataset] != self.model.task:
            raise ValueError(
                f"data.dataset {self.data.dataset!r} does not fit model.task {self.model.task!r}; "
                "allowed pairs: reviews+classification, shakespeare+causal-lm"
            )
        return self

    def load_space(self) -> SearchSpace:
        try:
            space = SearchSpace.from_yaml(_resolve_path(self.search.space))
        except ValueError as err:
            raise ConfigError(f"search.space = {self.search.space!r}: {err}") from None
        if self.quant.method == "gptq" and parse_code(space.code[0])[0] == "gguf":
            raise ConfigError(f"quant.method = 'gptq' chooses codes for the blockwise NF/INT settings; the space "
                              f"{self.search.space!r} holds llama.cpp types, which ggml quantizes itself: use "
                              "quant.method = 'rtn' with it")
        not_int = sorted({c for c in space.code if parse_code(c)[0] != "int"})
        if self.adapter.kind == "lota" and not_int:
            raise ConfigError(f"adapter.kind = 'lota' moves integer codes by one step: the space {self.search.space!r} "
                              f"holds {not_int}; use a space of int codes only (conf/space/integer.yaml)")
        if self.adapter.kind == "lota" and isinstance(self.adapter.omega, dict):
            widths = sorted({parse_code(c)[1] for c in space.code})
            missing = [w for w in widths if w not in self.adapter.omega]
            if missing:
                raise ConfigError(f"adapter.omega gives ω per code width but not for {missing}, which the space "
                                  f"{self.search.space!r} holds (its widths: {widths})")
        lo, hi = space.bits_range
        for t in self.evaluation.targets:
            if not lo <= t <= hi:
                raise ConfigError(f"evaluation.targets = {t}: outside the space's bit range [{lo:.4f}, {hi:.4f}]")
        if self.search.budget_min < lo or self.search.budget_max > hi:
            raise ConfigError(
                f"search.budget_min/budget_max = [{self.search.budget_min}, {self.search.budget_max}]: must lie "
                f"inside the space's bit range [{lo:.4f}, {hi:.4f}]"
            )
        return space

    def to_flat_dict(self) -> dict[str, Any]:
        """Dotted keys → values, the form MLflow params take."""
        out: dict[str, Any] = {}
        for section, values in self.model_dump().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


def _resolve_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else CONF_DIR.parent / p


def _format(err: ValidationError, limit: int = 10) -> str:
    errors = err.errors()
    lines = []
    for e in errors[:limit]:
        field = ".".join(str(x) for x in e["loc"]) or "config"
        value = e.get("input")
        shown = "" if isinstance(value, Mapping) else f" = {show_value(value)}"
        lines.append(f"{field}{shown}: {e['msg']}")
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {show_value(item)} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {show_value(key)} must be section.key, e.g. adapter.rank=16")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {show_value(item)}: value is not valid YAML ({err})") from None
    return parts, value


def build_config(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for item in overrides:
        (section, key), value = parse_override(item)
        if section not in RunConfig.model_fields:
            raise ConfigError(f"override {show_value(item)}: unknown section {show_value(section)}; "
                              f"allowed: {list(RunConfig.model_fields)}")
        allowed = RunConfig.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
        if key not in allowed:
            raise ConfigError(f"override {show_value(item)}: unknown field {section}.{str(key)[:80]}; "
                              f"allowed: {list(allowed)}")
        merged.setdefault(section, {})[key] = value
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format(err)) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run configuration (default ``conf/default.yaml``), apply overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"configuration file {str(path)!r} is {size} bytes; a run configuration is at most "
                          f"{MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"configuration file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"configuration file {str(path)!r} is not valid YAML: {str(err)[:500]}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"configuration file {str(path)!r} must hold a mapping of sections")
    return build_config(data, overrides)
