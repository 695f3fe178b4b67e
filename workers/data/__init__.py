"""Task data, one module per concern: ``sources`` (where rows come from: a hub dataset in the local cache, local
files, a saved dataset, class folders), ``schema`` (what the rows mean: task, columns, labels), ``splits`` (seeded
held-out examples), ``batches`` (tokenised batches and token blocks), ``instructions`` (alpaca / chat / ShareGPT
records with the loss on the responses) and ``packaged`` (where the two corpora that ship inside PyPI packages are:
ordinary sources). A new file format belongs in ``sources``; a new task kind gets its own module beside
``batches``."""

from .batches import ClassificationCollator, classification_loader, lm_loader, on_device, token_blocks
from .instructions import IGNORE_INDEX, InstructionCollator
from .instructions import encode as encode_instructions
from .packaged import PACKAGED_TASKS, packaged_source, reviews_file, shakespeare_dir
from .schema import DataPlan, classification_items, documents, plan_task
from .sources import DataError, DataSpec, SourceRows, read_source
from .splits import Split, seeded_split, shuffled

__all__ = [
    "ClassificationCollator", "classification_loader", "lm_loader", "on_device", "token_blocks",
    "IGNORE_INDEX", "InstructionCollator", "encode_instructions",
    "PACKAGED_TASKS", "packaged_source", "reviews_file", "shakespeare_dir",
    "DataPlan", "classification_items", "documents", "plan_task",
    "DataError", "DataSpec", "SourceRows", "read_source",
    "Split", "seeded_split", "shuffled",
]
