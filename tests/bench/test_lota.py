"""bench/lota.py's paired statistic and its refusal of impossible bit-widths (the training itself is tested in
tests/workers/adapters/test_lota.py)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location("bench_lota", Path(__file__).resolve().parents[2] / "bench" / "lota.py")
lota = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lota)


def test_paired_difference_averages_seeds_per_example():
    a = np.array([[1, 1, 0, 1], [1, 0, 0, 1]])  # seeds × examples
    b = np.array([[0, 1, 0, 1], [0, 1, 1, 1]])
    d = np.array([1.0, -0.5, -0.5, 0.0])  # per example, over seeds
    half = 1.96 * d.std(ddof=1) / 2
    result = lota.paired(a, b)
    assert result["diff"] == pytest.approx(0.0)
    assert result["lo"] == pytest.approx(-100 * half) and result["hi"] == pytest.approx(100 * half)
    same = lota.paired(a, a)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0}


def test_bits_out_of_range_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lota.main(["--bits", "1", "--out", str(tmp_path / "x")])
    assert "2 <= k <= 8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--config-aware", "--quant", "gptq"], "round-to-nearest bases only"),
    (["--config-aware", "--configs-per-step", "0"], "--configs-per-step must be >= 1"),
])
def test_config_aware_options_are_checked_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        lota.main([*argv, "--out", str(tmp_path / "x")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--bits", "4", "3"], "trained over [4, 2] bits, not [4, 3]"),
    (["--bits", "4", "2", "--ca-omegas", "4=0.625", "2=0.875"], "trained at ω/r"),
])
def test_config_aware_rows_of_another_training_are_not_reused(tmp_path, argv, message):
    """An --out holding lota-ca rows (here over [4, 2] bits at the paper's ω) serves only the same training."""
    out = tmp_path / "x"
    out.mkdir()
    (out / "runs.jsonl").write_text('{"method": "lota-ca", "bits": 4, "seed": 0, "accuracy": 0.5, '
                                    '"configurations": [4, 2], "correct": [1, 0]}\n')
    with pytest.raises(SystemExit, match=re.escape(message)):
        lota.main(["--config-aware", *argv, "--out", str(out)])


def test_width_fractions_parse_one_per_width():
    assert lota.width_fractions([], [4, 2]) == {4: 0.75, 2: 0.75}
    assert lota.width_fractions(["4=0.625", "2=0.875"], [4, 2]) == {4: 0.625, 2: 0.875}


@pytest.mark.parametrize("values, message", [
    (["4=0.5"], "ω is given for [4] bits; --bits are [2, 4]"),
    (["4=0.5", "4=0.6", "2=0.7"], "each width once"),
    (["4=1", "2=0.7"], "in (0, 1)"),
    (["4:0.5", "2=0.7"], "is not WIDTH=FRACTION"),
])
def test_width_fractions_refuse_bad_values(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lota.width_fractions(values, [4, 2])


def test_ca_omegas_need_config_aware_and_are_checked_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lota.main(["--bits", "4", "2", "--ca-omegas", "4=0.5", "2=0.7", "--out", str(tmp_path / "x")])
    assert "--ca-omegas needs --config-aware" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lota.main(["--config-aware", "--bits", "4", "2", "--ca-omegas", "4=0.5", "--out", str(tmp_path / "x")])
    assert "ω is given for [4] bits" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_finished_out_is_summarized_without_training(tmp_path):
    """Every row already in runs.jsonl: nothing trains, and the summary pairs the rows example by example."""
    import json

    out = tmp_path / "x"
    out.mkdir()
    rows = [{"method": "lota", "bits": 4, "seed": 0, "accuracy": 0.75, "deployed_bits": 4.75, "codes_moved": 0.01,
             "correct": [1, 1, 1, 0]},
            {"method": "lora", "bits": 4, "seed": 0, "accuracy": 0.25, "deployed_bits": 5.5, "correct": [0, 1, 0, 0]}]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = lota.main(["--seeds", "0", "--bits", "4", "--methods", "lota", "lora", "--out", str(out)])
    assert summary["int4"]["lota"]["accuracy"] == pytest.approx(75.0)
    assert summary["int4"]["lota_minus_lora"]["diff"] == pytest.approx(50.0)
    assert summary["int4"]["lota"]["codes_moved"] == 0.01
    assert json.loads((out / "summary.json").read_text())["int4"]["lora"]["accuracy"] == pytest.approx(25.0)
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2
