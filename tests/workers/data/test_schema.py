"""Task inference, columns and label maps: inferred when unambiguous, and each bad case one clear DataError."""

from __future__ import annotations

import pytest

from workers.data import DataError, DataPlan, DataSpec, SourceRows, classification_items, documents, plan_task


def rows(train, validation=None) -> SourceRows:
    return SourceRows("files", "jsonl", train, validation, list(train[0]) if train else [])


def test_a_label_column_means_classification_with_sorted_string_labels():
    plan = plan_task(rows([{"text": "a", "label": "zeta"}, {"text": "b", "label": "alpha"}]), DataSpec("s"), None)
    assert plan == DataPlan("classification", "text", None, "label", ("alpha", "zeta"))


def test_integer_labels_keep_their_numeric_order():
    train = [{"sentence": "x", "target": 10}, {"sentence": "y", "target": 2}, {"sentence": "z", "target": 1}]
    plan = plan_task(rows(train), DataSpec("s"), None)
    assert plan.text_column == "sentence" and plan.labels == ("1", "2", "10")
    assert [i[-1] for i in classification_items(train, plan, "t")] == [2, 1, 0]


def test_text_pairs_and_stated_columns():
    train = [{"premise": "p", "hypothesis": "h", "gold": "entail"}, {"premise": "q", "hypothesis": "k", "gold": "no"}]
    spec = DataSpec("s", text_column="premise", text_pair_column="hypothesis", label_column="gold")
    plan = plan_task(rows(train), spec, "classification")
    assert classification_items(train, plan, "t") == [("p", "h", 0), ("q", "k", 1)]


def test_no_label_column_means_language_modelling():
    plan = plan_task(rows([{"content": "once upon a time"}]), DataSpec("s"), None)
    assert plan == DataPlan("causal-lm", "content")


def test_instruction_layouts_are_recognised():
    alpaca = [{"instruction": "i", "input": "", "output": "o"}]
    assert plan_task(rows(alpaca), DataSpec("s"), None) == DataPlan("instruction", layout="alpaca")
    assert plan_task(rows([{"messages": []}]), DataSpec("s"), None).layout == "chat"
    assert plan_task(rows([{"conversations": []}]), DataSpec("s"), "instruction").layout == "sharegpt"


def test_stated_labels_fix_the_order_and_drop_other_rows():
    train = [{"text": "a", "label": "fresh"}, {"text": "b", "label": "plot"}, {"text": "c", "label": "rotten"}]
    plan = plan_task(rows(train), DataSpec("s", labels=("rotten", "fresh")), None)
    assert plan.labels == ("rotten", "fresh")
    assert classification_items(train, plan, "t") == [("a", 1), ("c", 0)]


@pytest.mark.parametrize("train, validation, spec, task, match", [
    ([{"text": "a", "label": "x"}], None, DataSpec("s", label_column="tag"), None,
     r"data.label_column = 'tag': the source has no such column; its columns are \['text', 'label'\]"),
    ([{"body2": "a", "y": 1}], None, DataSpec("s"), None, r"no text column found; set data.text_column to one of"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], None, DataSpec("s"), None, r"only one class"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], [{"text": "c", "label": "z"}], DataSpec("s"), None,
     r"validation labels \['z'\] never occur in training"),
    ([{"text": "a"}], None, DataSpec("s"), "classification", r"classification needs a label column"),
    ([{"text": "a"}], None, DataSpec("s"), "instruction", r"instruction tuning needs alpaca"),
    ([], None, DataSpec("s"), None, r"holds no rows"),
])
def test_bad_sources(train, validation, spec, task, match):
    with pytest.raises(DataError, match=match):
        plan_task(rows(train, validation), spec, task)


def test_empty_texts_are_dropped_and_all_empty_is_an_error():
    plan = DataPlan("classification", "text", None, "label", ("a", "b"))
    assert classification_items([{"text": " ", "label": "a"}, {"text": "x", "label": "b"}], plan, "t") == [("x", 1)]
    with pytest.raises(DataError, match=r"no usable rows \(of 2: 2 with empty text"):
        classification_items([{"text": "", "label": "a"}, {"text": None, "label": "b"}], plan, "t")
    with pytest.raises(DataError, match="every text is empty"):
        documents([{"text": ""}], DataPlan("causal-lm", "text"), "t")
