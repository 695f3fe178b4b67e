"""Where examples come from: a Hugging Face dataset id (read from the local cache only), a local file or glob (csv,
tsv, json, jsonl, parquet, txt, optionally .gz/.bz2-compressed), a directory written by ``Dataset.save_to_disk``,
or a folder of text files with one sub-folder per class. Everything goes through Hugging Face ``datasets``, so the
formats behave as its users know them; what comes back is plain rows, split into train and (when the source has
one) validation.

Every failure is a :class:`DataError` that names the source and what is wrong (a missing file, an unknown format,
undecodable bytes, a dataset not in the cache) before any model work starts. Offline, a hub id that is not cached
is an error at once: ``HF_DATASETS_OFFLINE`` is set for the call, so ``datasets`` never waits on the network.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    # our name: (datasets builder, its options)
    "csv": ("csv", {"na_filter": False}),  # empty cells stay "" instead of becoming NaN
    "tsv": ("csv", {"sep": "\t", "na_filter": False}),
    "json": ("json", {}),
    "jsonl": ("json", {}),
    "parquet": ("parquet", {}),
    "txt": ("text", {"sample_by": "document"}),  # one example (document) per file
}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


class DataError(ValueError):
    """A data source that cannot be used; the message names the source and the fix."""


@dataclass(frozen=True)
class DataSpec:
    """What the user said about the data (``data.*`` in the run configuration)."""

    source: str
    format: str = "auto"
    config_name: str | None = None
    train_split: str = "train"
    validation_split: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    labels: tuple[str, ...] | None = None
    name: str | None = None  # what messages and the MLflow dataset input call it (default: the source itself)

    @property
    def display_name(self) -> str:
        return self.name or Path(self.source).name or self.source

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "DataSpec":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        labels = fields.get("labels")
        return cls(**{**fields, "labels": tuple(labels) if labels else None})


@dataclass
class SourceRows:
    """A source's rows: ``train`` and, when the source itself has one, ``validation`` (else None)."""

    kind: str  # "files" | "folders" | "saved" | "hub"
    format: str
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]] | None
    columns: list[str]
    files: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        """A short content digest of the rows, for the run's record of what it trained on."""
        h = hashlib.sha256()
        for part in (self.train, self.validation or []):
            for row in part:
                h.update(repr(sorted(row.items())).encode())
        return h.hexdigest()[:16]


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        if declared not in FORMATS:
            raise DataError(f"data.format = {declared!r}: choose one of {['auto', *FORMATS]}")
        return declared
    suffixes = [s for s in path.suffixes if s not in COMPRESSION]
    ext = suffixes[-1].lstrip(".").lower() if suffixes else ""
    if ext not in FORMATS:
        raise DataError(f"cannot tell the format of {str(path)!r} from its extension {ext!r}: set data.format to one "
                        f"of {list(FORMATS)}")
    return ext


def _load_files(files: list[Path], fmt: str) -> list[dict[str, Any]]:
    import datasets

    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"data file {str(f)!r} is empty")
    builder, options = FORMATS[fmt]
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    except UnicodeDecodeError as err:
        raise DataError(f"data file(s) {[str(f) for f in files][:3]} are not UTF-8 text ({err.reason} at byte "
                        f"{err.start}); convert them, e.g. with iconv") from None
    except Exception as err:  # noqa: BLE001 - pandas, pyarrow and json raise their own; one clear message
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read {[str(f) for f in files][:3]} as {fmt}: {first}") from None
    if fmt == "txt":
        return [{"text": r["text"], "file": str(f)} for r, f in zip(ds, files)]
    return list(ds)


def _class_folders(root: Path) -> list[dict[str, Any]]:
    """A folder with one sub-folder per class, each holding text files: rows of {text, label, file}."""
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(p for p in sub.rglob("*") if p.is_file() and not p.name.startswith(".")):
            try:
                text = f.read_bytes().decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{str(f)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
            rows.append({"text": text, "label": sub.name, "file": str(f.relative_to(root))})
    return rows


def _from_hub(spec: DataSpec) -> SourceRows:
    import datasets

    os.environ["HF_DATASETS_OFFLINE"] = "1"  # the cache or nothing: never a wait on the network
    datasets.disable_progress_bars()
    try:
        dd = datasets.load_dataset(spec.source, spec.config_name)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"data.source = {spec.source!r}: not a local file or directory, and not a dataset in the local "
                        f"Hugging Face cache ({str(err).splitlines()[0][:200]}); download it once with "
                        "`datasets.load_dataset` where the hub is reachable, or give a local path") from None
    return _from_splits(dd, spec, "hub")


def _from_splits(dd: Any, spec: DataSpec, kind: str) -> SourceRows:
    import datasets

    if isinstance(dd, datasets.Dataset):
        return SourceRows(kind, "arrow", list(dd), None, list(dd.column_names))
    if spec.train_split not in dd:
        raise DataError(f"data.train_split = {spec.train_split!r}: {spec.source!r} has the splits {list(dd)}")
    validation = spec.validation_split
    if validation is None:
        validation = next((s for s in ("validation", "valid", "dev", "test") if s in dd), None)
    elif validation not in dd:
        raise DataError(f"data.validation_split = {validation!r}: {spec.source!r} has the splits {list(dd)}")
    train = dd[spec.train_split]
    return SourceRows(kind, "arrow", list(train), list(dd[validation]) if validation else None,
                      list(train.column_names))


def read_source(spec: DataSpec) -> SourceRows:
    """The rows of ``spec.source`` (see the module docstring for what a source can be)."""
    path = Path(spec.source).expanduser()
    if any(c in spec.source for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.source = {spec.source!r}: no file matches")
        fmt = _format_of(files[0], spec.format)
        rows = _load_files(files, fmt)
        return SourceRows("files", fmt, rows, None, _columns(rows), [str(f) for f in files])
    if path.is_file():
        fmt = _format_of(path, spec.format)
        rows = _load_files([path], fmt)
        return SourceRows("files", fmt, rows, None, _columns(rows), [str(path)])
    if path.is_dir():
        import datasets

        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            return _from_splits(datasets.load_from_disk(str(path)), spec, "saved")
        if any(p.is_dir() for p in path.iterdir()):
            rows = _class_folders(path)
            if not rows:
                raise DataError(f"data.source = {spec.source!r}: its class sub-folders hold no files")
            return SourceRows("folders", "folders", rows, None, ["text", "label", "file"])
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"data.source = {spec.source!r}: the directory is empty")
        fmt = _format_of(files[0], spec.format)
        rows = _load_files(files, fmt)
        return SourceRows("files", fmt, rows, None, _columns(rows), [str(f) for f in files])
    if spec.source.startswith((".", "/", "~")) or spec.source.count("/") > 1 or path.suffix:
        raise DataError(f"data.source = {spec.source!r}: no such file or directory")
    return _from_hub(spec)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(rows[0]) if rows else []
