"""Paired differences (orchestrator/loop/paired.py) against scipy's paired t-test, on known data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from orchestrator.loop.paired import across_seeds, paired_difference, paired_table


def classification(correct: np.ndarray, seed: int) -> np.ndarray:
    loss = np.random.default_rng(seed).uniform(0.1, 2.0, correct.size)
    return np.stack([loss, correct.astype(np.float64)], 1)


def test_accuracy_difference_and_interval_agree_with_a_paired_t_test():
    rng = np.random.default_rng(0)
    a = rng.random(2000) < 0.78
    b = np.where(rng.random(2000) < 0.9, a, ~a)  # mostly the same examples right: a strong pairing
    got = paired_difference([classification(a, 1)], [classification(b, 2)], "classification")
    assert got["difference"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    lo, hi = stats.ttest_rel(a.astype(float), b.astype(float)).confidence_interval(0.95)
    assert got["ci95"] == pytest.approx([lo, hi], rel=2e-3)  # normal vs t quantile at n = 2000
    unpaired = 1.96 * np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert got["ci95"][1] - got["ci95"][0] < unpaired  # what pairing buys


def test_pooling_averages_each_example_over_the_configurations_first():
    rng = np.random.default_rng(1)
    a1, a2, b1, b2 = (rng.random(500) < p for p in (0.8, 0.7, 0.75, 0.72))
    pooled = paired_difference([classification(a1, 0), classification(a2, 0)],
                               [classification(b1, 0), classification(b2, 0)], "classification")
    per_example = ((a1.astype(float) - b1) + (a2.astype(float) - b2)) / 2
    lo, hi = stats.ttest_1samp(per_example, 0.0).confidence_interval(0.95)
    assert pooled["difference"] == pytest.approx(per_example.mean()) and pooled["configurations"] == 2
    assert pooled["ci95"] == pytest.approx([lo, hi], rel=1e-2)


def test_loss_per_token_is_a_ratio_of_sums_with_a_clustered_interval():
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 40, 800).astype(float)
    a = np.stack([tokens * rng.normal(3.0, 0.4, 800), tokens], 1)
    b = np.stack([a[:, 0] + tokens * rng.normal(0.05, 0.2, 800), tokens], 1)
    got = paired_difference([a], [b], "causal-lm")
    assert got["difference"] == pytest.approx((a[:, 0].sum() - b[:, 0].sum()) / tokens.sum())
    assert got["perplexity_ratio"] == pytest.approx(np.exp(got["difference"]))
    assert got["ci95"][0] < got["difference"] < got["ci95"][1] < 0  # b is worse by ~0.05 nats per token
    # equal lengths: the ratio estimator is a mean of per-token differences, and its interval a paired t-test's
    even = np.full(800, 20.0)
    a2, b2 = np.stack([a[:, 0] / tokens * even, even], 1), np.stack([b[:, 0] / tokens * even, even], 1)
    lo, hi = stats.ttest_rel(a2[:, 0] / 20, b2[:, 0] / 20).confidence_interval(0.95)
    assert paired_difference([a2], [b2], "causal-lm")["ci95"] == pytest.approx([lo, hi], rel=3e-3)


def test_identical_methods_differ_by_exactly_zero():
    scores = classification(np.random.default_rng(3).random(100) < 0.5, 0)
    got = paired_difference([scores], [scores.copy()], "classification")
    assert got["difference"] == 0.0 and got["ci95"] == [0.0, 0.0]


def test_bad_input_is_refused():
    a = classification(np.ones(10, bool), 0)
    with pytest.raises(ValueError, match="same number"):
        paired_difference([a], [a, a], "classification")
    with pytest.raises(ValueError, match=r"\(n, 2\) per configuration and alike"):
        paired_difference([a], [a[:5]], "classification")
    lm = np.stack([np.ones(10), np.full(10, 3.0)], 1)
    with pytest.raises(ValueError, match="different target tokens"):
        paired_difference([lm], [lm + [0, 1]], "causal-lm")


def test_the_table_compares_the_run_s_adapter_with_every_other_method_per_configuration_and_pooled():
    rng = np.random.default_rng(4)
    names = ["target 2.5", "target 3", "unseen 1", "ilp-unseen 1", "ilp-unseen 2"]
    scores = {(m, c): classification(rng.random(50) < 0.7, 0) for m in ("coa-lora", "no-adapter") for c in names}
    scores[("shared-lora", "target 2.5")] = classification(rng.random(50) < 0.7, 0)
    rows = paired_table(scores, "coa-lora", "classification")
    got = [(r["other"], r["configuration"]) for r in rows]
    assert got == [("no-adapter", c) for c in names] + [("no-adapter", "all targets"), ("no-adapter", "all ilp-unseen"),
                                                        ("shared-lora", "target 2.5")]  # one random unseen: no pool
    first = rows[0]
    assert first["difference"] == pytest.approx(scores[("coa-lora", names[0])][:, 1].mean()
                                                - scores[("no-adapter", names[0])][:, 1].mean())


def test_across_seeds_is_a_one_sample_t_interval_over_the_seeds():
    """Three seeds' differences: the interval is scipy's one-sample t interval (t = 4.30 at 2 degrees of freedom),
    wide enough that seeds which disagree in sign give an interval across zero; one seed gives no interval."""
    per_seed = [0.029, 0.021, 0.025]
    got = across_seeds(per_seed)
    assert got["difference"] == pytest.approx(np.mean(per_seed), abs=1e-15) and got["per_seed"] == per_seed
    lo, hi = stats.ttest_1samp(per_seed, 0.0).confidence_interval(0.95)
    assert got["ci95"] == pytest.approx([lo, hi], rel=1e-12) and lo > 0
    assert across_seeds([0.02, -0.01, 0.01])["ci95"][0] < 0 < across_seeds([0.02, -0.01, 0.01])["ci95"][1]
    assert across_seeds([0.01])["ci95"] is None
    for bad in ([], [0.1, float("nan")], [[0.1, 0.2]]):
        with pytest.raises(ValueError, match="one finite difference per seed"):
            across_seeds(bad)
