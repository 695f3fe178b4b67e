"""Human-readable outputs of a run: the per-round Pareto plot and table, the hypervolume over rounds, the training
loss curves, and the final evaluation as a table and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def _pyplot():
    """matplotlib's pyplot on the file-only backend (runs on headless workers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write and close a figure; returns ``path``."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def pareto_plot(bits: np.ndarray, loss: np.ndarray, selected: np.ndarray, path: Path, title: str, *,
                new: np.ndarray | None = None, edges: Sequence[float] = (), segments: int = 0) -> Path:
    """Every pool configuration (average bits vs scoring loss) as a hollow circle; the training set filled on top,
    joined along the bit axis; this round's new proposals as triangles; the Pareto segments as light vertical lines.
    The legend counts each kind, so a training set equal to the pool reads as such; ``segments`` is how many
    segments the whole space has (``edges`` are those near the pool)."""
    plt = _pyplot()
    new = np.zeros(len(bits), dtype=bool) if new is None else new
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for edge in edges:
        ax.axvline(edge, c="0.9", lw=0.8, zorder=0)
    ax.scatter(bits, loss, s=46, facecolors="none", edgecolors="0.55", label=f"pool ({len(bits)})", zorder=2)
    order = np.argsort(bits[selected])
    ax.plot(bits[selected][order], loss[selected][order], "o-", ms=4, c="C3", lw=1, zorder=3,
            label=f"training set: segment Pareto ({int(selected.sum())} of {len(bits)})")
    if new.any():
        ax.scatter(bits[new], loss[new], s=60, marker="^", c="C0", zorder=4,
                   label=f"proposed this round ({int(new.sum())})")
    if len(edges):
        ax.plot([], [], c="0.85", lw=0.8, label=f"segment edges ({segments} segments over the space)")
    ax.set_xlabel("average bits per weight (target matrices)")
    ax.set_ylabel("scoring loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def hypervolume_plot(rounds: Sequence[int], values: Sequence[float], path: Path) -> Path:
    """Normalised hypervolume of the pool after each round (round 0: the initial ILP pool): does the search still
    find better configurations?"""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=110)
    ax.plot(list(rounds), list(values), "o-", c="C3", ms=4)
    ax.set_xlabel("round (0: initial pool)")
    ax.set_ylabel("hypervolume of the pool (normalised)")
    ax.set_title("search progress")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The trailing mean over up to ``window`` values at each step (shorter at the start): a training loss drawn
    from a few batches per step is too noisy to show whether it has flattened."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curves_plot(curves: Mapping[str, Sequence[float]], path: Path, title: str = "training loss",
                     window: int = 5) -> Path:
    """Training loss per optimizer step of each method (``curves``: label → per-step losses), raw values faint and
    their ``window``-step moving average solid: have the losses flattened by the last step?"""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for i, (label, losses) in enumerate(curves.items()):
        steps = range(1, len(losses) + 1)
        ax.plot(steps, list(losses), c=f"C{i % 10}", lw=0.6, alpha=0.3)
        ax.plot(steps, moving_average(list(losses), window), c=f"C{i % 10}", lw=1.4, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss ({window}-step moving average)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def evaluation_plot(rows: Sequence[dict[str, Any]], metric: str, path: Path) -> Path:
    """The final evaluation: ``metric`` against average bits, one colour per method; the target budgets' ILP
    configurations filled and joined, the unseen ones hollow. Where does each method stand across the bit axis?"""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method and r.get(metric) is not None]
        targets = sorted((r["avg_bits"], r[metric]) for r in mine if r["configuration"].startswith("target"))
        unseen = [(r["avg_bits"], r[metric]) for r in mine if not r["configuration"].startswith("target")]
        if targets:
            ax.plot(*zip(*targets), "o-", c=f"C{i}", ms=5, lw=1, label=f"{method}: targets ({len(targets)})")
        if unseen:
            ax.scatter(*zip(*unseen), s=40, facecolors="none", edgecolors=f"C{i}",
                       label=f"{method}: unseen ({len(unseen)})")
    ax.set_xlabel("average bits per weight (target matrices)")
    ax.set_ylabel(metric)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title("final evaluation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    head = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([head, "-" * len(head), *body])
