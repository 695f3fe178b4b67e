"""Paired differences between methods evaluated on the same validation examples, with 95% intervals.

Two methods' accuracies on 1,000 reviews differ by chance far less than two unpaired binomial errors suggest: most
examples are right (or wrong) under both. Pairing example by example is what lets a run resolve a 1-point gap. The
run's own adapter is compared with every other method per configuration and pooled over the targets and over the
unseen configurations; pooling averages each example's difference over the configurations first, so the interval
treats the examples (the random draw) as the unit and never counts one example twice.

- classification: the difference in accuracy (``main − other``; positive: the run's adapter is better), a mean of
  per-example differences of 0/1 correctness, with a normal interval (n ≥ 30 examples);
- language modelling: the difference in loss per token (``main − other``; negative: the run's adapter is better),
  a ratio of sums, with the delta-method interval of a ratio estimator clustered by example; ``exp`` of it is the
  perplexity ratio.

What the interval covers: which examples were drawn, for these trained adapters. It does not cover training noise
(another seed gives other adapters): repeat over seeds for that and take :func:`across_seeds` of the per-seed
differences (bench/theta.py, bench.accuracy's ``bench.seeds``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal."""
MIN_EXAMPLES = 2


def across_seeds(per_seed: Sequence[float]) -> dict[str, Any]:
    """The mean of one paired difference measured at several training seeds, with a Student-t 95% interval across
    the seeds (None from one seed). With three seeds t = 4.30: only a difference that every seed agrees on, by a
    margin larger than the seeds' spread, has an interval clear of zero."""
    from scipy.stats import t

    values = np.asarray(per_seed, dtype=np.float64)
    if values.ndim != 1 or not len(values) or not np.all(np.isfinite(values)):
        raise ValueError(f"need one finite difference per seed, got {per_seed!r}")
    mean, ci = float(values.mean()), None
    if len(values) > 1:
        half = float(t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
        ci = [mean - half, mean + half]
    return {"difference": mean, "ci95": ci, "per_seed": values.tolist()}


def paired_difference(main: Sequence[np.ndarray], other: Sequence[np.ndarray], kind: str) -> dict[str, Any]:
    """``main − other`` over one or more configurations: each argument is a list of (n, 2) per-example scores
    (``workers.tasks.EXAMPLE_COLUMNS``), one per configuration, the same n examples in the same order in all."""
    if len(main) != len(other) or not main:
        raise ValueError(f"need the same number (≥ 1) of configurations on both sides, got {len(main)} and {len(other)}")
    a, b = np.stack([np.asarray(x, dtype=np.float64) for x in main]), np.stack([np.asarray(x, dtype=np.float64) for x in other])
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 2:
        raise ValueError(f"scores must be (n, 2) per configuration and alike on both sides, got {a.shape} and {b.shape}")
    n = a.shape[1]
    if n < MIN_EXAMPLES:
        raise ValueError(f"a paired interval needs at least {MIN_EXAMPLES} examples, got {n}")
    out: dict[str, Any] = {"examples": n, "configurations": a.shape[0]}
    if kind == "classification":
        d = (a[..., 1] - b[..., 1]).mean(0)  # per example, averaged over the configurations
        mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
        out.update(unit="accuracy", difference=mean, ci95=[mean - Z95 * se, mean + Z95 * se])
        return out
    if not np.array_equal(a[..., 1], b[..., 1]):
        raise ValueError("the two methods were scored on different target tokens: not the same examples")
    d, t = (a[..., 0] - b[..., 0]).sum(0), a[..., 1].sum(0)  # per example: NLL difference and tokens
    if t.sum() <= 0:
        raise ValueError("no target tokens to compare")
    ratio = float(d.sum() / t.sum())
    se = float(math.sqrt(n / (n - 1) * np.square(d - ratio * t).sum()) / t.sum())
    lo, hi = ratio - Z95 * se, ratio + Z95 * se
    out.update(unit="loss per token", difference=ratio, ci95=[lo, hi],
               perplexity_ratio=math.exp(ratio), perplexity_ratio_ci95=[math.exp(lo), math.exp(hi)])
    return out


def paired_table(scores: Mapping[tuple[str, str], np.ndarray], main: str, kind: str) -> list[dict[str, Any]]:
    """``main`` against every other method (in ``scores``' order): per configuration both evaluated, then pooled
    over the targets, over the unseen configurations of random settings and over those drawn like the pool
    (configuration names start with "target" / "unseen" / "ilp-unseen")."""
    configurations = list(dict.fromkeys(c for m, c in scores if m == main))
    others = list(dict.fromkeys(m for m, _ in scores if m != main))
    rows = []
    for other in others:
        shared = [c for c in configurations if (other, c) in scores]
        groups = [(c, [c]) for c in shared]
        for label, prefix in (("targets", "target"), ("unseen", "unseen"), ("ilp-unseen", "ilp-unseen")):
            members = [c for c in shared if c.startswith(prefix)]
            if len(members) > 1:
                groups.append((f"all {label}", members))
        for label, members in groups:
            diff = paired_difference([scores[(main, c)] for c in members], [scores[(other, c)] for c in members], kind)
            rows.append({"method": main, "other": other, "configuration": label, **diff})
    return rows


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table of :func:`paired_table` for final/evaluation.md: accuracy in points, loss per token as is."""
    if not rows:
        return ""
    accuracy = rows[0]["unit"] == "accuracy"
    scale, unit = (100.0, "accuracy points; > 0: the run's adapter is better") if accuracy else \
        (1.0, "loss per token; < 0: the run's adapter is better")
    lines = [f"Paired differences, {rows[0]['method']} − other, on the same {rows[0]['examples']} examples ({unit}; "
             "95% interval over the examples, not over training seeds):", "",
             "| other | configuration | difference | 95% interval |" + ("" if accuracy else " perplexity ratio |"),
             "|---|---|---|---|" + ("" if accuracy else "---|")]
    for r in rows:
        lo, hi = (scale * x for x in r["ci95"])
        line = f"| {r['other']} | {r['configuration']} | {scale * r['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] |"
        if not accuracy:
            line += f" {r['perplexity_ratio']:.4f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"
