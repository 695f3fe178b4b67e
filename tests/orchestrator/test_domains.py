"""The run's model-dependent checks and evaluation draws respect each matrix's domain (the llama.cpp types whose
blocks fit its rows): budgets and targets are checked against the bits the model can reach, and unseen
configurations never give a matrix a type it cannot take."""

import numpy as np
import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.loop.finish import evaluation_configurations
from orchestrator.preflight import check_with_model

ROWS = [576, 576, 576, 1536] * 3  # SmolLM2-like: the K-quants fit only the 1536-wide rows
NUMELS = [576 * 576, 192 * 576, 1536 * 576, 576 * 1536] * 3


def config(*overrides: str):
    return load_config("conf/gguf.yaml", ["evaluation.unseen=6", *overrides])


def test_unseen_configurations_stay_inside_every_matrix_domain():
    cfg = config()
    space = cfg.load_space()
    allowed = space.allowed(ROWS)
    costs = np.where(allowed, np.random.default_rng(0).lognormal(0, 1, allowed.shape), np.inf)
    configs = evaluation_configurations(cfg, space, costs, NUMELS, allowed, pool=[])
    assert [name for name, _ in configs][:3] == ["target 4.25", "target 4.5", "target 5"] and len(configs) == 9
    for _, x in configs:
        flat = np.ravel_multi_index(tuple(x.reshape(len(ROWS), 5).T), space.cardinalities)
        assert allowed[np.arange(len(ROWS)), flat].all()
    assert len({x.tobytes() for _, x in configs}) == len(configs)


def test_budgets_and_targets_beyond_what_the_model_reaches_are_refused_naming_the_reason():
    check_with_model(config(), NUMELS, ROWS)
    lo = (4.5 * sum(NUMELS[i] for i in range(12) if i % 4 != 3) + 2.625 * 3 * NUMELS[3]) / sum(NUMELS)  # q4_0, q2_k
    with pytest.raises(ConfigError, match=rf"budget_min.*this model reaches \[{lo:.4f}, 8.5000\].*rows do not fit"):
        check_with_model(config("search.budget_min=3.0"), NUMELS, ROWS)
    with pytest.raises(ConfigError, match=r"evaluation.targets = 3.5: this model reaches"):
        check_with_model(config("evaluation.targets=[3.5]"), NUMELS, ROWS)
    check_with_model(config("search.budget_min=3.0", "evaluation.targets=[3.5]"), NUMELS, [1536] * len(ROWS))
