"""Fixtures for driver tests: a template MLflow SQLite store (migrations run once) and a small run configuration
on tests/conftest.py's tiny local model that exercises every phase in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, mlflow_template) -> str:
    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template, db)
    return f"sqlite:///{db}"


def tiny_run_config(model_dir: Path, root: Path, tracking_uri: str, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "run": {"name": "tiny", "root": str(root), "seed": 0},
        "model": {"name": str(model_dir), "task": "classification"},
        "data": {"dataset": "reviews", "max_length": 24, "train_examples": 64, "val_examples": 32,
                 "score_examples": 16, "batch_size": 16},
        "adapter": {"rank": 4, "alpha": 8},
        "training": {"steps_per_round": 2, "configs_per_step": 2, "lr": 0.005, "warmup_steps": 1},
        "search": {"rounds": 2, "initial_budgets": 4, "proposals_per_round": 2, "segments": 10,
                   "fisher_examples": 4},
        "evaluation": {"targets": [2.5, 4.0], "unseen": 1, "baselines": ["no_adapter"]},
        "cluster": {"executor": "local", "workers": 1},
        "tracking": {"uri": tracking_uri, "experiment": "tests"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


@pytest.fixture
def make_config(tiny_model_dir, tmp_path, tracking_uri):
    """``make_config(**sections)`` → (dict, path of its YAML) for a tiny run under tmp_path/runs."""

    def make(**sections: Any) -> tuple[dict[str, Any], Path]:
        config = tiny_run_config(tiny_model_dir, tmp_path / "runs", tracking_uri, **sections)
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return config, path

    return make


@pytest.fixture(scope="session")
def write_run_config(tiny_model_dir, mlflow_template):
    """``write_run_config(directory, **sections)`` → YAML path of a tiny run rooted in ``directory`` with its own
    copy of the MLflow template store (for tests that need module-scoped runs or several runs side by side)."""

    def write(directory: Path, **sections: Any) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        db = directory / "mlflow.db"
        shutil.copy(mlflow_template, db)
        config = tiny_run_config(tiny_model_dir, directory / "runs", f"sqlite:///{db}", **sections)
        path = directory / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write
