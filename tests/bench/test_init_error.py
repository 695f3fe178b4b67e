"""bench/init_error.py on a tiny model: its rows obey the orderings that hold by construction, and its figure for
θ fitted is the one the run's own init reports (the bench checks that itself and would raise)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from search.space import SearchSpace
from workers.calibration import coa_covariances
from workers.adapters.coa import CoAModel

SPEC = importlib.util.spec_from_file_location("bench_init_error",
                                              Path(__file__).resolve().parents[2] / "bench" / "init_error.py")
init_error = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(init_error)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rows_are_ordered_as_the_algebra_says(tiny_classifier):
    model, covariances = tiny_classifier
    settings = init_error.configurations()
    every = init_error.summarise(init_error.every_matrix(model, covariances, settings, 100, 0))
    assert all(0 < every["lq-shared"][code] for code in init_error.CODES)
    for code in init_error.CODES:
        assert every["zero_B"][code] == 1.0
        # one adapter per configuration beats one subspace for all; the subspace's exact cores beat any other core
        assert every["projq (own)"][code] <= every["shared, exact cores"][code]
        assert every["shared, exact cores"][code] <= min(every["shared, M = I"][code], every["shared, θ fitted"][code])
    assert every["shared, θ fitted"]["mean"] < every["shared, M = I"]["mean"] < 1.0
    block = init_error.summarise(init_error.one_block(model, covariances, settings, 1))
    assert block["gptq, zero_B"]["mean"] < 1.0  # GPTQ lowers the error it is weighted by
    for code in init_error.CODES:
        assert block["gptq, own whitened SVD"][code] <= block["gptq + shared, exact cores"][code]


@pytest.fixture
def tiny_classifier(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = CoAModel(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval(), SearchSpace.default(),
                     rank=4, alpha=8, seed=0)
    ids = torch.randint(3, 1000, (8, 16), generator=torch.Generator().manual_seed(0))
    return model, coa_covariances(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
