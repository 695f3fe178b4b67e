"""What the GGUF export tests share: the quick run's overrides, the prompts, and llama-cpp-python's logits.

Not a test module: the tests import it from this folder (pytest runs in importlib mode, which does not put test
folders on sys.path)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from workers.models import load_tokenizer, resolve_model

FAST = ["cluster.executor=local", "search.rounds=1", "training.steps_per_round=6", "search.initial_budgets=2",
        "search.proposals_per_round=1", "search.segments=2", "search.fisher_examples=2", "search.cost_sample=4096",
        "evaluation.unseen=0", "evaluation.targets=[4.25]", "evaluation.baselines=[]", "data.train_examples=48",
        "data.val_examples=8", "data.score_examples=8", "data.batch_size=4", "data.max_length=32",
        "training.lr=0.01", "training.warmup_steps=1"]
PROMPTS = ["To be, or not to be, that is the question:", "My lord, I have remembrances of yours",
           "Now is the winter of our discontent"]


def llama(path: Path, lora: Path | None = None):
    return llama_cpp.Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=512,
                           n_threads=2, logits_all=True, verbose=False, seed=0)


def llama_logits(model, ids: list[int]) -> np.ndarray:
    model.reset()
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float64)


def tokens(text: str) -> list[int]:
    return load_tokenizer(resolve_model("smollm2"))(text)["input_ids"]


def gaps(theirs: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    d = np.abs(theirs - ours)
    return float(d.max()), float(d.mean())
