"""`coalora sweep`: a 2-trial Ray Tune experiment interrupted with SIGINT while a trial runs, then restored with
`Tuner.restore(..., resume_unfinished=True)`: both trials finish and MLflow holds exactly one sweep parent run and
exactly one coalora parent run per trial, each nested under the sweep run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import ConfigError, build_config
from orchestrator.state import Ledger
from orchestrator.sweep import grid, parse_param, trial_bundles


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "sweep", *args]  # exactly `coalora sweep ARGS`


def sweep_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started
        proc.wait(10)
        raise


def test_grid_and_resources():
    _, ranks = parse_param("adapter.rank=4,8")
    _, seeds = parse_param("run.seed=0,1,2")
    trials = grid({"adapter.rank": ranks, "run.seed": seeds})
    assert [t["name"] for t in trials][:2] == ["rank-4_seed-0", "rank-4_seed-1"] and len(trials) == 6
    assert trials[0]["overrides"] == ["adapter.rank=4", "run.seed=0"]
    with pytest.raises(ConfigError):
        parse_param("run.name=a,b")
    cfg = build_config({"cluster": {"executor": "ray", "workers": 3, "cpus_per_worker": 2, "gpus_per_worker": 0.5}})
    assert trial_bundles(cfg) == [{"CPU": 1.0}] + [{"CPU": 2.0, "GPU": 0.5}] * 3
    with pytest.raises(ConfigError, match="divide one GPU"):
        trial_bundles(build_config({"cluster": {"executor": "ray", "gpus_per_worker": 0.3}}))


def test_sweep_interrupted_and_restored_has_no_duplicate_runs(write_run_config, tmp_path):
    config = write_run_config(tmp_path / "job", search={"rounds": 1})
    root = tmp_path / "job" / "runs"
    sweep_dir = root / "sweeps" / "s"
    second = sweep_dir / "runs" / "seed-1"
    env = sweep_env()
    log = (tmp_path / "sweep-1.log").open("w")
    proc = subprocess.Popen(
        sweep_cmd(str(config), "--param", "run.seed=0,1", "--name", "s", "--max-concurrent", "1",
                  "--max-failures", "1"),
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 420  # generous: the suite runs two tests at a time
        # Interrupt once the first trial has finished and the second one's run is under way: the restore must keep
        # the finished trial as it is and continue the interrupted run, not start it again.
        while time.monotonic() < deadline and proc.poll() is None:
            if (second / "ledger.jsonl").exists() and len(Ledger(second / "ledger.jsonl").entries()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "sweep-1.log").read_text()[-4000:]
        proc.send_signal(signal.SIGINT)
        rc = finish(proc, 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out1 = (tmp_path / "sweep-1.log").read_text()
    assert rc != 0, out1[-4000:]  # interrupted: not finished
    assert "coalora sweep --resume" in out1
    first_ledger = (sweep_dir / "runs" / "seed-0" / "ledger.jsonl").read_text()
    # (The tiny second run may still reach its end while Tune shuts down; either way its trial never reported.)

    log = (tmp_path / "sweep-2.log").open("w")
    proc = subprocess.Popen(sweep_cmd("--resume", str(sweep_dir)), cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    rc = finish(proc, 480)
    out2 = (tmp_path / "sweep-2.log").read_text()
    assert rc == 0, out1[-3000:] + "\n----\n" + out2[-4000:]

    for name in ("seed-0", "seed-1"):
        entries = Ledger(sweep_dir / "runs" / name / "ledger.jsonl").entries()
        assert [e["kind"] for e in entries].count("done") == 1
        assert [e["kind"] for e in entries].count("start") == 1  # resumed, never restarted from scratch
    assert (sweep_dir / "runs" / "seed-0" / "ledger.jsonl").read_text() == first_ledger  # finished trial untouched
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert sorted(r["trial"] for r in summary) == ["seed-0", "seed-1"] and all(r["error"] is None for r in summary)
    assert all("coa-lora.mean_target_accuracy" in r for r in summary)

    state = json.loads((sweep_dir / "sweep.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    exp = client.get_experiment_by_name("tests")
    sweeps = client.search_runs([exp.experiment_id], "tags.`coalora.role` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.run_id == state["sweep_run_id"]
    assert sweeps[0].info.status == "FINISHED"
    parents = client.search_runs([exp.experiment_id], "tags.`coalora.role` = 'parent'")
    assert sorted(p.info.run_name for p in parents) == ["seed-0", "seed-1"]
    assert all(p.data.tags["mlflow.parentRunId"] == state["sweep_run_id"] for p in parents)
    assert all(p.info.status == "FINISHED" for p in parents)
    for p in parents:  # the run's own children stay nested under it, one of each
        children = client.search_runs([exp.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{p.info.run_id}'")
        names = [c.data.tags.get("coalora.child") for c in children]
        assert len(names) == len(set(names)) and names
    assert not (tmp_path / "mlruns").exists()
