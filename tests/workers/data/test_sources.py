"""Every source kind reads through Hugging Face ``datasets`` into the same rows, and every unreadable source is one
clear DataError naming it."""

from __future__ import annotations

import bz2
import json

import pytest

from workers.data import DataError, DataSpec, read_source

ROWS = [{"text": "good film", "label": "pos"}, {"text": "bad, slow film", "label": "neg"}, {"text": "10", "label": "pos"}]


@pytest.fixture
def files(tmp_path):
    import pandas as pd

    out = {}
    df = pd.DataFrame(ROWS)
    df.to_csv(out.setdefault("csv", tmp_path / "d.csv"), index=False)
    df.to_csv(out.setdefault("tsv", tmp_path / "d.tsv"), index=False, sep="\t")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out["jsonl"] = tmp_path / "d.jsonl"
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    out["json"] = tmp_path / "d.json"
    df.to_parquet(out.setdefault("parquet", tmp_path / "d.parquet"))
    with bz2.open(tmp_path / "d.csv.bz2", "wt") as fh:
        df.to_csv(fh, index=False)
    out["csv.bz2"] = tmp_path / "d.csv.bz2"
    return out


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "json", "parquet", "csv.bz2"])
def test_every_file_format_gives_the_same_rows(files, kind):
    rows = read_source(DataSpec(str(files[kind])))
    assert rows.kind == "files" and rows.validation is None
    assert [{"text": str(r["text"]), "label": r["label"]} for r in rows.train] == ROWS
    assert rows.columns == ["text", "label"]


def test_a_glob_and_an_explicit_format(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i}.data").write_text(json.dumps(ROWS[i]) + "\n")
    rows = read_source(DataSpec(str(tmp_path / "part-*.data"), format="jsonl"))
    assert [r["text"] for r in rows.train] == [r["text"] for r in ROWS]


def test_text_files_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines")
    (tmp_path / "b.txt").write_text("second")
    rows = read_source(DataSpec(str(tmp_path)))
    assert [r["text"] for r in rows.train] == ["first document\nwith two lines", "second"]


def test_class_folders(tmp_path):
    for label, texts in {"sports": ["goal", "match"], "politics": ["vote"]}.items():
        (tmp_path / label).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / label / f"{i}.txt").write_text(t)
    rows = read_source(DataSpec(str(tmp_path)))
    assert rows.kind == "folders"
    assert sorted((r["label"], r["text"]) for r in rows.train) == [("politics", "vote"), ("sports", "goal"),
                                                                    ("sports", "match")]


def test_save_to_disk_with_its_own_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "validation": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "saved"))
    rows = read_source(DataSpec(str(tmp_path / "saved")))
    assert rows.kind == "saved" and len(rows.train) == 3 and rows.validation == ROWS[:1]
    with pytest.raises(DataError, match=r"data.validation_split = 'dev': .* has the splits \['train', 'validation'\]"):
        read_source(DataSpec(str(tmp_path / "saved"), validation_split="dev"))


@pytest.mark.parametrize("name, content, match", [
    ("missing.csv", None, r"no such file or directory"),
    ("empty.csv", b"", r"is empty"),
    ("x.xml", b"<a/>", r"cannot tell the format .* set data.format"),
    ("bad.csv", b"text,label\n\xff\xfe\xfa,1\n", r"not UTF-8|cannot read"),
    ("bad.jsonl", b"{not json\n", r"cannot read .* as jsonl"),
    ("nothing-*.csv", None, r"no file matches"),
])
def test_unreadable_sources(tmp_path, name, content, match):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_source(DataSpec(str(tmp_path / name)))


def test_a_hub_id_not_in_the_cache_fails_at_once_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"'no-such-org/no-such-dataset': not a local file .* local Hugging Face cache"):
        read_source(DataSpec("no-such-org/no-such-dataset"))
