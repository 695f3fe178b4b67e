"""Divergence is named where it happens (round, step, configurations, loss, learning rate), the bad update is never
applied, and nothing non-finite is written to the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import build_config
from orchestrator.loop.driver import DivergenceError
from orchestrator.runs import resume_run, start_run


def strict_entries(path: Path) -> list[dict]:
    def refuse(token: str) -> float:
        raise AssertionError(f"ledger holds {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_huge_learning_rate_is_named_at_the_step_and_repeats_on_resume(make_config):
    config, _ = make_config(training={"lr": 1e3, "grad_clip": 1e30, "warmup_steps": 0})
    with pytest.raises(DivergenceError) as err:
        start_run(build_config(config), progress=False)
    message = str(err.value)
    assert "diverged" in message and "training.lr = 1000" in message and "bits)" in message
    run_dir = Path(config["run"]["root"]) / "tiny"
    entries = strict_entries(run_dir / "ledger.jsonl")
    assert entries and all(e["kind"] != "done" for e in entries)
    ledger = (run_dir / "ledger.jsonl").read_bytes()
    with pytest.raises(DivergenceError) as again:  # deterministic: the same steps diverge the same way
        resume_run(run_dir, progress=False)
    assert str(again.value) == message
    assert (run_dir / "ledger.jsonl").read_bytes() == ledger
