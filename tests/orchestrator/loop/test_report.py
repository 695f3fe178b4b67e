"""The run's human-readable outputs that compute something: the loss curves' moving average and their plot."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.loop.report import loss_curves_plot, moving_average


def test_moving_average_is_the_trailing_mean_shorter_at_the_start():
    values = np.random.default_rng(0).normal(size=50).tolist()
    got = moving_average(values, 5)
    expected = [float(np.mean(values[max(0, i - 4): i + 1])) for i in range(50)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert moving_average(values, 1) == pytest.approx(values)


def test_loss_curves_plot_writes_a_png_for_curves_of_different_lengths(tmp_path):
    path = loss_curves_plot({"coa-lora": [0.7, 0.6, 0.5, 0.45], "qlora | target 2.5": [0.7]}, tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 1000
