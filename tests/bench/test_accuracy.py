"""bench/accuracy --quick end to end on a tiny random model with tiny data, so the benchmark cannot rot: outputs
exist and have the right structure, the last stdout line is the headline JSON, MLflow holds one parent with one
child per method, a second run at seeds 0 and 1 repeats the first exactly at seed 0 (the documented tolerance is 0
on one machine) and pools the two, and a rerun reuses finished runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"coa-lora", "coa-no-theta", "qlora", "qlora-budget", "qlora-gptq", "qlora-projq", "lq-lora", "shared-lora",
           "lora-fp", "no-adapter"}
STEPS = 4  # rounds x steps_per_round: QLoRA trains 4 steps per target, QLoRA at equal total budget 4 / 4 = 1
TARGETS = ["target 2.5", "target 3", "target 3.5", "target 4"]
UNSEEN = 3
QLORA_UNSEEN = 2
ILP_UNSEEN = 2


def _overrides(model_dir: Path) -> list[str]:
    pairs = {
        "model.name": str(model_dir), "data.max_length": 24, "data.train_examples": 32, "data.val_examples": 16,
        "data.score_examples": 8, "data.batch_size": 16, "adapter.rank": 2, "adapter.alpha": 4,
        "training.steps_per_round": STEPS, "training.warmup_steps": 0, "search.rounds": 1, "search.initial_budgets": 3,
        "search.proposals_per_round": 1, "search.segments": 10, "search.fisher_examples": 2,
        "search.cost_sample": 4096, "evaluation.unseen": UNSEEN, "evaluation.unseen_ilp": ILP_UNSEEN,
    }
    return [a for k, v in pairs.items() for a in ("--override", f"{k}={v}")]


def _bench_yaml(seeds: list[int] | None = None, bench: str = "") -> str:
    """quick.yaml with smaller per-configuration options but every row (the GPTQ / ProjQ ones too), at ``seeds``,
    with ``bench`` added to its options."""
    quick = (ROOT / "conf" / "bench" / "quick.yaml").read_text()
    quick = quick.replace("qlora_unseen: 1", f"qlora_unseen: {QLORA_UNSEEN}").replace("lq_iterations: 100", "lq_iterations: 5")
    quick = quick.replace("qlora_gptq: false,\n            qlora_projq: false", "qlora_gptq: true, qlora_projq: true")
    if seeds is not None:
        quick = quick.replace("hv_reference: 0.5}", f"hv_reference: 0.5, seeds: {seeds}}}")
    return quick.replace("hv_reference: 0.5", f"hv_reference: 0.5{bench}")


def _run(tmp: Path, model_dir: Path, uri: str, seeds: list[int] | None = None,
         extra: list[str] = (), bench: str = "", text: str | None = None) -> tuple[dict, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "bench.yaml"
    config.write_text(text if text is not None else _bench_yaml(seeds, bench))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.accuracy", "--quick", "--config", str(config), "--out", str(tmp),
         "--tracking-uri", uri, *_overrides(model_dir), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last), proc.stdout


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("bench")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    first = _run(base / "a", tiny_model_dir, uri)
    second = _run(base / "b", tiny_model_dir, uri, seeds=[0, 1])
    return base, uri, first, second


def test_outputs_have_the_right_structure(two_runs):
    base, _, (head, stdout), _ = two_runs
    out = base / "a"
    md = (out / "results.md").read_text()
    assert "quick mode" in md and "strongest fair baseline" in md and "Tolerance" in md
    for name in ("accuracy-minilm-reviews.png", "curves-minilm-reviews.png"):
        png = out / "results" / name
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name
        assert f"(results/{name})" in md
    raw = json.loads((out / "results" / "accuracy.json").read_text())
    job = raw["jobs"][0]
    rows = {(r["method"], r["configuration"]) for r in job["rows"]}
    for m in METHODS:
        for t in TARGETS:
            assert (m, t) in rows, (m, t)
    unseen = [f"unseen {i}" for i in range(1, UNSEEN + 1)]
    assert job["unseen"] == unseen
    for m in ("coa-lora", "coa-no-theta", "shared-lora", "no-adapter"):
        assert all((m, u) in rows for u in unseen)
    assert [u for u in unseen if ("qlora", u) in rows] == unseen[:QLORA_UNSEEN]
    # the unseen configurations drawn like the pool: every method the run evaluates, reported apart
    ilp = job["ilp_unseen"]
    assert 1 <= len(ilp) <= ILP_UNSEEN and all(n.startswith("ilp-unseen") for n in ilp)
    assert all(("coa-lora", n) in rows and ("coa-no-theta", n) in rows and ("qlora", n) not in rows for n in ilp)
    assert set(job["ilp_unseen_mean"]) == {"coa-lora", "coa-no-theta", "shared-lora", "no-adapter"}
    assert "### Unseen configurations drawn like the pool" in md
    assert not any((m, u) in rows for u in unseen for m in ("lq-lora", "qlora-gptq", "qlora-projq"))
    loss = {(r["method"], r["configuration"]): r["loss"] for r in job["rows"]}
    assert any(loss[("qlora-gptq", t)] != loss[("qlora", t)] for t in TARGETS)  # other codes, same everything else
    assert any(loss[("qlora-budget", t)] != loss[("qlora", t)] for t in TARGETS)  # 1 step each, not 4
    assert job["baseline_steps_per_configuration"] == STEPS  # rounds x steps_per_round
    # step-0 compensation error of each init: RTN with B = 0 is 1 by definition; ProjQ starts below GPTQ and RTN
    init = {(r["method"], r["configuration"]): r.get("init_error") for r in job["rows"]}
    for t in TARGETS:
        assert init[("qlora", t)] == pytest.approx(1.0, abs=1e-9) and init[("lora-fp", t)] is None
        assert init[("qlora-projq", t)] < min(1.0, init[("qlora-gptq", t)]) and init[("lq-lora", t)] > 0
    assert "### Step-0 error-compensation loss" in md
    # the ceiling is one model on the unquantized base: the same figures at every target, 32-bit weights
    ceiling = [r for r in job["rows"] if r["method"] == "lora-fp"]
    assert [r["configuration"] for r in ceiling] == TARGETS and {r["avg_bits"] for r in ceiling} == {32.0}
    assert len({(r["accuracy"], r["loss"]) for r in ceiling}) == 1
    assert "lora-fp" not in job["hypervolume_targets"]
    for r in job["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["avg_bits"] > 2.0
    # every training's loss per step: the run's methods from its final/curves.json, each per-configuration one
    curves = job["curves"]
    assert {m: len(c) for m, c in curves.items() if " | " not in m} == {"coa-lora": STEPS, "coa-no-theta": STEPS,
                                                                         "shared-lora": STEPS}
    assert len(curves["qlora | target 2.5"]) == len(curves["lora-fp | unquantized"]) == STEPS
    assert len(curves["qlora-budget | target 4"]) == 1 and len(curves[f"qlora | unseen {QLORA_UNSEEN}"]) == STEPS
    assert all(v > 0 for c in curves.values() for v in c)
    for m in METHODS:
        assert f"| {m} |" in md
    # the headline: last stdout line
    assert head["mode"] == "quick"
    h = head["minilm-reviews"]
    assert set(h["mean_target"]) == METHODS and set(h["minutes"]) >= METHODS
    assert h["gap_coa_minus_qlora"] == pytest.approx(h["mean_target"]["coa-lora"] - h["mean_target"]["qlora"], abs=1e-3)
    assert all(0.0 <= v <= 1.0 for v in h["hv_targets"].values())
    assert "coa-lora" in stdout and "lq-lora" in stdout
    # paired: CoA-LoRA minus every other method on the same validation examples, per target and pooled
    acc = {(r["method"], r["configuration"]): r["accuracy"] for r in job["rows"]}
    paired = h["paired_coa_minus"]
    assert set(paired) == METHODS - {"coa-lora"}
    for other in ("qlora", "qlora-gptq", "lq-lora", "shared-lora", "no-adapter"):
        assert "all targets" in paired[other]
        for t in TARGETS:
            diff, low, high = paired[other][t]
            assert diff == pytest.approx(acc[("coa-lora", t)] - acc[(other, t)], abs=1e-4) and low <= diff <= high
    assert set(paired["qlora"]) == set(TARGETS) | set(unseen[:QLORA_UNSEEN]) | {"all targets", "all unseen"}
    assert "### Paired differences" in md


def test_mlflow_parent_with_one_child_per_method(two_runs):
    from mlflow.tracking import MlflowClient

    _, uri, (head, _), _ = two_runs
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("coalora-bench")
    parent = client.get_run(head["mlflow_parent_run"])
    assert parent.info.experiment_id == exp.experiment_id and parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(METHODS)
    for c in children:
        assert "mean_target_accuracy" in c.data.metrics and "train_minutes" in c.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "accuracy.json"} <= artifacts


def test_two_runs_give_identical_numbers(two_runs):
    base, _, _, _ = two_runs
    a = json.loads((base / "a" / "results" / "accuracy.json").read_text())["jobs"][0]
    b = json.loads((base / "b" / "results" / "jobs" / "minilm-reviews-seed0.json").read_text())["result"]
    key = lambda r: (r["method"], r["configuration"])  # noqa: E731
    ra = {key(r): (r["avg_bits"], r["accuracy"], r["loss"]) for r in a["rows"]}
    rb = {key(r): (r["avg_bits"], r["accuracy"], r["loss"]) for r in b["rows"]}
    assert ra == rb
    assert a["configurations"] == b["configurations"]
    assert a["curves"] == b["curves"]


def test_seeds_are_pooled_on_the_same_held_out_examples(two_runs):
    """bench.seeds = [0, 1]: two runs of the job that differ in run.seed only (data.split_seed = 0 for both), pooled:
    each row's accuracy is the mean of the seeds', every pooled paired difference is the mean of the seeds' per
    example, and the report shows each seed beside the pooled figures."""
    base, _, _, (head, _) = two_runs
    out = base / "b" / "results"
    seeds = [json.loads((out / "jobs" / f"minilm-reviews-seed{s}.json").read_text())["result"] for s in (0, 1)]
    assert [r["config"]["run"]["seed"] for r in seeds] == [0, 1]
    assert [r["config"]["data"]["split_seed"] for r in seeds] == [0, 0]
    pooled = json.loads((out / "accuracy.json").read_text())["jobs"][0]
    assert pooled["job"] == "minilm-reviews" and pooled["seeds"] == [0, 1] and head["minilm-reviews"]["seeds"] == [0, 1]
    acc = [{(r["method"], r["configuration"]): r["accuracy"] for r in s["rows"]} for s in seeds]
    loss = [{(r["method"], r["configuration"]): r["loss"] for r in s["rows"]} for s in seeds]
    assert loss[0][("coa-lora", "target 3")] != loss[1][("coa-lora", "target 3")]  # another init and data order
    for row in pooled["rows"]:
        k = (row["method"], row["configuration"])
        assert row["accuracy"] == pytest.approx((acc[0][k] + acc[1][k]) / 2, abs=1e-12)
        assert row["loss"] == pytest.approx((loss[0][k] + loss[1][k]) / 2, abs=1e-12)
        assert row["per_seed"] == [acc[0][k], acc[1][k]]
    diffs = {(d["other"], d["configuration"]): d["difference"] for d in pooled["paired"]}
    for t in TARGETS:
        mean_diff = (acc[0][("coa-lora", t)] - acc[0][("qlora", t)] + acc[1][("coa-lora", t)] - acc[1][("qlora", t)]) / 2
        assert diffs[("qlora", t)] == pytest.approx(mean_diff, abs=1e-9)
    assert [p["seed"] for p in pooled["per_seed"]] == [0, 1]
    for t in TARGETS:  # across the seeds: the mean of each seed's own paired difference, with a t interval
        per_seed = [acc[s][("coa-lora", t)] - acc[s][("qlora", t)] for s in (0, 1)]
        across = pooled["across_seeds"]["qlora"][t]
        assert across["per_seed"] == pytest.approx(per_seed, abs=1e-9)
        assert head["minilm-reviews"]["across_seeds"]["qlora"][t][0] == pytest.approx(sum(per_seed) / 2, abs=1e-4)
    md = (base / "b" / "results.md").read_text()
    assert "### Training seeds (2: 0, 1)" in md and "data.split_seed = 0" in md
    assert "| qlora | target 3 |" in md and "across the seeds" in md


def test_saved_seeds_pool_where_their_space_file_is_gone(two_runs):
    """Saved runs record the absolute path of their space; pooled on another checkout (CI, a colleague's machine)
    that path does not exist. Pooling takes the bit range the runs recorded instead, and gives the same result."""
    from safetensors.torch import load

    from bench.accuracy.stats import pool_seeds

    base, _, _, _ = two_runs
    out = base / "b" / "results"
    runs = []
    for seed in (0, 1):
        result = json.loads((out / "jobs" / f"minilm-reviews-seed{seed}.json").read_text())["result"]
        result["config"]["search"]["space"] = str(base / "elsewhere" / "space.yaml")
        saved = load((out / "jobs" / f"minilm-reviews-seed{seed}.safetensors").read_bytes())
        runs.append((result, {tuple(k.split("|", 1)): v.numpy() for k, v in saved.items()}))
    pooled = pool_seeds(runs, "minilm-reviews")
    expected = json.loads((out / "accuracy.json").read_text())["jobs"][0]
    assert pooled["hv_reference"] == expected["hv_reference"]
    assert pooled["hypervolume_targets"] == pytest.approx(expected["hypervolume_targets"])
    assert pooled["mean_target"] == pytest.approx(expected["mean_target"])


def test_a_rerun_reuses_finished_jobs_and_reruns_changed_ones(two_runs, tiny_model_dir):
    """Each finished job is saved at once; the same command again renders from it without training, and a job
    whose YAML entry or overrides changed is not taken from the saved file."""
    from bench.accuracy.__main__ import _fingerprint, finished_job

    base, uri, (head, _), _ = two_runs
    again, stdout = _run(base / "a", tiny_model_dir, uri)
    assert "finished before" in stdout and "coa-lora run (product path" not in stdout
    assert again["minilm-reviews"]["mean_target"] == head["minilm-reviews"]["mean_target"]
    saved = json.loads((base / "a" / "results" / "jobs" / "minilm-reviews.json").read_text())
    job, overrides = (json.loads(saved["fingerprint"])[k] for k in ("job", "overrides"))
    results = base / "a" / "results"
    assert finished_job(results, "minilm-reviews", _fingerprint(job, overrides, None), print) is not None
    changed = [o if not o.startswith("training.steps_per_round=") else "training.steps_per_round=5" for o in overrides]
    assert finished_job(results, "minilm-reviews", _fingerprint(job, changed, None), print) is None


def test_a_seed_run_is_reused_when_the_job_pools_other_seeds(tmp_path):
    """bench.seeds lists the seeds a job pools; one seed's run does not depend on it, so extending [0, 1] to
    [0, 1, 2] reuses seeds 0 and 1, also from a record saved when the whole YAML entry was its fingerprint."""
    import numpy as np

    from bench.accuracy.__main__ import _fingerprint, finished_job, save_job

    job = {"name": "j", "bench": {"seeds": [0, 1], "qlora_unseen": 0}, "run": {"training": {"lr": 1e-3}}}
    save_job(tmp_path, "j-seed1", _fingerprint(job, [], 1), {"x": 1}, {("m", "c"): np.zeros(2)}, 1.0)
    extended = {**job, "bench": {"seeds": [0, 1, 2], "qlora_unseen": 0}}
    assert finished_job(tmp_path, "j-seed1", _fingerprint(extended, [], 1), print) is not None
    assert finished_job(tmp_path, "j-seed1", _fingerprint(extended, [], 2), print) is None
    assert finished_job(tmp_path, "j-seed1", _fingerprint({**extended, "run": {"training": {"lr": 2e-3}}}, [], 1),
                        print) is None
    assert finished_job(tmp_path, "j-seed1", _fingerprint({**extended, "bench": {"seeds": [1], "qlora_unseen": 2}},
                                                          [], 1), print) is None
    record = tmp_path / "jobs" / "j-seed1.json"
    legacy = json.loads(record.read_text())
    legacy["fingerprint"] = json.dumps({"job": job, "overrides": [], "seed": 1}, sort_keys=True, default=str)
    record.write_text(json.dumps(legacy))
    assert finished_job(tmp_path, "j-seed1", _fingerprint(extended, [], 1), print) is not None


def test_a_single_run_is_reused_as_its_own_seed_when_the_job_gains_seeds(tmp_path, monkeypatch):
    """A job that ran once (no bench.seeds) and is then pooled over seeds [0, 1, 2] at run.seed 0 reuses its single
    run as seed 0 (same seed, same held-out examples); seeds 1 and 2, and seed 0 of a job at run.seed 1, run."""
    import argparse

    import numpy as np

    import bench.accuracy.__main__ as main_mod

    single = {"name": "j", "bench": {"qlora_unseen": 0}, "run": {"run": {"seed": 0}, "training": {"lr": 1e-3}}}
    main_mod.save_job(tmp_path, "j", main_mod._fingerprint(single, [], None), {"x": 1}, {("m", "c"): np.ones(2)}, 1.0)
    ran: list[int | None] = []

    def fake_run(job, overrides, work, uri, log, seed=None):
        ran.append(seed)
        return {"x": 2}, {("m", "c"): np.zeros(2)}

    monkeypatch.setattr(main_mod, "run_job", fake_run)
    monkeypatch.setattr(main_mod, "pool_seeds", lambda runs, name: [r for r, _ in runs])
    args = argparse.Namespace(override=[], fresh=False)
    pooled, scores, _, runs = main_mod.run_or_reuse({**single, "bench": {"qlora_unseen": 0, "seeds": [0, 1, 2]}},
                                                    args, tmp_path, tmp_path, "", print)
    assert ran == [1, 2] and pooled == [{"x": 1}, {"x": 2}, {"x": 2}] and [r for r, _ in runs] == pooled
    np.testing.assert_allclose(scores[("m", "c")], [1 / 3, 1 / 3])
    ran.clear()
    main_mod.run_or_reuse({**single, "bench": {"qlora_unseen": 0, "seeds": [0]}, "run": {"run": {"seed": 1}}}, args,
                          tmp_path, tmp_path, "", print)
    assert ran == [0]


def test_a_lota_job_runs_in_the_run_methods_place(tiny_model_dir, tmp_path):
    """A job of adapter.kind lota over a space of int codes goes through the same protocol: LoTA is the run's
    method (its rows, the paired differences and the gaps are LoTA's), the per-configuration rows train on the same
    int configurations, and there is no coa-no-theta (LoTA has no θ)."""
    space = tmp_path / "int.yaml"
    space.write_text("code: [int2, int3, int4]\nscale_bits: [4, 8]\nscale2_format: [fp32]\nblock0: [16, 32]\n"
                     "block1: [4]\n")
    extra = ["--override", "adapter.kind=lota", "--override", "adapter.omega=0.25", "--override",
             f"search.space={space}", "--override", "search.budget_min=2.5", "--override", "search.budget_max=4.75"]
    head, stdout = _run(tmp_path / "out", tiny_model_dir, f"sqlite:///{tmp_path / 'mlflow.db'}", extra=extra,
                        bench=", qlora_gptq: false, qlora_projq: false")
    job = head["minilm-reviews"]
    assert job["main"] == "lota" and "lota run (product path" in stdout
    assert set(job["mean_target"]) == {"lota", "qlora", "qlora-budget", "lq-lora", "shared-lora", "lora-fp",
                                       "no-adapter"}
    assert set(job["unseen_mean"]) == {"lota", "shared-lora", "no-adapter"}
    assert job["gap_coa_minus_qlora"] == pytest.approx(job["mean_target"]["lota"] - job["mean_target"]["qlora"],
                                                       abs=1e-3)
    assert set(job["paired_coa_minus"]) == {"qlora", "qlora-budget", "lq-lora", "shared-lora", "lora-fp",
                                            "no-adapter"}
    raw = json.loads((tmp_path / "out" / "results" / "accuracy.json").read_text())["jobs"][0]
    assert raw["config"]["search"]["space"] == str(space)
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.startswith("# LoTA vs per-configuration fine-tuning") and "LoTA − QLoRA **" in md


def test_a_job_paired_with_another_runs_the_product_path_only_and_pairs_their_run_methods(two_runs, tiny_model_dir,
                                                                                          tmp_path):
    """A second job of the file that varies the init (adapter.init projq-shared), with per_configuration false and
    paired_with the first: the first is reused from its saved runs, the second trains only the product path, and
    its run method is paired with the first's example by example on the configurations both evaluated."""
    import shutil

    import yaml

    base, uri, (head, _), _ = two_runs
    data = yaml.safe_load(_bench_yaml())
    second = {**data["jobs"][0], "name": "minilm-reviews-projq-shared",
              "bench": {"per_configuration": False, "paired_with": "minilm-reviews", "hv_reference": 0.5}}
    second["run"] = {**second["run"], "adapter": {**second["run"]["adapter"], "init": "projq-shared",
                                                             "reference": "none"}}
    data["jobs"].append(second)
    shutil.copytree(base / "a" / "results" / "jobs", tmp_path / "results" / "jobs")
    both, stdout = _run(tmp_path, tiny_model_dir, uri, text=yaml.safe_dump(data, sort_keys=False))
    assert "[minilm-reviews] finished before" in stdout
    assert "[minilm-reviews-projq-shared] coa-lora run (product path" in stdout
    assert "minilm-reviews-projq-shared] " + "per-configuration trainings" not in stdout
    job, first = both["minilm-reviews-projq-shared"], both["minilm-reviews"]
    assert first["mean_target"] == head["minilm-reviews"]["mean_target"]
    assert set(job["mean_target"]) == {"coa-lora", "coa-no-theta", "shared-lora", "no-adapter"}
    assert job["gap_coa_minus_qlora"] != job["gap_coa_minus_qlora"]  # NaN: no QLoRA rows in this job
    pooled = job["paired_jobs"]["coa-lora (minilm-reviews)"]
    assert set(TARGETS) | {"all targets", "all unseen", "all ilp-unseen"} <= set(pooled)
    # accuracy pairs example by example: the pooled difference is the difference of the two jobs' target means
    assert pooled["all targets"][0] == pytest.approx(
        job["mean_target"]["coa-lora"] - first["mean_target"]["coa-lora"], abs=2e-4)
    assert pooled["all targets"][1] <= pooled["all targets"][0] <= pooled["all targets"][2]
    raw = json.loads((tmp_path / "results" / "accuracy.json").read_text())["jobs"][1]
    assert raw["config"]["adapter"]["init"] == "projq-shared"
    assert all(raw["paired_jobs"]["same_configuration"][t] for t in TARGETS)  # the base is quantized alike
    md = (tmp_path / "results.md").read_text()
    assert "### Against job minilm-reviews" in md and "coa-lora (minilm-reviews-projq-shared) − other" in md


def test_a_pairing_that_cannot_pair_is_refused_before_compute(tmp_path):
    """paired_with must name another job of the file, and the two must share model, data, targets and seeds."""
    import yaml

    from bench.accuracy.jobs import check_pairing, job_config, load_bench
    from orchestrator.config import ConfigError

    data = yaml.safe_load(_bench_yaml())
    data["jobs"][0]["bench"]["paired_with"] = "minilm-reviews"
    path = tmp_path / "self.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="another job of the file"):
        load_bench(path)
    first = yaml.safe_load(_bench_yaml())["jobs"][0]
    other = {**first, "name": "other", "run": {**first["run"], "data": {**first["run"]["data"], "val_examples": 64}}}
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg, other_cfg = (job_config(j, [], tmp_path, uri)[0] for j in (first, other))
    with pytest.raises(ConfigError, match="differs in data"):
        check_pairing(first, cfg, other, other_cfg)
    check_pairing(first, cfg, {**first, "name": "same"}, cfg)  # the same model and data pair


def test_contrasts_pair_two_baselines_across_seeds_from_the_saved_runs(two_runs, tiny_model_dir, tmp_path):
    """bench.contrasts [[qlora-gptq, qlora]] added to the two-seed job: nothing trains again (the pair is read off
    the saved scores), the pooled a − b per target is the seeds' mean accuracy difference, the across-seeds one
    holds each seed's own difference, the reversed pair is its negative, and results.md and the headline show it."""
    import shutil

    base, uri, _, _ = two_runs
    shutil.copytree(base / "b" / "results" / "jobs", tmp_path / "results" / "jobs")
    head, stdout = _run(tmp_path, tiny_model_dir, uri, seeds=[0, 1],
                        bench=", contrasts: [[qlora-gptq, qlora], [qlora, qlora-gptq]]")
    assert "finished before" in stdout and "coa-lora run (product path" not in stdout
    seeds = [json.loads((tmp_path / "results" / "jobs" / f"minilm-reviews-seed{s}.json").read_text())["result"]
             for s in (0, 1)]
    acc = [{(r["method"], r["configuration"]): r["accuracy"] for r in s["rows"]} for s in seeds]
    got = head["minilm-reviews"]["contrasts"]
    forward, backward = got["qlora-gptq - qlora"], got["qlora - qlora-gptq"]
    for t in TARGETS:
        per_seed = [acc[s][("qlora-gptq", t)] - acc[s][("qlora", t)] for s in (0, 1)]
        assert forward["pooled"][t][0] == pytest.approx(sum(per_seed) / 2, abs=1e-4)
        assert forward["across_seeds"][t][0] == pytest.approx(sum(per_seed) / 2, abs=1e-4)
        assert backward["pooled"][t][0] == pytest.approx(-forward["pooled"][t][0], abs=1e-4)
        lo, hi = forward["pooled"][t][1:]
        assert lo <= forward["pooled"][t][0] <= hi
    raw = json.loads((tmp_path / "results" / "accuracy.json").read_text())["jobs"][0]["contrasts"][0]
    assert raw["across_seeds"]["target 3"]["per_seed"] == pytest.approx(
        [acc[s][("qlora-gptq", "target 3")] - acc[s][("qlora", "target 3")] for s in (0, 1)], abs=1e-9)
    md = (tmp_path / "results.md").read_text()
    assert "### Contrasts between methods" in md and "| qlora-gptq − qlora | all targets |" in md


def test_a_contrast_the_job_cannot_give_is_refused_before_compute(tmp_path):
    """A pair that is not two methods, or names a method the job does not evaluate (qlora-projq with qlora_projq
    off), is refused before anything trains."""
    import yaml

    from bench.accuracy.__main__ import main
    from bench.accuracy.jobs import load_bench
    from orchestrator.config import ConfigError

    data = yaml.safe_load(_bench_yaml())
    for bad in ([["qlora", "qlora"]], [["qlora"]], [["qlora", "nope"]], []):
        data["jobs"][0]["bench"]["contrasts"] = bad
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match="bench.contrasts"):
            load_bench(tmp_path / "bad.yaml")
    data["jobs"][0]["bench"].update(contrasts=[["qlora-projq", "qlora"]], qlora_projq=False)
    (tmp_path / "off.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit, match=r"names \['qlora-projq'\], which the job does not evaluate"):
        main(["--config", str(tmp_path / "off.yaml"), "--out", str(tmp_path / "out")])
    assert not list((tmp_path / "out" / "results").glob("jobs/*"))
