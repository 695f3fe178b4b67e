"""Crash and resume: the driver SIGKILLed at each commit point, a corrupt checkpoint.

The contract (design.md): a resumed run writes the same ledger, pool, training set, adapters and next proposal as
an uninterrupted run with the same seed, byte for byte.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from search.searcher import ParetoSearcher
from search.space import SearchSpace

def fingerprint(run_dir: Path) -> dict:
    """Everything that must be identical: ledger bytes, last checkpoint, adapters, next proposal, final table."""
    ckpt = sorted((run_dir / "checkpoints").glob("round-*"))[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    trainable = load_file(ckpt / "trainable.safetensors")
    space = SearchSpace.default()
    searcher = ParetoSearcher(space, meta["numels"], seed=0, segments=10)
    searcher.tell(zip(np.asarray(meta["pool"], dtype=np.int64), meta["pool_loss"]))
    return {
        "ledger": (run_dir / "ledger.jsonl").read_text(),
        "pool": meta["pool"], "pool_loss": meta["pool_loss"], "training_set": meta["training_set"],
        "trainable": {k: v.numpy().tobytes() for k, v in trainable.items()},
        "next_proposal": [x.tolist() for x in searcher.propose(2)],
        "final": (run_dir / "final" / "evaluation.json").read_text(),
    }


def run_dir_of(config_path: Path) -> Path:
    config = yaml.safe_load(config_path.read_text())
    return Path(config["run"]["root"]) / config["run"]["name"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, write_run_config, cli) -> dict:
    config = write_run_config(tmp_path_factory.mktemp("reference"))
    done = cli("run", str(config), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    return fingerprint(run_dir_of(config))


KILLS: tuple[tuple[str, str], ...] = (
    ("pool_scored:1", "round 0, before any checkpoint: the resume starts over"),
    ("checkpoint:1", "round 0's checkpoint just written"),
    ("trained:1", "round 1 trained, nothing searched yet"),
    ("proposed:1", "round 1's proposals recorded, not evaluated"),
    ("evaluated:1", "round 1's proposals evaluated, no checkpoint"),
    ("checkpoint:1", "round 1's checkpoint just written"),
    ("evaluated:1", "round 2's proposals evaluated"),
    ("checkpoint:1", "round 2's checkpoint just written"),
    ("final:1", "the final evaluation recorded, the run not marked done"),
)
"""One run's life, killed at every commit point in turn: each resume is SIGKILLed at the next point it reaches (the
counts are per process, and a resume replays the round after its newest checkpoint)."""


def test_sigkill_at_each_commit_point_then_resume_is_identical(tmp_path, write_run_config, reference, cli):
    """One run resumed after a SIGKILL at every commit point in turn ends exactly as the uninterrupted run: a
    resume of a resume is as exact as the first (and the suite runs one life, not one per commit point)."""
    config = write_run_config(tmp_path)
    run_dir = run_dir_of(config)
    for i, (fault, where) in enumerate(KILLS):
        command = ("run", str(config)) if i == 0 else ("resume", str(run_dir))
        killed = cli(*command, "--no-progress", fault=fault)
        assert killed.returncode == -signal.SIGKILL, (f"kill {i} ({fault}: {where}) never fired", killed.stderr[-3000:])
        assert not (run_dir / "final" / "evaluation.json").exists() or fault == "final:1"
    resumed = cli("resume", str(run_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert fingerprint(run_dir) == reference
    # MLflow: still one parent run, each round's metrics exactly once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    parents = client.search_runs([exp.experiment_id], "tags.`coalora.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(parents[0].info.run_id, "hypervolume")]
    assert steps == [0, 1, 2]


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, write_run_config, reference, cli):
    config = write_run_config(tmp_path)
    assert cli("run", str(config), "--no-progress", fault="final:1").returncode == -signal.SIGKILL
    run_dir = run_dir_of(config)
    newest = run_dir / "checkpoints" / "round-0002" / "trainable.safetensors"
    data = bytearray(newest.read_bytes())
    data[-8:] = b"\x00" * 8
    newest.write_bytes(bytes(data))
    resumed = cli("resume", str(run_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "round-0002 is corrupt or incomplete; falling back" in resumed.stderr
    assert fingerprint(run_dir) == reference  # round 2 replayed from round 1's checkpoint, identically
