"""``coalora export``: the best configuration a device can hold, as a standard PEFT adapter (``--format peft``),
for a run over llama.cpp types as ``model.gguf`` + ``adapter.gguf`` for llama.cpp (``--format gguf``,
:mod:`workers.export.gguf`; its memory budget counts the file's tensors exactly, the untouched ones included), or,
for an ``adapter.kind: lota`` run, as the merged integer model (``--format merged``, :mod:`workers.export.merged`:
its ternary adapter moved into the codes, no adapter at run time).

"Best" is the lowest scoring loss among every configuration the run evaluated (its pool, as of the last
checkpoint) whose cost fits the budget: average bits of the target matrices ≤ ``--bits``, or total memory ≤
``--memory-mb`` where memory counts the packed target matrices exactly (padding and offsets included) plus every
other parameter of the model at 16 bits. For a uniform NF4 configuration with 64-weight blocks (bitsandbytes'
block size) a bitsandbytes 4-bit model is saved alongside (``bnb-4bit/``), so the adapter can be served on
bitsandbytes' kernels: its codes equal coalora's on ≥ 99.99% of the weights (tests/quant); its second-level scale
format is bitsandbytes' own. Not for a ``quant.method: gptq`` run: bitsandbytes rounds to nearest, so its codes
would not be the ones coalora trained and evaluated on; ``quantized_base.safetensors`` (every export has it) holds
those exactly. The tokenizer the run trained with is saved beside the adapter (with its chat
template, which an instruction-tuned adapter expects its prompts rendered with).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from workers.adapters.lora import CLASSIFIER_HEADS
from workers.export.merged import export_merged
from workers.export.peft import QUANTIZED_BASE_FILE, export_adapter
from workers.models import load_tokenizer, resolve_model
from workers.quant.files import tensor_bytes
from workers.quant.formats import packed_nbytes
from workers.worker import Worker

from .config import ConfigError, RunConfig
from .runs import load_run_config, worker_spec
from .state import CheckpointStore, write_json_atomic

log = logging.getLogger(__name__)


def _target_bytes(settings, numels, shifted: bool = False) -> int:
    """Packed bytes of the target matrices; ``shifted``: plus a merged LoTA model's μ (one fp32 per group)."""
    return sum(packed_nbytes(n, s) + (4 * (-(-n // s.group_size)) if shifted else 0)
               for n, s in zip(numels, settings))


def choose_configuration(
    pool: np.ndarray, losses: np.ndarray, fits: np.ndarray, describe: str, cheapest: str = ""
) -> int:
    """Index of the lowest-loss configuration among those that fit; a clear error if none does."""
    idx = np.flatnonzero(fits)
    if idx.size == 0:
        raise ConfigError(f"no evaluated configuration fits {describe}; the cheapest one in the run costs more"
                          + (f" ({cheapest})" if cheapest else ""))
    return int(idx[np.argmin(losses[idx])])


FORMATS = ("peft", "gguf", "merged")


def export_run(run_dir: Path, *, bits: float | None = None, memory_mb: float | None = None,
               out: str | Path | None = None, fmt: str | None = None, merge: bool = False) -> Path:
    """Export the best configuration for the budget; ``fmt`` None: the run's natural format (``merged`` for an
    ``adapter.kind: lota`` run, else ``peft``)."""
    if (bits is None) == (memory_mb is None):
        raise ConfigError("give exactly one of --bits and --memory-mb")
    if (bits is not None and bits <= 0) or (memory_mb is not None and memory_mb <= 0):
        raise ConfigError("the budget must be positive")
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    if merge and fmt != "gguf":
        raise ConfigError("--merge writes one GGUF file: use it with --format gguf (a PEFT adapter stays separate)")
    run_dir = Path(run_dir).resolve()
    cfg = load_run_config(run_dir)
    lota = cfg.adapter.kind == "lota"
    fmt = fmt or ("merged" if lota else "peft")
    if lota and fmt != "merged":
        raise ConfigError(f"a LoTA run has no separate adapter for --format {fmt}: its ternary adapter is merged into "
                          "the integer codes (--format merged, the default for it)")
    if fmt == "merged" and not lota:
        raise ConfigError("--format merged is a LoTA run's export (adapter.kind = 'lota'); this run's adapter stays "
                          "separate: use --format peft or gguf")
    space = cfg.load_space()
    if fmt == "gguf" and not space.is_gguf:
        raise ConfigError(f"{run_dir.name} searched coalora's blockwise codes ({', '.join(space.code)}), which "
                          "llama.cpp cannot load: export it with --format peft, or run over llama.cpp types "
                          "(coalora run conf/gguf.yaml)")
    if fmt == "peft" and space.is_gguf:
        log.warning("a PEFT export of a run over llama.cpp types: its base must be quantized by ggml to the types "
                    "in quant_configuration.json; --format gguf writes that base")
    ckpt = CheckpointStore(run_dir / "checkpoints").load_latest()
    if ckpt is None:
        raise ConfigError(f"{run_dir} has no valid checkpoint yet; nothing to export")
    pool = np.asarray(ckpt.meta["pool"], dtype=np.int64)
    losses = np.asarray(ckpt.meta["pool_loss"], dtype=np.float64)
    numels = ckpt.meta["numels"]
    avg = np.atleast_1d(space.encoded_average_bits(pool, numels))
    if bits is not None:  # chosen before the model loads: a budget no configuration meets costs nothing
        i = choose_configuration(pool, losses, avg <= bits + 1e-12, f"{bits} bits per weight",
                                 f"{avg.min():.4f} bits")
        label = f"bits-{bits:g}"
    coa = Worker(replace(worker_spec(cfg), device="cpu")).models["main"]  # the run's replica, built as it was
    if memory_mb is not None:  # the rest of the model's bytes need the model
        other = _other_bytes(cfg, coa, numels, fmt)
        mem = np.array([_target_bytes(space.decode(x), numels, lota) for x in pool]) + other
        i = choose_configuration(pool, losses, mem <= memory_mb * 2**20, f"{memory_mb} MB",
                                 f"{mem.min() / 2**20:.2f} MB")
        label = f"memory-{memory_mb:g}MB"
    coa.load_trainable_state(ckpt.tensors["trainable"])
    settings = space.decode(pool[i])
    if fmt == "gguf":
        label = f"gguf-{label}" + ("-merged" if merge else "")
    directory = Path(out) if out else run_dir / "exports" / label
    summary = {
        "run": str(run_dir), "round": ckpt.round, "average_bits": float(avg[i]), "scoring_loss": float(losses[i]),
        "packed_target_bytes": _target_bytes(settings, numels, lota), "format": fmt,
    }
    if fmt == "gguf":
        summary.update(_export_gguf(cfg, coa, settings, directory, summary, merge))
        write_json_atomic(directory / "coalora_export.json", summary)
        _log_export(cfg, run_dir, directory, label)
        return directory
    if fmt == "merged":
        export_merged(coa, settings, directory)
        summary["merged_bytes"] = tensor_bytes(directory / QUANTIZED_BASE_FILE)
    else:
        export_adapter(coa, settings, directory)
    if cfg.data.labels:  # the base's config with this run's label map: AutoModelForSequenceClassification reads it
        coa.model.config.save_pretrained(directory)
        summary["id2label"] = dict(enumerate(cfg.data.labels))
    # the tokenizer the run trained with (pad token, and the chat template an instruction-tuned adapter expects)
    load_tokenizer(resolve_model(cfg.model.name)).save_pretrained(directory)
    summary["quantized_base"] = QUANTIZED_BASE_FILE
    if cfg.quant.method == "gptq":  # bitsandbytes would re-round the weights: its codes would not be GPTQ's
        summary["bitsandbytes_model"] = None
    elif fmt == "peft" and all(s.code == "nf4" and s.block0 == 64 for s in settings):
        double_quant = all(s.scale_bits == 8 for s in settings)
        save_bitsandbytes_model(cfg.model.name, cfg.model.task, directory / "bnb-4bit", double_quant)
        summary["bitsandbytes_model"] = "bnb-4bit"
    write_json_atomic(directory / "coalora_export.json", summary)
    _log_export(cfg, run_dir, directory, label)
    return directory


def _other_bytes(cfg: RunConfig, coa, numels: list[int], fmt: str) -> int:
    """Bytes of everything but the target matrices: the base GGUF's other tensors as stored (gguf), or every
    other parameter at 16 bits (peft)."""
    if fmt == "gguf":
        from workers.export.gguf import base_file, open_base, tensor_names

        reader, arch = open_base(base_file(resolve_model(cfg.model.name)))
        targets = set(tensor_names(coa, arch, reader).values())
        return sum(int(t.n_bytes) for t in reader.tensors if t.name not in targets)
    return 2 * (sum(p.numel() for p in coa.model.parameters()) - sum(numels))


def _export_gguf(cfg: RunConfig, coa, settings, directory: Path, summary: dict, merge: bool) -> dict:
    """model.gguf + adapter.gguf (or the merged model.gguf), and how to run them."""
    from workers.export.gguf import export_gguf

    files = export_gguf(coa, settings, resolve_model(cfg.model.name), directory,
                        extra={k: summary[k] for k in ("run", "round", "average_bits")}, merge=merge)
    model = files.model.name
    lora_cli = f" --lora {files.adapter.name}" if files.adapter else ""
    lora_py = f", lora_path='{files.adapter.name}'" if files.adapter else ""
    return {
        "model_gguf": model, "adapter_gguf": files.adapter.name if files.adapter else None, "merged": merge,
        "target_tensor_bytes": files.target_bytes, "model_gguf_bytes": files.model.stat().st_size,
        "tensor_types": files.tensor_types,
        "run_with": {
            "llama.cpp": f"llama-cli -m {model}{lora_cli} -cnv",
            "llama-cpp-python": f"Llama(model_path='{model}'{lora_py})",
        },
    }


def _log_export(cfg: RunConfig, run_dir: Path, directory: Path, label: str) -> None:
    """The export also goes to the run's MLflow record (Artifacts tab, ``exports/<budget>``). The files on disk are
    the export: a tracking store that is down or lacks the run costs a warning, not the export."""
    from .preflight import tracking_uri
    from .runs import run_key
    from .tracking.tracker import attach_artifacts

    uri = tracking_uri(cfg)
    try:
        found = attach_artifacts(uri, cfg.tracking.experiment, run_key(run_dir), directory, f"exports/{label}",
                                 cfg.tracking.timeout_s)
    except Exception as err:  # noqa: BLE001 - MLflow, requests and botocore raise their own
        log.warning("the export is on disk, but MLflow (%s) did not take it: %s", uri, str(err).splitlines()[0][:200])
        return
    if found is None:
        log.warning("the export is on disk; MLflow (%s) holds no parent run for %s to attach it to", uri, run_dir)


def save_bitsandbytes_model(model: str, task: str, directory: Path, double_quant: bool) -> Path:
    """The base model quantized by bitsandbytes to NF4 (block 64) and saved with its quantization config."""
    import torch
    from transformers import BitsAndBytesConfig

    from workers.models import load_model

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=list(CLASSIFIER_HEADS) + ["lm_head"])  # heads stay full precision
    quantized = load_model(resolve_model(model), task, quantization_config=config)
    quantized.save_pretrained(directory)
    return directory


def read_summary(directory: Path) -> dict:
    return json.loads((Path(directory) / "coalora_export.json").read_text())
