"""The driver through real Ray actors: the packaged MiniLM on 2 workers, and a worker process killed mid-call."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import build_config
from orchestrator.executor import RayExecutor
from orchestrator.runs import start_run, worker_spec
from orchestrator.state import Ledger
from workers.allocator import preload_library


@pytest.fixture
def ray_session():
    import ray

    yield
    ray.shutdown()


def parent_run(uri: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tests")
    parents = client.search_runs([exp.experiment_id], "tags.`coalora.role` = 'parent'")
    assert len(parents) == 1
    return client, parents[0]


@pytest.mark.integration
def test_minilm_two_rounds_on_two_worker_actors(make_config, ray_session):
    config, _ = make_config(
        model={"name": "minilm"},
        data={"max_length": 48, "train_examples": 256, "val_examples": 64, "score_examples": 32, "batch_size": 32},
        search={"rounds": 2, "initial_budgets": 6, "proposals_per_round": 2, "fisher_examples": 8,
                "cost_sample": 16384},
        training={"steps_per_round": 3},
        cluster={"executor": "ray", "workers": 2, "cpus_per_worker": 1},
    )
    run_dir, rows = start_run(build_config(config), progress=False)
    client, parent = parent_run(config["tracking"]["uri"])
    run_id = parent.info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "hypervolume")] == [0, 1, 2]
    for r in (1, 2):
        names = {a.path for a in client.list_artifacts(run_id, f"rounds/round-{r:04d}")}
        assert f"rounds/round-{r:04d}/pareto.png" in names and f"rounds/round-{r:04d}/pareto.md" in names
    assert {r["method"] for r in rows} == {"coa-lora", "no-adapter"}
    assert parent.info.status == "FINISHED"


def test_worker_killed_during_evaluation_run_completes_without_duplicates(make_config, ray_session, tmp_path,
                                                                         monkeypatch):
    marker = tmp_path / "worker-killed"
    monkeypatch.setenv("COALORA_FAULT_KILL_WORKER", f"score:{marker}")
    config, _ = make_config(cluster={"executor": "ray", "workers": 2, "cpus_per_worker": 1, "max_restarts": 2})
    run_dir, rows = start_run(build_config(config), progress=False)
    assert marker.exists()  # a worker process really died mid-evaluation
    entries = Ledger(run_dir / "ledger.jsonl").entries()
    for e in entries:
        if e["kind"] == "proposed":
            got = [x["config"] for x in entries
                   if x["kind"] == "result" and x.get("phase") == "candidate" and x["round"] == e["round"]]
            assert sorted(got) == sorted(e["configs"])  # each proposal exactly once
    initial = [x for x in entries if x["kind"] == "result" and x.get("phase") == "initial"]
    assert len(initial) == len({x["config"] for x in initial})
    client, parent = parent_run(config["tracking"]["uri"])
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "hypervolume")] == [0, 1, 2]
    children = client.search_runs([parent.info.experiment_id], "tags.`coalora.role` = 'child'")
    assert sorted(c.data.tags["coalora.child"] for c in children) == ["coa-lora", "no-adapter"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD: a Linux mechanism")
def test_workers_start_with_the_configured_allocator_and_train_the_same(make_config, ray_session):
    """training.allocator reaches the Ray worker processes (the library is mapped there, preloaded before Python
    started), and the run's numbers do not depend on it: torch aligns its buffers itself."""
    lib = preload_library("mimalloc")
    rows = {}
    for allocator in ("system", "mimalloc"):
        config, _ = make_config(run={"name": allocator}, training={"allocator": allocator},
                                cluster={"executor": "ray", "workers": 1, "cpus_per_worker": 1})
        cfg = build_config(config)
        spec = worker_spec(cfg)
        assert spec.preload == (lib if allocator == "mimalloc" else None)
        executor = RayExecutor(spec, 1, cpus=1, gpus=0, max_restarts=0, address=None)
        try:
            (pid,) = executor.pids()
            mapped = Path(f"/proc/{pid}/maps").read_text()
        finally:
            executor.shutdown()
        assert (Path(lib).name.split(".so")[0] in mapped) == (allocator == "mimalloc")
        _, rows[allocator] = start_run(cfg, progress=False)
    assert rows["system"] == rows["mimalloc"]
