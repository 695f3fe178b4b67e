"""The README's "Your own data" examples, run as written from a directory laid out like the repository root (conf/
linked, the example data files created). Each command gets overrides appended after the README's own words, which
shrink the job to seconds (sizes, one round, the in-process executor) and swap the packaged models for tiny random
ones with the same tokenizers (MiniLM's; SmolLM2's with its chat template). The full-size CSV path with MiniLM is
tests/orchestrator/test_own_data.py."""

from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.runs import load_run_config

REPO = Path(__file__).resolve().parents[2]
FAST = ["cluster.executor=local", "search.rounds=1", "training.steps_per_round=2", "search.initial_budgets=3",
        "search.proposals_per_round=1", "search.fisher_examples=4", "search.cost_sample=4096",
        "evaluation.unseen=1", "evaluation.targets=[3.0,4.0]", "evaluation.baselines=[no_adapter]",
        "data.train_examples=32", "data.val_examples=16", "data.score_examples=8", "data.batch_size=8",
        "data.max_length=64"]


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own data"):text.index("## On a cluster")]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith(".venv/bin/coalora ")]


@pytest.fixture
def repo_like(tmp_path, monkeypatch, tracking_uri):
    (tmp_path / "conf").symlink_to(REPO / "conf")
    rng = random.Random(0)
    words = {"billing": "invoice card", "bug": "crash error", "login": "password locked", "refund": "money back",
             "shipping": "courier package"}
    lines = ["text,label"] + [f"ticket {i} {rng.choice(words[c].split())},{c}" for i in range(80) for c in words]
    (tmp_path / "tickets.csv").write_text("\n".join(lines) + "\n")
    for c in ("sports", "politics"):
        (tmp_path / "docs" / c).mkdir(parents=True)
        for i in range(30):
            (tmp_path / "docs" / c / f"{i}.txt").write_text(f"{c} story number {i}")
    records = [{"instruction": f"Double {i}.", "input": "", "output": str(2 * i)} for i in range(40)]
    (tmp_path / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return tmp_path


def test_the_three_worked_examples_run_as_written(repo_like, tiny_model_dir, tiny_chat_model_dir, capsys):
    commands = readme_commands()
    assert [c[0] for c in commands] == ["run", "export", "run", "run"]
    small = {"tickets": [f"model.name={tiny_model_dir}"], "docs": [f"model.name={tiny_model_dir}"],
             "instructions": [f"model.name={tiny_chat_model_dir}"]}
    for argv in commands:
        if argv[0] == "run":
            name = next(a.split("=", 1)[1] for a in argv if a.startswith("run.name="))
            argv = [*argv, *FAST, *small[name], "--no-progress"]
        assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])
    assert load_run_config(repo_like / "runs" / "tickets").data.labels == ("billing", "bug", "login", "refund",
                                                                            "shipping")
    assert json.loads((repo_like / "tickets-adapter" / "config.json").read_text())["id2label"]["4"] == "shipping"
    assert load_run_config(repo_like / "runs" / "docs").data.labels == ("politics", "sports")
    assert load_run_config(repo_like / "runs" / "instructions").model.task == "instruction"
