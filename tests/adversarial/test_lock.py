"""One process per run directory: a second `run`/`resume` is refused with the holder's pid, while `status` and
`export` (read-only) still work; the lock dies with its process."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from orchestrator.export import export_run
from orchestrator.runs import resume_run, run_status
from orchestrator.state import LOCK_FILE, RunInUse, RunLock


def run_dir_of(config: dict) -> Path:
    return Path(config["run"]["root"]) / config["run"]["name"]


def test_two_concurrent_resumes_one_proceeds_and_the_ledger_is_an_uninterrupted_runs(
        tmp_path, write_run_config, cli, cli_start):
    import yaml

    reference = write_run_config(tmp_path / "reference")
    assert cli("run", str(reference), "--no-progress").returncode == 0
    expected = (run_dir_of(yaml.safe_load(reference.read_text())) / "ledger.jsonl").read_text()

    path = write_run_config(tmp_path / "contested")
    run_dir = run_dir_of(yaml.safe_load(path.read_text()))
    assert cli("run", str(path), "--no-progress", fault="trained:1").returncode == -signal.SIGKILL
    first = cli_start("resume", str(run_dir), "--no-progress", log=tmp_path / "first.log", pause="trained:10")
    lock = run_dir / LOCK_FILE
    deadline = time.monotonic() + 120
    while f"pid {first.pid} " not in (lock.read_text() if lock.exists() else ""):
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-2000:]
        time.sleep(0.1)
    second = cli("resume", str(run_dir), "--no-progress")
    assert second.returncode != 0
    assert f"is in use by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    status = cli("status", str(run_dir))  # read-only commands are not blocked
    assert status.returncode == 0 and "in progress" in status.stdout, status.stderr
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert (run_dir / "ledger.jsonl").read_text() == expected


def test_status_and_export_read_a_locked_run_and_resume_is_refused(make_config):
    from orchestrator.config import build_config
    from orchestrator.runs import start_run

    config, _ = make_config()
    run_dir, _ = start_run(build_config(config), progress=False)
    with RunLock(run_dir, holder="a test", wait_s=0):
        assert run_status(run_dir).finished
        assert (export_run(run_dir, bits=4.0, memory_mb=None, out=None) / "adapter_config.json").exists()
        with pytest.raises(RunInUse, match=r"is in use by pid \d+ \(a test\)"):
            resume_run(run_dir, progress=False)
    assert resume_run(run_dir, progress=False)  # released: a finished run returns its table


def test_lock_file_is_not_created_outside_a_run_directory(tmp_path):
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="is not a coalora run directory"):
        resume_run(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
