"""The driver end to end on a tiny local model: a full run, its status, export, MLflow records, and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.config import ConfigError, build_config
from orchestrator.export import export_run, read_summary
from orchestrator.runs import format_status, resume_run, run_key, run_status, start_run
from orchestrator.state import Ledger
from orchestrator.tracking.tracker import CHILD_TAG, RUN_ID_TAG


@pytest.fixture
def finished_run(make_config):
    config, _ = make_config()
    run_dir, rows = start_run(build_config(config), progress=False)
    return config, run_dir, rows


def test_run_produces_ledger_checkpoints_and_final_table(finished_run):
    config, run_dir, rows = finished_run
    entries = Ledger(run_dir / "ledger.jsonl").entries()
    kinds = [e["kind"] for e in entries]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert [e["round"] for e in entries if e["kind"] == "round_end"] == [0, 1, 2]
    # every proposed configuration got exactly one candidate result in its round
    for e in entries:
        if e["kind"] == "proposed":
            results = [x for x in entries if x["kind"] == "result" and x.get("phase") == "candidate"
                       and x["round"] == e["round"]]
            assert sorted(r["config"] for r in results) == sorted(e["configs"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0000", "round-0001", "round-0002"]
    # same configurations for every method: 2 targets + 1 unseen, for coa-lora and no-adapter
    by_method: dict[str, list[str]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["configuration"])
    assert by_method == {"coa-lora": ["target 2.5", "target 4", "unseen 1"],
                         "no-adapter": ["target 2.5", "target 4", "unseen 1"]}
    for r in rows:
        if r["configuration"].startswith("target"):
            assert r["avg_bits"] <= float(r["configuration"].split()[1]) + 1e-9  # ILP solution within budget
        assert 0.0 <= r["accuracy"] <= 1.0
    assert json.loads((run_dir / "final" / "evaluation.json").read_text()) == rows
    # every example's scores, paired: a difference in the table is the difference of the two rows' accuracies
    from safetensors.torch import load_file

    examples = load_file(run_dir / "final" / "examples.safetensors")
    n_val = config["data"]["val_examples"]
    assert sorted(examples) == sorted(f"{r['method']}|{r['configuration']}" for r in rows)
    for r in rows:
        scores = examples[f"{r['method']}|{r['configuration']}"]
        assert scores.shape == (n_val, 2) and float(scores[:, 1].mean()) == pytest.approx(r["accuracy"], abs=1e-12)
    differences = json.loads((run_dir / "final" / "paired.json").read_text())
    acc = {(r["method"], r["configuration"]): r["accuracy"] for r in rows}
    for d in differences:
        assert d["method"] == "coa-lora" and d["other"] == "no-adapter" and d["examples"] == n_val
        if d["configuration"] in ("target 2.5", "target 4", "unseen 1"):
            c = d["configuration"]
            assert d["difference"] == pytest.approx(acc[("coa-lora", c)] - acc[("no-adapter", c)], abs=1e-12)
            assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    assert [d["configuration"] for d in differences] == ["target 2.5", "target 4", "unseen 1", "all targets"]
    assert "Paired differences, coa-lora − other" in (run_dir / "final" / "evaluation.md").read_text()
    assert (run_dir / "artifacts" / "round-0002" / "pareto.png").stat().st_size > 1000
    assert (run_dir / "artifacts" / "hypervolume.png").stat().st_size > 1000  # rounds 0..2 of the search
    assert (run_dir / "final" / "evaluation.png").stat().st_size > 1000


def test_status_reports_the_run(finished_run):
    config, run_dir, _ = finished_run
    status = run_status(run_dir)
    assert status.finished and status.round == 2
    assert status.pool_size == len(json.loads((run_dir / "checkpoints" / "round-0002" / "meta.json").read_text())["pool"])
    assert 0 < status.training_set_size <= status.pool_size
    assert 0 < status.hypervolume <= 1
    text = format_status(status)
    assert "round 2 of 2" in text and "best loss per segment" in text


def test_mlflow_parent_params_metrics_artifacts_and_children(finished_run):
    config, run_dir, _ = finished_run
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_ID_TAG}` = '{run_key(run_dir)}'")
    parent = [r for r in runs if CHILD_TAG not in r.data.tags]
    children = [r for r in runs if CHILD_TAG in r.data.tags]
    assert len(parent) == 1 and len(children) == 2
    p = parent[0]
    assert p.info.status == "FINISHED"
    assert p.data.params["adapter.rank"] == "4"
    (data,) = p.inputs.dataset_inputs  # the packaged corpus as the run's dataset input
    assert data.dataset.name == "reviews" and json.loads(data.dataset.profile)["num_rows"] == 64
    assert [m.step for m in client.get_metric_history(p.info.run_id, "hypervolume")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(p.info.run_id, "train_loss")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(p.info.run_id, "rounds/round-0002")}
    assert artifacts == {"rounds/round-0002/pareto.png", "rounds/round-0002/pareto.md"}
    assert "hypervolume.png" in {a.path for a in client.list_artifacts(p.info.run_id)}
    assert {a.path for a in client.list_artifacts(p.info.run_id, "final")} >= {
        "final/evaluation.md", "final/evaluation.png", "final/curves.json", "final/curves.png"}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == p.info.run_id
        assert any(k.endswith(".accuracy") for k in child.data.metrics)


def test_resume_of_a_finished_run_changes_nothing(finished_run):
    config, run_dir, rows = finished_run
    ledger_before = (run_dir / "ledger.jsonl").read_bytes()
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    exp = client.get_experiment_by_name("tests")
    n_runs = len(client.search_runs([exp.experiment_id]))
    assert resume_run(run_dir, progress=False) == rows
    assert (run_dir / "ledger.jsonl").read_bytes() == ledger_before
    assert len(client.search_runs([exp.experiment_id])) == n_runs


def test_export_best_configuration_under_budget(finished_run):
    import peft

    config, run_dir, _ = finished_run
    out = export_run(run_dir, bits=4.0, out=run_dir / "exp")
    summary = read_summary(out)
    assert summary["average_bits"] <= 4.0
    meta = json.loads((run_dir / "checkpoints" / "round-0002" / "meta.json").read_text())
    assert summary["scoring_loss"] in meta["pool_loss"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "quant_configuration.json").is_file()
    assert peft.PeftConfig.from_pretrained(str(out)).r == 4
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    (parent,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                   "tags.`coalora.role` = 'parent'")
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "exports/bits-4")}
    assert {"exports/bits-4/adapter_model.safetensors", "exports/bits-4/coalora_export.json"} <= logged
    assert parent.info.status == "FINISHED"  # attaching the export does not reopen the run
    small = export_run(run_dir, memory_mb=500, out=run_dir / "exp2")
    assert read_summary(small)["packed_target_bytes"] > 0
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="no evaluated configuration fits 1.0 bits"):
        export_run(run_dir, bits=1.0)


def test_bitsandbytes_model_for_uniform_nf4(tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from orchestrator.export import save_bitsandbytes_model

    # bitsandbytes' CPU 4-bit matmul needs in_features >= its block size (64)
    BertForSequenceClassification(BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=128, max_position_embeddings=32)).save_pretrained(tmp_path / "m")
    out = save_bitsandbytes_model(str(tmp_path / "m"), "classification", tmp_path / "bnb", double_quant=True)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"] is True
    model = AutoModelForSequenceClassification.from_pretrained(out)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) >= 12  # every target (and the other linear layers) is 4-bit
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 20, 2]])).logits
    assert torch.isfinite(logits).all()


@pytest.fixture
def recorded(monkeypatch):
    """Records every ``gradients`` call of the run's executor as (method, example ids, configuration keys) and every
    single ``call`` as (method, args), and keeps the worker object (the run shuts its executor down)."""
    import orchestrator.runs as runs
    from orchestrator.loop.schedule import key

    record = {"calls": [], "workers": [], "called": []}
    make_executor = runs._executor

    def recording(cfg, spec, address):
        ex = make_executor(cfg, spec, address)
        plain_map, plain_call = ex.map, ex.call

        def call(method, *args):
            record["called"].append((method, args))
            return plain_call(method, *args)

        ex.call = call

        def map_(method, args):
            if method == "gradients":
                record["calls"].extend((a[0], list(a[2]), [key(c) for c in a[3]]) for a in args)
            return plain_map(method, args)

        ex.map = map_
        record["workers"].append(ex.worker)
        return ex

    monkeypatch.setattr(runs, "_executor", recording)
    return record


def test_baselines_share_the_method_s_choices_and_the_ablation_replays_its_run(make_config, recorded):
    """Under ``svd_of_W``: coa-no-theta gets exactly CoA-LoRA's gradient calls (the same data shards and the same K
    configurations at every step, from the ledger's training sets) on a θ-free replica with CoA-LoRA's init;
    Shared-LoRA takes the same init; no-adapter is quant(W) itself (its own zero-B replica), not the base of W − L
    without L; θ's common and configuration-specific output are logged per round, and so are the quantized-weight
    caches' counters, each replica's cache sized by training.cache_mb."""
    config, _ = make_config(adapter={"rank": 4, "alpha": 8, "init": "svd_of_W", "reference": "most_precise"},
                            training={"steps_per_round": 2, "configs_per_step": 2, "lr": 0.005, "warmup_steps": 1,
                                      "encoder_lr": 0.0005, "cache_mb": 0.5},
                            evaluation={"targets": [2.5, 4.0], "unseen": 1,
                                        "baselines": ["no_adapter", "shared_lora", "no_theta"]})
    run_dir, rows = start_run(build_config(config), progress=False)
    (worker,) = recorded["workers"]
    calls = recorded["calls"]
    coa = [(ids, cs) for m, ids, cs in calls if m == "main"]
    shared = [(ids, cs) for m, ids, cs in calls if m == "shared"]
    assert len(coa) == 4 and len(shared) == 8 and shared[4:] == coa  # Shared-LoRA's 4 steps, then the replay
    assert all(len(cs) == 1 for _, cs in shared[:4])
    models = worker.models
    assert models["shared"].init == models["main"].init == "svd_of_W" and models["bare"].init == "zero_B"
    assert {r["method"] for r in rows} == {"coa-lora", "no-adapter", "shared-lora", "coa-no-theta"}
    # every trained method's loss per step: the run's from the ledger's rounds, the baselines' as they trained
    curves = json.loads((run_dir / "final" / "curves.json").read_text())
    assert {m: len(c) for m, c in curves.items()} == {"coa-lora": 4, "shared-lora": 4, "coa-no-theta": 4}
    trained = [e for e in Ledger(run_dir / "ledger.jsonl").entries() if e["kind"] == "trained"]
    assert [float(np.mean(curves["coa-lora"][2 * i: 2 * i + 2])) for i in range(2)] == pytest.approx(
        [e["mean_loss"] for e in trained], abs=1e-12)
    assert all(np.isfinite(c).all() and min(c) > 0 for c in curves.values())
    assert curves["shared-lora"] != curves["coa-no-theta"]  # one target per step vs the run's K configurations
    assert (run_dir / "final" / "curves.png").stat().st_size > 1000
    target = worker.space.encode([worker.space.most_precise] * len(models["main"].registry))
    bare = worker.evaluate("bare", None, target, False)
    without_l = worker.evaluate("main", None, target, False)
    assert bare["loss"] != without_l["loss"]
    # the ILP's costs are those of what is quantized, W − L, not of W
    from workers.fisher import setting_costs

    layer, sample = models["main"].layers[0], worker.spec.cost_sample or None
    fisher = worker._fisher[layer.name]
    row = worker.cost_rows([0])[0]
    np.testing.assert_allclose(row, setting_costs(layer.residual, worker.space, fisher, layer.name, sample))
    on_w = setting_costs(layer.weight, worker.space, fisher, layer.name, sample)
    assert not np.allclose(row, on_w, rtol=1e-2, atol=0), (row[:5], on_w[:5])
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    (parent,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                   "tags.`coalora.role` = 'parent'")
    assert parent.data.metrics["theta_spread"] > 0 and "theta_common" in parent.data.metrics
    assert {m.cache.capacity_bytes for m in models.values()} == {2**19}
    hit_rates = client.get_metric_history(parent.info.run_id, "cache_hit_rate")
    assert len(hit_rates) >= 2 and all(0 <= m.value <= 1 for m in hit_rates)
    assert parent.data.metrics["cache_misses"] > 0 and 0 < parent.data.metrics["cache_mb"] <= 3 * 0.5


def test_lq_shared_gives_coa_lora_and_shared_lora_one_decomposition_and_logs_its_error(make_config, recorded):
    """adapter.init = lq-shared: CoA-LoRA's and Shared-LoRA's replicas adopt the same L per matrix (same B·A, same
    base W − L), no-adapter stays quant(W) on its own zero-B replica, the ILP's costs are measured on W − L, and the
    init's error ratio reaches the ledger and MLflow."""
    config, _ = make_config(adapter={"rank": 4, "alpha": 8, "init": "lq-shared", "init_iterations": 3},
                            training={"steps_per_round": 1, "configs_per_step": 2, "lr": 0.005, "warmup_steps": 1},
                            evaluation={"targets": [2.5], "unseen": 0, "baselines": ["no_adapter", "shared_lora"]})
    run_dir, rows = start_run(build_config(config), progress=False)
    (worker,) = recorded["workers"]
    models = worker.models
    assert models["main"].init == models["shared"].init == "zero_B" == models["bare"].init  # built, then decomposed
    initial = {m: worker.initial_state(m) for m in ("main", "shared")}
    for main, shared, bare in zip(models["main"].layers, models["shared"].layers, models["bare"].layers):
        assert torch.equal(main.residual, shared.residual) and torch.equal(bare.residual, bare.weight)
        assert not torch.equal(main.residual, main.weight)
        for name in (f"{main.name}.lora_A", f"{main.name}.lora_B"):
            (a,) = [t for n, t in initial["main"].items() if n.endswith(name)]
            (b,) = [t for n, t in initial["shared"].items() if n.endswith(name)]
            assert torch.equal(a, b)
    from workers.fisher import setting_costs

    layer = models["main"].layers[0]
    np.testing.assert_allclose(worker.cost_rows([0])[0], setting_costs(
        layer.residual, worker.space, worker._fisher[layer.name], layer.name, worker.spec.cost_sample or None))
    (init,) = [e for e in Ledger(run_dir / "ledger.jsonl").entries() if e["kind"] == "init"]
    assert init["method"] == "lq-shared" and 0 < init["lq_shared/error_ratio"] < 1
    assert {r["method"] for r in rows} == {"coa-lora", "no-adapter", "shared-lora"}
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    (parent,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                   "tags.`coalora.role` = 'parent'")
    assert parent.data.metrics["lq_shared/error_ratio"] == pytest.approx(init["lq_shared/error_ratio"])


def test_projq_shared_starts_coa_lora_and_its_baselines_from_the_initial_pool_s_error_subspace(make_config, recorded):
    """adapter.init = projq-shared: round 0's state is the worker's shared init over the ledger's initial pool, the
    θ-free baselines start from the same init over the same pool, no-adapter is quant(W) on CoA-LoRA's own replica
    (nothing else is quantized), and the step-0 compensation errors reach the ledger and MLflow."""
    from safetensors.torch import load_file

    from orchestrator.loop.schedule import key, unkey

    config, _ = make_config(adapter={"rank": 4, "alpha": 8, "init": "projq-shared", "reference": "none",
                                     "prefit_steps": 60},
                            training={"steps_per_round": 2, "configs_per_step": 2, "lr": 0.005, "warmup_steps": 1},
                            evaluation={"targets": [2.5, 4.0], "unseen": 1,
                                        "baselines": ["no_adapter", "shared_lora", "no_theta"]})
    run_dir, rows = start_run(build_config(config), progress=False)
    (worker,) = recorded["workers"]
    entries = Ledger(run_dir / "ledger.jsonl").entries()
    (pool,) = [e["configs"] for e in entries if e["kind"] == "initial_pool"]
    (init,) = [e for e in entries if e["kind"] == "init"]
    assert init["method"] == "projq-shared"
    assert init["init_error_exact"] <= init["init_error_fitted"] < init["init_error_shared"] < 1.0, init
    inits = [(args[0], [key(c) for c in args[1]]) for m, args in recorded["called"] if m == "shared_init"]
    assert inits == [("main", pool), ("shared", pool), ("shared", pool)]
    round0 = load_file(run_dir / "checkpoints" / "round-0000" / "trainable.safetensors")
    expected, _ = worker.shared_init("main", [unkey(k) for k in pool])
    assert round0.keys() == expected.keys() and all(torch.equal(round0[n], expected[n]) for n in expected)
    assert "bare" not in worker.models
    assert {r["method"] for r in rows} == {"coa-lora", "no-adapter", "shared-lora", "coa-no-theta"}
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    (parent,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                   "tags.`coalora.role` = 'parent'")
    assert parent.data.metrics["init_error_fitted"] == pytest.approx(init["init_error_fitted"])


def test_adapter_kind_lora_runs_the_search_with_one_plain_lora_and_exports_it(make_config, recorded, tmp_path):
    """adapter.kind = lora: the run's replica is a plain LoRA (no θ in it, its checkpoints or MLflow), trained and
    scored through the same driver calls, reported as "lora", and exported through the same PEFT path, which
    transformers + PEFT load to coalora's logits."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from orchestrator.runs import worker_spec
    from orchestrator.state import CheckpointStore
    from workers.adapters.coa import CoAModel
    from workers.export.peft import CONFIGURATION_FILE, QUANTIZED_BASE_FILE, configuration_from_json, load_quantized_base
    from workers.worker import Worker

    config, _ = make_config(adapter={"kind": "lora", "rank": 4, "alpha": 8},
                            training={"steps_per_round": 2, "configs_per_step": 2, "lr": 0.005, "warmup_steps": 1})
    cfg = build_config(config)
    run_dir, rows = start_run(cfg, progress=False)
    (worker,) = recorded["workers"]
    assert not isinstance(worker.models["main"], CoAModel)
    assert len([cs for m, _, cs in recorded["calls"] if m == "main"]) == 4
    assert {r["method"] for r in rows} == {"lora", "no-adapter"}
    state = CheckpointStore(run_dir / "checkpoints").load_latest().tensors["trainable"]
    assert state and not any(n.startswith("encoder.") for n in state)
    assert any(n.endswith("lora_B") and float(t.abs().sum()) > 0 for n, t in state.items())  # it trained
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    (parent,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                   "tags.`coalora.role` = 'parent'")
    assert "theta_spread" not in parent.data.metrics and parent.data.params["adapter.kind"] == "lora"
    out = export_run(run_dir, bits=4.0, out=tmp_path / "export")
    lora = Worker(worker_spec(cfg)).models["main"].eval()
    lora.load_trainable_state(state)
    settings = list(configuration_from_json(json.loads((out / CONFIGURATION_FILE).read_text())).values())
    batch = {"input_ids": torch.randint(3, 100, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    model = AutoModelForSequenceClassification.from_pretrained(config["model"]["name"], dtype=torch.float32)
    served = PeftModel.from_pretrained(load_quantized_base(model, out / QUANTIZED_BASE_FILE), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(served(**batch).logits, lora(settings, **batch).logits, rtol=1e-4, atol=1e-4)


def test_adapter_kind_lota_trains_ternary_factors_and_exports_the_merged_integer_model(make_config, tmp_path):
    """adapter.kind = lota over a space of int codes: the driver steps the ternary factors by t-SignSGD (they stay
    in {−1, 0, 1} through checkpoints) and the head by AdamW, every configuration is evaluated as LoTA against
    no-adapter and Shared-LoRA, and the export is the merged integer model: transformers loads it to the logits the
    run's adapter computes, and its packed bytes are the configuration's plus μ."""
    from transformers import AutoModelForSequenceClassification

    from orchestrator.runs import worker_spec
    from orchestrator.state import CheckpointStore
    from workers.adapters.lota import BlockwiseLoTAModel
    from workers.export.merged import load_merged_model
    from workers.export.peft import CONFIGURATION_FILE, QUANTIZED_BASE_FILE, configuration_from_json
    from workers.quant.files import tensor_bytes
    from workers.quant.formats import packed_nbytes
    from workers.worker import Worker

    space = tmp_path / "int.yaml"
    space.write_text("code: [int2, int3, int4]\nscale_bits: [4, 8]\nscale2_format: [fp32]\nblock0: [16, 32]\n"
                     "block1: [4]\n")
    config, _ = make_config(adapter={"kind": "lota", "rank": 4, "omega": 0.25},
                            search={"space": str(space), "budget_min": 2.5, "budget_max": 4.75, "rounds": 2,
                                    "initial_budgets": 4, "proposals_per_round": 2, "segments": 4,
                                    "fisher_examples": 4},
                            training={"steps_per_round": 3, "configs_per_step": 2, "lr": 0.005, "warmup_steps": 1},
                            evaluation={"targets": [2.5, 4.0], "unseen": 1, "baselines": ["no_adapter", "shared_lora"]})
    cfg = build_config(config)
    run_dir, rows = start_run(cfg, progress=False)
    assert {r["method"] for r in rows} == {"lota", "no-adapter", "shared-lora"}
    store = CheckpointStore(run_dir / "checkpoints")
    state = store.load_latest().tensors["trainable"]
    factors = {n: t for n, t in state.items() if n.endswith(("lora_A", "lora_B"))}
    assert factors and all(set(torch.unique(t).tolist()) <= {-1.0, 0.0, 1.0} for t in factors.values())
    assert any(n.endswith("lora_B") and t.any() for n, t in factors.items()), "t-SignSGD moved nothing"
    assert store.load_latest().meta["optimizer"]["ternary_step"] == 6
    out = export_run(run_dir, bits=3.0, out=tmp_path / "export")
    assert read_summary(out)["format"] == "merged"
    lota = Worker(worker_spec(cfg)).models["main"].eval()
    assert isinstance(lota, BlockwiseLoTAModel)
    lota.load_trainable_state(state)
    settings = list(configuration_from_json(json.loads((out / CONFIGURATION_FILE).read_text())).values())
    numels = [layer.weight.numel() for layer in lota.layers]
    groups = sum(-(-n // s.group_size) for n, s in zip(numels, settings))
    assert tensor_bytes(out / QUANTIZED_BASE_FILE) == sum(packed_nbytes(n, s) for n, s in zip(numels, settings)) + 4 * groups
    model = AutoModelForSequenceClassification.from_pretrained(config["model"]["name"], dtype=torch.float32)
    served = load_merged_model(model, out).eval()
    batch = {"input_ids": torch.randint(3, 100, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(served(**batch).logits, lota(settings, **batch).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="no separate adapter for --format peft"):
        export_run(run_dir, bits=3.0, fmt="peft", out=tmp_path / "peft")


def test_stratified_sampling_draws_one_configuration_per_bit_stratum(make_config, recorded):
    from orchestrator.loop.schedule import unkey

    config, _ = make_config(training={"steps_per_round": 3, "configs_per_step": 2, "lr": 0.005, "warmup_steps": 1,
                                      "config_sampling": "stratified"})
    run_dir, _ = start_run(build_config(config), progress=False)
    (worker,) = recorded["workers"]
    numels = worker.numels()
    bits = {}
    sets = {e["round"]: e["training_set"] for e in Ledger(run_dir / "ledger.jsonl").entries() if e["kind"] == "round_end"}
    steps = [cs for m, _, cs in recorded["calls"] if m == "main"]
    assert len(steps) == 6
    for step, configs in enumerate(steps):
        ranked = sorted(sets[step // 3], key=lambda k: bits.setdefault(k, float(worker.space.encoded_average_bits(unkey(k), numels))))
        half = (len(ranked) + 1) // 2  # np.array_split puts the odd one in the first stratum
        assert configs[0] in ranked[:half] and configs[1] in ranked[half:], (configs, ranked)


def test_worker_spec_carries_the_memory_settings(make_config):
    from orchestrator.runs import worker_spec

    config, _ = make_config(training={"cache_mb": 64, "low_memory": True})
    spec = worker_spec(build_config(config))
    assert spec.cache_mb == 64 and spec.low_memory is True
    assert worker_spec(build_config(make_config()[0])).low_memory is False


def test_a_gptq_run_exports_the_codes_it_trained_on(make_config, tmp_path):
    """quant.method = gptq end to end: the run quantizes with GPTQ under its calibration statistics, and its export
    (adapter + packed base, no bitsandbytes copy) computes, in transformers + PEFT, what coalora computed."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from orchestrator.state import CheckpointStore
    from orchestrator.runs import worker_spec
    from workers.export.peft import CONFIGURATION_FILE, QUANTIZED_BASE_FILE, configuration_from_json, load_quantized_base
    from workers.quant.blockwise import quantize
    from workers.worker import Worker

    config, _ = make_config(quant={"method": "gptq", "calibration_examples": 16})
    cfg = build_config(config)
    run_dir, rows = start_run(cfg, progress=False)
    assert {r["method"] for r in rows} >= {"coa-lora", "no-adapter"}
    out = export_run(run_dir, bits=4.0, out=tmp_path / "export")
    summary = read_summary(out)
    assert summary["quantized_base"] == QUANTIZED_BASE_FILE and summary.get("bitsandbytes_model") is None
    coa = Worker(worker_spec(cfg)).models["main"]
    coa.load_trainable_state(CheckpointStore(run_dir / "checkpoints").load_latest().tensors["trainable"])
    settings = list(configuration_from_json(json.loads((out / CONFIGURATION_FILE).read_text())).values())
    assert any(not torch.equal(layer.packed_weight(s).codes, quantize(layer.residual, s).codes)
               for layer, s in zip(coa.layers, settings)), "GPTQ chose the same codes as rounding: vacuous"
    batch = {"input_ids": torch.randint(3, 100, (2, 10)),
             "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    model = AutoModelForSequenceClassification.from_pretrained(config["model"]["name"], dtype=torch.float32)
    served = PeftModel.from_pretrained(load_quantized_base(model, out / QUANTIZED_BASE_FILE), out).eval()
    coa.eval()
    with torch.no_grad():
        ours = coa(settings, **batch).logits
        theirs = served(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_gptq_refuses_a_llama_cpp_space(make_config):
    from orchestrator.config import ConfigError

    config, _ = make_config(quant={"method": "gptq"}, search={"space": "conf/space/gguf.yaml"})
    with pytest.raises(ConfigError, match="quant.method = 'gptq'.*llama.cpp types"):
        build_config(config).load_space()
