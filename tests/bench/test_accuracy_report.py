"""bench/accuracy's report parts that need no run: the learning-rate table across jobs, and the bench YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.accuracy.jobs import BENCH_DIR, job_config, job_seeds, load_bench
from bench.accuracy.report import lr_table


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
