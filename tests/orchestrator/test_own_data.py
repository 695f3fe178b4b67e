"""A user's own data end to end: a 5-class CSV with the packaged MiniLM exported and reloaded with PEFT +
AutoModelForSequenceClassification (right label names), a folder of documents per class, alpaca and chat JSONL with
SmolLM2's chat template, parquet and save_to_disk sources; and every bad source refused before a run directory
exists."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, build_config
from orchestrator.runs import load_run_config, start_run

CLASSES = {"billing": "invoice charge card payment billed", "login": "password account sign locked reset",
           "shipping": "delivery package courier arrived tracking", "refund": "money back return refund cancel",
           "bug": "crash error broken app freezes"}
FAST = ["cluster.executor=local", "search.rounds=1", "training.steps_per_round=8", "search.initial_budgets=3",
        "search.proposals_per_round=1", "search.fisher_examples=4", "search.cost_sample=4096",
        "evaluation.unseen=1", "evaluation.targets=[3.0,4.0]", "evaluation.baselines=[no_adapter]",
        "data.train_examples=160", "data.val_examples=40", "data.score_examples=20", "data.batch_size=16",
        "data.max_length=24", "training.lr=0.005"]


def ticket(rng: random.Random, label: str, i: int) -> str:
    words = CLASSES[label].split()
    return f"ticket {i}: " + " ".join(rng.choice(words) for _ in range(5))


def write_tickets(path: Path, n: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n):
            label = list(CLASSES)[i % len(CLASSES)]
            w.writerow([ticket(rng, label, i), label])
    return path


def overrides(tmp_path: Path, tracking_uri: str, name: str) -> list[str]:
    return [*FAST, f"run.root={tmp_path / 'runs'}", f"run.name={name}", f"tracking.uri={tracking_uri}"]


@pytest.mark.integration
def test_csv_classification_runs_exports_and_reloads_with_label_names(tmp_path, tracking_uri, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from workers.models import resolve_model

    data = write_tickets(tmp_path / "tickets.csv")
    argv = ["run", "conf/default.yaml", f"data.source={data}", "data.text_column=text", "data.label_column=label",
            *overrides(tmp_path, tracking_uri, "tickets"), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "tickets"
    cfg = load_run_config(run_dir)
    assert cfg.model.task == "classification" and cfg.data.labels == tuple(sorted(CLASSES))
    assert json.loads((run_dir / "labels.json").read_text())["id2label"]["0"] == "billing"
    assert main(["export", str(run_dir), "--bits", "4.5", "--out", str(tmp_path / "export")]) == 0

    base = resolve_model("minilm").path
    model = AutoModelForSequenceClassification.from_pretrained(base, config=AutoConfig.from_pretrained(tmp_path / "export"))
    model = PeftModel.from_pretrained(model, tmp_path / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    rng = random.Random(1)
    probes = [(ticket(rng, label, 1000 + i), label) for i, label in enumerate(list(CLASSES) * 4)]
    with torch.no_grad():
        logits = model(**tokenizer([t for t, _ in probes], return_tensors="pt", padding=True)).logits
    predicted = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert set(predicted) <= set(CLASSES)
    accuracy = sum(p == label for p, (_, label) in zip(predicted, probes)) / len(probes)
    assert accuracy >= 0.6, (accuracy, predicted)  # chance is 0.2


def test_folder_of_documents_per_class(tmp_path, tiny_model_dir, tracking_uri, capsys):
    rng = random.Random(0)
    for label in ("sports", "politics", "science"):
        (tmp_path / "docs" / label).mkdir(parents=True)
        for i in range(40):
            (tmp_path / "docs" / label / f"{i}.txt").write_text(f"{label} " + ticket(rng, "bug", i))
    argv = ["run", "conf/default.yaml", f"data.source={tmp_path / 'docs'}", f"model.name={tiny_model_dir}",
            *overrides(tmp_path, tracking_uri, "docs"), "data.train_examples=60", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "docs"
    assert load_run_config(run_dir).data.labels == ("politics", "science", "sports")
    rows = json.loads((run_dir / "final" / "evaluation.json").read_text())
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1 for r in rows)
    assert main(["export", str(run_dir), "--bits", "4.5", "--out", str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["id2label"] == {"0": "politics", "1": "science", "2": "sports"}


@pytest.mark.parametrize("layout", ["alpaca", "chat"])
def test_instruction_jsonl_with_the_chat_template(tmp_path, tiny_chat_model_dir, tracking_uri, layout, capsys):
    records = []
    for i in range(50):
        question, answer = f"What is {i} plus {i}?", f"{2 * i}."
        records.append({"instruction": question, "input": "", "output": answer} if layout == "alpaca" else
                       {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    source = tmp_path / f"{layout}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["run", "conf/default.yaml", f"data.source={source}", f"model.name={tiny_chat_model_dir}",
            "model.task=null", *overrides(tmp_path, tracking_uri, layout), "data.max_length=96",
            "data.train_examples=24", "data.val_examples=10", "data.score_examples=8", "data.batch_size=8",
            "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    cfg = load_run_config(tmp_path / "runs" / layout)
    assert cfg.model.task == "instruction" and cfg.data.instruction_format == layout
    rows = json.loads((tmp_path / "runs" / layout / "final" / "evaluation.json").read_text())
    assert all(r["perplexity"] > 1 for r in rows)
    run_dir, export = tmp_path / "runs" / layout, tmp_path / "export"
    assert main(["export", str(run_dir), "--bits", "4.5", "--out", str(export)]) == 0
    check_instruction_export(run_dir, export, tiny_chat_model_dir)


def check_instruction_export(run_dir: Path, export: Path, base: Path) -> None:
    """The export runs where users run it: transformers + PEFT load it on the configuration's quantized base, the
    saved tokenizer renders a prompt with the chat template, the logits are coalora's own for that configuration,
    and ``generate`` answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.runs import worker_spec
    from orchestrator.state import CheckpointStore
    from workers.export.peft import CONFIGURATION_FILE, configuration_from_json, quantized_base_weights
    from workers.worker import Worker

    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.chat_template, "the chat template travels with the adapter"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 plus 7?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    coa = Worker(worker_spec(load_run_config(run_dir))).models["main"]
    coa.load_trainable_state(CheckpointStore(run_dir / "checkpoints").load_latest().tensors["trainable"])
    settings = configuration_from_json(json.loads((export / CONFIGURATION_FILE).read_text()))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized_base_weights(coa, settings), strict=False)
    assert not unexpected
    model = PeftModel.from_pretrained(model, export).eval()
    coa.eval()
    coa.set_configuration(settings)
    with torch.no_grad():
        ours = coa.model(**prompt).logits
        theirs = model(**prompt).logits
        reply = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert reply.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_parquet_and_save_to_disk_sources_run(tmp_path, tiny_model_dir, make_config, kind):
    import datasets
    import pandas as pd

    rng = random.Random(0)
    rows = [{"sentence": ticket(rng, label, i), "category": label} for i, label in enumerate(["bug", "login"] * 40)]
    if kind == "parquet":
        source = tmp_path / "d.parquet"
        pd.DataFrame(rows).to_parquet(source)
    else:
        source = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:60]),
                              "validation": datasets.Dataset.from_list(rows[60:])}).save_to_disk(str(source))
    config, _ = make_config(data={"source": str(source)})
    run_dir, result = start_run(build_config(config), progress=False)
    cfg = load_run_config(run_dir)
    assert (cfg.data.text_column, cfg.data.label_column, cfg.data.labels) == ("sentence", "category", ("bug", "login"))
    assert {r["method"] for r in result} == {"coa-lora", "no-adapter"}


# ---- bad sources: one clear error, no run directory -------------------------------------------------------------
def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / "data" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD = [
    ("missing.csv", None, {}, r"no such file or directory"),
    ("empty.csv", "", {}, r"is empty"),
    ("data.xml", "<a/>", {}, r"cannot tell the format of .* set data.format"),
    ("tickets.csv", "body,label\nhi,a\nho,b\n", {"text_column": "text"},
     r"data.text_column = 'text': the source has no such column; its columns are \['body', 'label'\]"),
    ("one.csv", "text,label\nhi,a\nho,a\n", {}, r"only one class \(\['a'\]\)"),
    ("latin1.csv", b"text,label\ncaf\xe9,a\nhi,b\n", {}, r"not UTF-8 text|cannot read"),
    ("blank.csv", 'text,label\n"",a\n" ",b\n', {}, r"no usable rows"),
    ("chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     {"task": "instruction"}, r"chat records need the model's chat template"),
]


@pytest.mark.parametrize("name, content, fields, match", BAD, ids=[b[0] for b in BAD])
def test_bad_sources_leave_nothing_behind(tmp_path, make_config, name, content, fields, match):
    source = tmp_path / "data" / name if content is None else write(tmp_path, name, content)
    task = fields.pop("task", None)
    config, _ = make_config(data={"source": str(source), **fields}, **({"model": {"task": task}} if task else {}))
    before = snapshot(tmp_path)
    with pytest.raises((ConfigError, ValueError), match=match):
        start_run(build_config(config), progress=False)
    assert snapshot(tmp_path) == before
    assert not Path(config["run"]["root"]).exists()


def test_validation_labels_never_seen_in_training(tmp_path, make_config):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]),
                          "validation": datasets.Dataset.from_list([{"text": "c", "label": "z"}])}
                         ).save_to_disk(str(tmp_path / "saved"))
    config, _ = make_config(data={"source": str(tmp_path / "saved")})
    with pytest.raises(ConfigError, match=r"validation labels \['z'\] never occur in training"):
        start_run(build_config(config), progress=False)
    assert not Path(config["run"]["root"]).exists()


def test_the_data_is_an_mlflow_dataset_input_logged_once(tmp_path, make_config):
    from mlflow.tracking import MlflowClient

    from orchestrator.runs import resume_run

    source = tmp_path / "tickets.csv"
    write_tickets(source, n=120)
    config, _ = make_config(data={"source": str(source)})
    run_dir, _ = start_run(build_config(config), progress=False)
    resume_run(run_dir, progress=False)  # a finished run: logs nothing twice
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    exp = client.get_experiment_by_name("tests")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`coalora.role` = 'parent'")
    (logged,) = parent.inputs.dataset_inputs
    assert logged.dataset.name == "tickets.csv" and len(logged.dataset.digest) == 16
    assert json.loads(logged.dataset.profile)["num_rows"] == config["data"]["train_examples"]
    assert json.loads(logged.dataset.source)["uri"] == str(source)


def test_long_examples_are_truncated_and_counted(tmp_path, tiny_model_dir, caplog):
    import logging

    from workers.data import DataPlan, DataSpec
    from workers.tasks import build_source_task

    source = tmp_path / "long.csv"
    source.write_text("text,label\n" + "".join(f"{'word ' * (5 if i % 2 else 50)},{i % 2}\n" for i in range(40)))
    plan = DataPlan("classification", "text", None, "label", ("0", "1"))
    with caplog.at_level(logging.WARNING):
        task = build_source_task(str(tiny_model_dir), DataSpec(str(source)), plan, n_train=None, n_validation=10,
                                 batch_size=8, max_length=16)
    assert "20 of 40 examples are longer than data.max_length = 16 tokens and are truncated" in caplog.text
    assert max(b["input_ids"].shape[1] for b in task.train_loader) <= 16
