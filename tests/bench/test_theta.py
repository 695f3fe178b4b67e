"""bench/theta.py's statistics: paired differences per seed and the Student-t interval across seeds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("bench_theta", Path(__file__).resolve().parents[2] / "bench" / "theta.py")
theta = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(theta)


def record(seed: int, coa: list[float], other: list[float]) -> dict:
    rows = [{"method": m, "configuration": f"target {i}", "accuracy": a}
            for m, accs in (("coa-lora", coa), ("coa-no-theta", other)) for i, a in enumerate(accs)]
    return {"variant": "v", "seed": seed, "rows": rows}


def test_paired_difference_and_its_interval():
    records = [record(0, [0.80, 0.70], [0.78, 0.70]), record(1, [0.75, 0.75], [0.74, 0.72]),
               record(2, [0.70, 0.72], [0.70, 0.71])]
    result = theta.paired(records, "target", "coa-no-theta")
    assert result["per_seed"] == [1.0, 2.0, 0.5]  # mean over configurations, in accuracy points
    assert result["mean"] == pytest.approx(7 / 6, abs=0.01)
    sd = (sum((x - 7 / 6) ** 2 for x in (1.0, 2.0, 0.5)) / 2) ** 0.5
    half = 4.303 * sd / 3 ** 0.5
    assert result["ci95"] == [round(7 / 6 - half, 2), round(7 / 6 + half, 2)]
    assert theta.paired(records[:1], "target", "coa-no-theta")["ci95"] is None
    assert result["per_seed_example_ci95"] is None  # these runs recorded no per-example differences
    records[0]["paired"] = [{"other": "coa-no-theta", "configuration": "all targets", "ci95": [-0.004, 0.0212]},
                            {"other": "shared-lora", "configuration": "all targets", "ci95": [0.5, 0.6]},
                            {"other": "coa-no-theta", "configuration": "target 0", "ci95": [0.3, 0.4]}]
    assert theta.paired(records, "target", "coa-no-theta")["per_seed_example_ci95"] == [[-0.4, 2.12]]
    assert theta.mean_accuracy(records, "coa-lora", "target") == pytest.approx(100 * (0.75 + 0.75 + 0.71) / 3)


def test_across_variants_pairs_coa_lora_by_seed_and_target():
    mine = [dict(record(0, [0.80, 0.70], [0, 0]), variant="projq-shared"),
            dict(record(1, [0.75, 0.75], [0, 0]), variant="projq-shared")]
    defaults = [dict(record(1, [0.74, 0.70], [0, 0]), variant="defaults"),
                dict(record(2, [0.10, 0.10], [0, 0]), variant="defaults")]
    result = theta.across(mine, defaults)
    assert result["per_seed"] == [3.0] and result["ci95"] is None  # seed 0 has no twin, seed 2 no run of mine
    assert theta.across(mine[:1], defaults) is None
