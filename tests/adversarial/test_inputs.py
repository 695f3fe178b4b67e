"""Absurd, non-finite and hostile inputs: one clear error before any compute, and nothing written anywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.config import ConfigError, build_config
from orchestrator.runs import run_key, start_run
from orchestrator.tracking.tracker import filter_literal


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def expect_refusal(config: dict, match: str, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=match):
        start_run(build_config(config), progress=False)
    assert snapshot(tmp_path) == before
    assert not Path(config["run"]["root"]).exists()


def with_(config: dict, section: str, **values) -> dict:
    out = {k: dict(v) for k, v in config.items()}
    out[section].update(values)
    return out


@pytest.fixture
def base(make_config):
    return make_config()[0]


# ---- non-finite and absurd values ------------------------------------------------------------------------------
@pytest.mark.parametrize("section, values, match", [
    ("search", {"budget_min": float("nan")}, r"search\.budget_min = nan: Input should be a finite number"),
    ("search", {"budget_max": float("inf")}, r"search\.budget_max = inf: Input should be a finite number"),
    ("training", {"lr": float("nan")}, r"training\.lr = nan"),
    ("training", {"lr": float("inf")}, r"training\.lr = inf"),
    ("adapter", {"alpha": float("nan")}, r"adapter\.alpha = nan"),
    ("cluster", {"cpus_per_worker": float("inf")}, r"cluster\.cpus_per_worker = inf"),
    ("run", {"seed": 10**23}, r"run\.seed = 100000000000000000000000: Input should be less than 4294967296"),
    ("cluster", {"workers": 10**6}, r"cluster\.workers = 1000000: Input should be less than or equal to 4096"),
])
def test_non_finite_and_absurd_values(base, tmp_path, section, values, match):
    expect_refusal(with_(base, section, **values), match, tmp_path)


def test_more_workers_than_this_machine_has_cpus(base, tmp_path):
    config = with_(base, "cluster", executor="ray", workers=1000, cpus_per_worker=1)
    expect_refusal(config, r"= 1000 CPUs, but this machine offers \d+; lower cluster\.workers", tmp_path)


def test_gpus_this_machine_does_not_have(base, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = with_(base, "cluster", executor="ray", workers=1, gpus_per_worker=1)
    expect_refusal(config, r"= 1 GPUs, but this machine has 0", tmp_path)


def test_block_sizes_that_would_allocate_terabytes(base, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("code: [nf2, nf4]\nscale_bits: [8]\nscale2_format: [fp32]\nblock0: [1048576]\nblock1: [1048576]\n")
    expect_refusal(with_(base, "search", space=str(space)), r"block0 \(B0\) must be a power of two in 1\.\.4096",
                   tmp_path)
    space.write_text("code: [nf2, nf4]\nscale_bits: [8]\nscale2_format: [fp32]\nblock0: [4096]\nblock1: [4096]\n")
    expect_refusal(with_(base, "search", space=str(space)), r"B0·B1\) = 16777216 exceeds 65536", tmp_path)


# ---- names and paths ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "../escape", "-flag", "x" * 129, ""])
def test_run_name_is_one_safe_path_component(base, tmp_path, name):
    expect_refusal(with_(base, "run", name=name), r"run\.name = .*one directory name inside run\.root", tmp_path)


def test_sweep_name_cannot_leave_the_sweeps_directory(make_config, tmp_path, capsys):
    _, path = make_config()
    before = snapshot(tmp_path)
    assert main(["sweep", str(path), "--param", "run.seed=0,1", "--name", ".."]) == 2
    err = capsys.readouterr().err
    assert "--name = '..': use 1-128 letters" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_run_root_with_an_apostrophe_and_spaces(make_config, tmp_path):
    root = tmp_path / "it's my runs"
    config, _ = make_config(run={"root": str(root)})
    run_dir, rows = start_run(build_config(config), progress=False)
    assert rows and run_dir.parent == root
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    exp = client.get_experiment_by_name("tests")
    query = f"tags.`coalora.run_id` = {filter_literal(run_key(run_dir))} and tags.`coalora.role` = 'parent'"
    found = client.search_runs([exp.experiment_id], query)
    assert len(found) == 1 and found[0].info.status == "FINISHED"


@pytest.mark.parametrize("value", ["x' or tags.`coalora.role` = 'parent", "a b", "it's", ""])
def test_filter_literal_refuses_what_would_need_escaping(value):
    with pytest.raises(ValueError, match="cannot look up an MLflow run"):
        filter_literal(value)


# ---- configuration files -----------------------------------------------------------------------------------------
BOMB = "\n".join([
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    *[f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")],
    "adapter: {rank: *i}",
]) + "\n"


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 600
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(bomb)], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 2
    assert "adapter.rank = [[[...]" in out.stderr and len(out.stderr) < 4000
    assert time.monotonic() - started < 120


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe adapter: {}", "is not UTF-8 text"),
    (b"run: {name: " + b"x" * (1 << 20) + b"}", "a run configuration is at most 1048576 bytes"),
])
def test_unreadable_configuration_files(tmp_path, capsys, content, match):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err) < 2000


# ---- half-made runs and the CLI's one error handler --------------------------------------------------------------
@pytest.fixture
def weightless_model(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "weightless"
    shutil.copytree(tiny_model_dir, out)
    for p in out.glob("*.safetensors"):
        p.unlink()
    return out


def test_missing_weights_leave_no_run_directory(make_config, weightless_model, tiny_model_dir, capsys):
    config, path = make_config(model={"name": str(weightless_model)})
    root = Path(config["run"]["root"])
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coalora run: error: cannot load model") and "no file named" in err[0]
    assert not root.exists() or not any(root.iterdir())
    assert main(["--debug", "run", str(path), "--no-progress"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    # the same name runs at once once the model is fixed: nothing blocks it
    for p in tiny_model_dir.glob("*.safetensors"):
        shutil.copy(p, weightless_model / p.name)
    assert main(["run", str(path), "--no-progress"]) == 0


def test_unusable_tracking_store_is_refused_before_compute(make_config, tmp_path, capsys):
    config, path = make_config(tracking={"uri": "nosuchscheme://store"})
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["coalora run: error: tracking.uri = 'nosuchscheme://store': unsupported scheme 'nosuchscheme'; "
                   "use sqlite:///PATH, postgresql://USER@HOST/DB or http(s)://SERVER"]
    root = Path(config["run"]["root"])
    assert not root.exists() or not any(root.iterdir())


def test_an_unexpected_error_is_one_line_with_a_hint(make_config, monkeypatch, capsys):
    """An error no check foresaw (here: the MLflow store failing while the run is opened) is still one line, with
    the way to the traceback, and leaves no run directory."""
    from mlflow.tracking import MlflowClient as Client

    def broken(self, *args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(Client, "create_run", broken)
    config, path = make_config()
    assert main(["run", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("coalora run: error: MLflow tracking store sqlite:///") and "database is locked" in err[0]
    assert err[-1] == "(run again with --debug for the traceback)" and len(err) == 2
    root = Path(config["run"]["root"])
    assert not root.exists() or not any(root.iterdir())
