"""bench/accuracy's report parts that need no run: the learning-rate table across jobs, the differences across
training seeds, and the bench YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.accuracy.jobs import BENCH_DIR, job_config, job_seeds, load_bench
from bench.accuracy.report import lr_table, seeds_tables
from bench.accuracy.stats import paired_across_jobs, seed_differences


def _job(lr: float, means: dict[str, float], dataset: str = "reviews") -> dict:
    rows = [{"method": m, "configuration": "target 3"} for m in means]
    return {"model": "minilm", "dataset": dataset, "metric": "accuracy", "rows": rows, "mean_target": means,
            "config": {"training": {"lr": lr}, "data": {"val_examples": 1000}}}


def test_lr_table_puts_the_rates_side_by_side_and_marks_collapse_to_the_prior():
    results = [_job(3e-3, {"coa-lora": 0.5815, "qlora": 0.74, "no-adapter": 0.581}),
               _job(1e-3, {"coa-lora": 0.71, "qlora": 0.72, "no-adapter": 0.581}),
               _job(1e-3, {"coa-lora": 0.70, "no-adapter": 0.5}, dataset="other")]  # alone: no table
    text = "\n".join(lr_table(results))
    assert "## Learning rates: minilm + reviews" in text and "other" not in text
    assert "| method | lr 0.001 | lr 0.003 |" in text
    assert "| coa-lora | 0.7100 | 0.5815 (prior) |" in text
    assert "| qlora | 0.7200 | 0.7400 |" in text
    assert "| no-adapter | 0.5810 | 0.5810 |" in text
    assert lr_table(results[:1]) == []


def test_differences_across_seeds_cover_the_targets_and_pooled_rows_and_count_the_seeds_that_favour_coa():
    """Per other method: each target and each pooled row (not "unseen i", another draw per seed) across the seeds,
    and the report's "better at" counts a higher accuracy, or a lower loss per token, as CoA-LoRA's."""
    def seed(d25: float, unseen: float) -> list[dict]:
        rows = {"target 2.5": d25, "all targets": 0.001, "all unseen": unseen, "unseen 1": 0.5}
        return [{"other": "coa-no-theta", "configuration": c, "difference": d} for c, d in rows.items()]

    across = seed_differences([seed(0.03, -0.002), seed(0.02, 0.004), seed(0.025, 0.001)])
    assert set(across["coa-no-theta"]) == {"target 2.5", "all targets", "all unseen"}
    t25 = across["coa-no-theta"]["target 2.5"]
    assert t25["per_seed"] == [0.03, 0.02, 0.025] and t25["ci95"][0] > 0
    per_seed = [{"seed": s, "mean_target": {"coa-lora": 0.75}} for s in (0, 1, 2)]
    for metric, better in (("accuracy", "3/3"), ("loss", "0/3")):
        r = {"per_seed": per_seed, "metric": metric, "config": {"data": {"split_seed": 0}},
             "rows": [{"method": "coa-lora", "configuration": "target 2.5"}], "mean_target": {"coa-lora": 0.75},
             "across_seeds": across}
        text = "\n".join(seeds_tables(r))
        row = next(line for line in text.splitlines() if line.startswith("| coa-no-theta | target 2.5 |"))
        assert row.startswith("| coa-no-theta | target 2.5 | +0.0300 | +0.0200 | +0.0250 | +0.0250 [+0.0126, +0.0374]")
        assert row.endswith(f"| {better} |") and "| coa-no-theta | all unseen |" in text and "unseen 1" not in text


def test_two_jobs_at_several_seeds_are_also_compared_seed_by_seed():
    """paired_with over seeds: the pooled table on the seed-averaged scores, and each seed's own difference
    between the jobs' runs at that seed across the seeds."""
    import numpy as np

    rng = np.random.default_rng(0)

    def run(job: str, p_right: float) -> tuple[dict, dict]:
        scores = {("coa-lora", c): np.stack([rng.uniform(0.1, 2, 4000), rng.random(4000) < p_right], 1).astype(float)
                  for c in ("target 2.5", "target 3")}
        return {"job": job, "metric": "accuracy", "configurations": {"target 2.5": [1], "target 3": [2]}}, scores

    mine, theirs = [run(f"lq-seed{s}", 0.8) for s in range(3)], [run(f"zero-seed{s}", 0.7) for s in range(3)]
    mean = lambda runs: {k: np.mean([s[k] for _, s in runs], 0) for k in runs[0][1]}  # noqa: E731
    pooled = ({**mine[0][0], "job": "lq"}, mean(mine)), ({**theirs[0][0], "job": "zero"}, mean(theirs))
    out = paired_across_jobs(*pooled[0], *pooled[1], zip(mine, theirs))  # each seed's run is named <job>-seed<s>
    rows = out["across_seeds"]["coa-lora (zero)"]
    assert set(rows) == {"target 2.5", "target 3", "all targets"}
    for c in ("target 2.5", "target 3"):
        expected = [s[("coa-lora", c)][:, 1].mean() - o[("coa-lora", c)][:, 1].mean() for (_, s), (_, o) in zip(mine, theirs)]
        assert rows[c]["per_seed"] == pytest.approx(expected, abs=1e-12) and rows[c]["ci95"][0] > 0
    assert "across_seeds" not in paired_across_jobs(mine[0][0], mine[0][1], theirs[0][0], theirs[0][1], [])
    assert out["same_configuration"] == {"target 2.5": True, "target 3": True}


@pytest.mark.parametrize("name", ["quick", "full", "lr", "lota"])
def test_every_bench_yaml_resolves_at_each_seed(name, tmp_path):
    bench = load_bench(BENCH_DIR / f"{name}.yaml")
    for job in bench["jobs"]:
        seeds = job_seeds(job)
        configs = [job_config(job, [], tmp_path, f"sqlite:///{tmp_path / 'm.db'}", s)[0] for s in seeds]
        assert len({c.run.name for c in configs}) == len(seeds)
        if seeds != [None]:  # several training seeds, one set of held-out examples
            assert [c.run.seed for c in configs] == seeds and len({c.data.split_seed for c in configs}) == 1


def test_bad_seeds_are_refused_before_any_compute(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("jobs:\n  - name: a\n    bench: {seeds: [1, 1]}\n    run: {}\n")
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="bench.seeds must be a non-empty list of distinct integers"):
        load_bench(path)


def test_a_list_of_per_configuration_methods_runs_only_those_in_the_fixed_order():
    import numpy as np

    from bench.accuracy.jobs import BENCH_DEFAULTS, UNQUANTIZED, per_configuration_trainings

    targets = [("target 2.5", np.zeros(5)), ("target 3", np.ones(5))]
    unseen = [("unseen 1", np.full(5, 2.0)), ("unseen 2", np.full(5, 3.0))]
    opts = {**BENCH_DEFAULTS, "qlora_unseen": 1, "per_configuration": ["lora-fp", "qlora-projq", "qlora"]}
    calls = [(m, n) for m, n, _ in per_configuration_trainings(opts, targets, unseen)]
    assert calls == [("qlora", "target 2.5"), ("qlora", "target 3"), ("qlora-projq", "target 2.5"),
                     ("qlora-projq", "target 3"), ("lora-fp", UNQUANTIZED), ("qlora", "unseen 1")]
    # the run's own flags still drop what its space or quantizer cannot take; without qlora no unseen rows
    opts = {**opts, "qlora_projq": False, "per_configuration": ["qlora-projq", "lq-lora"]}
    assert [(m, n) for m, n, _ in per_configuration_trainings(opts, targets, unseen)] == [
        ("lq-lora", "target 2.5"), ("lq-lora", "target 3")]
    everything = per_configuration_trainings({**BENCH_DEFAULTS, "qlora_unseen": 0}, targets, unseen)
    assert len(everything) == 5 * 2 + 1 and per_configuration_trainings(
        {**BENCH_DEFAULTS, "per_configuration": False}, targets, unseen) == []


@pytest.mark.parametrize("value", ["[]", "[qlora, qlora]", "[qlora, dora]", "all"])
def test_a_bad_per_configuration_list_is_refused_before_any_compute(value, tmp_path: Path):
    from orchestrator.config import ConfigError

    path = tmp_path / "bad.yaml"
    path.write_text(f"jobs:\n  - name: a\n    bench: {{per_configuration: {value}}}\n    run: {{}}\n")
    with pytest.raises(ConfigError, match="bench.per_configuration must be true, false or a non-empty list"):
        load_bench(path)
