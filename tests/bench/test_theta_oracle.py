"""bench/theta_oracle.py on a tiny finished run: it reproduces the run's CoA-LoRA before fitting anything, at zero
steps the per-configuration oracle is θ itself (every difference to CoA-LoRA exactly 0), fitting M lowers the
training loss and moves only M, and runs it cannot read are refused before any compute."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.config import ConfigError, load_config
from orchestrator.runs import start_run

SPEC = importlib.util.spec_from_file_location("bench_theta_oracle",
                                              Path(__file__).resolve().parents[2] / "bench" / "theta_oracle.py")
oracle = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(oracle)


@pytest.fixture(scope="module")
def run_dir(write_run_config, tmp_path_factory):
    """One tiny finished run for the module (the tests read it; the one that edits it works on a copy)."""
    path = write_run_config(tmp_path_factory.mktemp("oracle"), data={"val_examples": 48, "score_examples": 16})
    directory, _ = start_run(load_config(path), progress=False)
    return directory


def test_zero_steps_is_theta_itself_and_fitting_moves_only_m(run_dir, tmp_path, capsys):
    result = oracle.main([str(run_dir), "--steps", "0", "--out", str(tmp_path)])
    assert result["targets"] == ["target 2.5", "target 4"]
    assert result["values"]["per-configuration M"] == result["values"]["coa-lora"]
    for name in result["targets"] + ["all targets"]:
        assert result["paired"]["per-configuration M − coa-lora"][name]["difference"] == 0.0
    assert result["spread"]["per-configuration M"] == pytest.approx(result["spread"]["theta"], abs=1e-7)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["values"] == result["values"]
    assert json.loads((tmp_path / "tiny.json").read_text())["steps"] == 0

    cfg, worker, rows = oracle.load_run(run_dir)
    model = worker.models["main"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    settings = worker.space.decode(oracle.unkey(rows[0]["config"]))
    with torch.no_grad():
        start = model.mixing_matrices(settings).clone()
    worker.train_items = worker.train_items[:16]  # one batch, seen at every step
    batch = worker.collate(worker.train_items)
    with torch.no_grad():
        before_loss = float(oracle._loss(model, settings, start, batch))
    fitted, pairs, losses = oracle.fit(model, worker, [settings], start, steps=8, lr=0.05, seed=0, batch_size=16)
    with torch.no_grad():
        assert float(oracle._loss(model, settings, fitted, batch)) < before_loss  # M fitted to the data
    assert len(losses) == 8 and pairs is None
    assert not torch.equal(fitted, start)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # A, B, heads and θ untouched
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # unfrozen again


def test_runs_it_cannot_read_are_refused(run_dir, tmp_path):
    copy = tmp_path / "unfinished"
    shutil.copytree(run_dir, copy)
    ledger = copy / "ledger.jsonl"
    kept = [line for line in ledger.read_text().splitlines() if '"kind":"final"' not in line.replace(" ", "")]
    ledger.write_text("\n".join(kept) + "\n")
    with pytest.raises(ConfigError, match="no final CoA-LoRA rows"):
        oracle.load_run(copy)
    with pytest.raises(SystemExit):
        oracle.main([str(tmp_path), "--out", str(tmp_path / "out")])  # no ledger: not a run directory


def test_with_factors_free_the_pairs_are_fitted_and_the_run_s_restored(run_dir, tmp_path):
    """--free factors: the fits move every LoRA pair with M (a per-configuration LoRA from the run's state); the
    model keeps the run's pairs outside them, and at zero steps the per-configuration fit is the run itself."""
    result = oracle.main([str(run_dir), "--steps", "0", "--free", "factors", "--out", str(tmp_path)])
    assert result["values"]["per-configuration A, B, M"] == result["values"]["coa-lora"]
    assert (tmp_path / "tiny-factors.json").exists()

    cfg, worker, rows = oracle.load_run(run_dir)
    model = worker.models["main"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = worker.space.decode(oracle.unkey(rows[0]["config"]))
    with torch.no_grad():
        start = model.mixing_matrices(settings).clone()
    mixing, pairs, _ = oracle.fit(model, worker, [settings], start, steps=3, lr=0.05, seed=0, batch_size=16,
                                  factors=True)
    assert set(pairs) == set(oracle.factor_names(model)) and pairs
    assert any(not torch.equal(pairs[n], before[n]) for n in pairs)  # the pairs moved in the fit ...
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # ... and the run's are back
    with oracle.with_parameters(model, pairs):
        assert all(torch.equal(dict(model.named_parameters())[n], pairs[n]) for n in pairs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_theta_refit_at_zero_steps_is_the_run_and_fitting_moves_only_theta(run_dir, tmp_path):
    """--free theta: θ refitted on the run's training set with everything else frozen, judged on every target and
    unseen configuration. At zero steps the refit is the run's θ (every difference to CoA-LoRA exactly 0); with
    steps it lowers the training loss on the draws, moves θ only, and the model keeps the run's θ afterwards."""
    result = oracle.main([str(run_dir), "--steps", "0", "--free", "theta", "--out", str(tmp_path)])
    names = result["configurations"]
    assert "target 2.5" in names and any(n.startswith("unseen") for n in names)
    assert [n for n in names if n.startswith("train")] == [f"train {i}" for i in range(1, result["training_set"] + 1)]
    assert result["values"]["refit θ"] == result["values"]["coa-lora"]
    assert all(d["difference"] == 0.0 for d in result["paired"]["refit θ − coa-lora"].values())
    assert {"all targets", "unseen 1", "all train"} <= set(result["paired"]["refit θ − shared M"])
    assert result["training_set"] >= 1 and (tmp_path / "tiny-theta.json").exists()

    cfg, worker, _ = oracle.load_run(run_dir)
    model = worker.models["main"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    pool = oracle.training_set(run_dir)
    worker.train_items = worker.train_items[:16]  # one batch, seen at every step
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": 16})})
    fitted, losses = oracle.fit_theta(model, worker, pool, cfg, steps=8, lr=0.05)
    assert set(fitted) == {f"encoder.{n}" for n, _ in model.encoder.named_parameters()}
    assert any(not torch.equal(fitted[n], before[n]) for n in fitted)  # θ moved in the fit ...
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # ... and the run's is back
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    batch = worker.collate(worker.train_items)
    settings = [worker.space.decode(x) for x in pool]
    with torch.no_grad():
        run_loss = sum(float(oracle._loss(model, s, model.mixing_matrices(s), batch)) for s in settings)
        with oracle.with_parameters(model, fitted):
            refit_loss = sum(float(oracle._loss(model, s, model.mixing_matrices(s), batch)) for s in settings)
    assert refit_loss < run_loss
    start = torch.stack([model.mixing_matrices(s) for s in settings]).mean(0).detach()
    shared, _ = oracle.fit_theta(model, worker, pool, cfg, steps=3, lr=0.05, shared_start=start)
    assert shared.shape == start.shape and not torch.equal(shared, start)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_theta_refit_with_the_log_objective_weighs_configurations_alike(run_dir, tmp_path):
    """--objective log: each step minimises the mean log-loss of its configurations, so its gradient is each
    configuration's own gradient divided by its loss; it goes with --free theta only, and names its file apart."""
    with pytest.raises(SystemExit):
        oracle.main([str(run_dir), "--objective", "log", "--out", str(tmp_path)])
    result = oracle.main([str(run_dir), "--steps", "0", "--free", "theta", "--objective", "log", "--out", str(tmp_path)])
    assert result["objective"] == "log" and (tmp_path / "tiny-theta-log.json").exists()

    cfg, worker, _ = oracle.load_run(run_dir)
    model = worker.models["main"]
    pool = oracle.training_set(run_dir)
    worker.train_items = worker.train_items[:16]
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": 16})})
    mean_fit, _ = oracle.fit_theta(model, worker, pool, cfg, steps=2, lr=0.05)
    log_fit, log_losses = oracle.fit_theta(model, worker, pool, cfg, steps=2, lr=0.05, objective="log")
    assert any(not torch.equal(mean_fit[n], log_fit[n]) for n in mean_fit)  # another objective, another fit
    assert len(log_losses) == 2 and all(math.isfinite(x) for x in log_losses)
