"""Resume refuses a ledger that lost or changed entries the newest checkpoint covers (nothing is modified), and
`--repair-ledger` restores the checkpoint's copy, after which the run ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.config import build_config
from orchestrator.loop.driver import LedgerMismatch
from orchestrator.runs import resume_run, start_run


@pytest.fixture(scope="module")
def finished(tmp_path_factory, write_run_config):
    import yaml

    path = write_run_config(tmp_path_factory.mktemp("finished"))
    config = yaml.safe_load(path.read_text())
    run_dir, _ = start_run(build_config(config), progress=False)
    return run_dir


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    out = tmp_path / "runs" / finished.name
    shutil.copytree(finished, out)
    return out


def covered(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoints" / "round-0002" / "meta.json").read_text())["ledger_len"]


def lines(run_dir: Path) -> list[str]:
    return (run_dir / "ledger.jsonl").read_text().splitlines(keepends=True)


def refuse_then_repair(run_dir: Path, reference: str, match: str) -> None:
    ledger = run_dir / "ledger.jsonl"
    before = ledger.read_bytes() if ledger.exists() else None
    with pytest.raises(LedgerMismatch, match=match) as err:
        resume_run(run_dir, progress=False)
    assert "--repair-ledger" in str(err.value)
    assert (ledger.read_bytes() if ledger.exists() else None) == before  # nothing changed
    resume_run(run_dir, progress=False, repair_ledger=True)
    assert ledger.read_text() == reference
    if before is not None:
        assert [p.read_bytes() for p in run_dir.glob("ledger.jsonl.bak-*")] == [before]


def test_torn_line_inside_the_checkpoint_is_refused_then_repaired(finished, copy):
    n = covered(copy)
    kept = lines(copy)[:n]
    (copy / "ledger.jsonl").write_text("".join(kept[:-1]) + kept[-1][: len(kept[-1]) // 2])  # round_end torn
    refuse_then_repair(copy, (finished / "ledger.jsonl").read_text(), rf"holds {n} line\(s\) but checkpoint round 2 "
                       rf"covers {n} entries")


def test_deleted_ledger_is_refused_then_repaired(finished, copy):
    (copy / "ledger.jsonl").unlink()
    refuse_then_repair(copy, (finished / "ledger.jsonl").read_text(), r"holds 0 line\(s\) but checkpoint round 2")


def test_edited_entry_is_refused_then_repaired(finished, copy):
    text = lines(copy)
    entry = json.loads(text[3])
    entry["loss"] = entry.get("loss", 0.0) + 1.0
    text[3] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    (copy / "ledger.jsonl").write_text("".join(text))
    refuse_then_repair(copy, (finished / "ledger.jsonl").read_text(), r"differ from those checkpoint round 2 covers")


def test_damage_after_the_checkpoint_is_replayed_without_a_question(finished, copy):
    text = lines(copy)
    n = covered(copy)
    text[n + 1] = "{not json\n"  # a final-evaluation entry, after what the checkpoint covers
    (copy / "ledger.jsonl").write_text("".join(text))
    resume_run(copy, progress=False)
    assert (copy / "ledger.jsonl").read_text() == (finished / "ledger.jsonl").read_text()


def test_nan_never_reaches_the_ledger(tmp_path):
    from orchestrator.state import Ledger

    ledger = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(ValueError, match="'result' holds a non-finite number"):
        ledger.append("result", loss=float("nan"))
    assert not (tmp_path / "ledger.jsonl").exists() or (tmp_path / "ledger.jsonl").read_text() == ""
