"""Human-readable outputs of a run: the per-round Pareto plot and table, and the final evaluation table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def pareto_plot(bits: np.ndarray, loss: np.ndarray, selected: np.ndarray, path: Path, title: str) -> Path:
    """Scatter of every pool configuration (average bits vs scoring loss), the training set highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter(bits[~selected], loss[~selected], s=18, c="0.65", label="pool")
    order = np.argsort(bits[selected])
    ax.plot(bits[selected][order], loss[selected][order], "o-", ms=5, c="C3", lw=1, label="training set (segment Pareto)")
    ax.set_xlabel("average bits per weight (target matrices)")
    ax.set_ylabel("scoring loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
