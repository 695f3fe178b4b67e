"""Instruction records rendered with the packaged SmolLM2's own chat template: prompt tokens carry label -100, the
assistant's reply (and its end-of-turn marker) keep their ids; without a template alpaca falls back to the Alpaca
prompt and chat records are refused."""

from __future__ import annotations

import pytest
import torch

from workers.data import IGNORE_INDEX, DataError, InstructionCollator, encode_instructions
from workers.models import load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(resolve_model("smollm2"))


def response_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])


def prompt_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])


@pytest.mark.integration
def test_alpaca_with_the_chat_template_masks_everything_but_the_reply(smollm2):
    row = {"instruction": "Name a colour.", "input": "Think of the sky.", "output": "Blue"}
    ((ids, labels),) = encode_instructions([row], "alpaca", smollm2, 256, "t")
    assert labels[: 5] == [IGNORE_INDEX] * 5 and labels[-1] != IGNORE_INDEX
    assert response_text(smollm2, ids, labels).strip() == "Blue<|im_end|>"
    prompt = prompt_text(smollm2, ids, labels)
    assert "Name a colour.\n\nThink of the sky." in prompt and "Blue" not in prompt
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels))


@pytest.mark.integration
def test_multi_turn_chat_and_sharegpt_train_on_every_assistant_turn(smollm2):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                         {"role": "assistant", "content": "See you."}]}
    ((ids, labels),) = encode_instructions([chat], "chat", smollm2, 256, "t")
    assert response_text(smollm2, ids, labels).replace("\n", "") == "Hello.<|im_end|>See you.<|im_end|>"
    assert "Be brief." in prompt_text(smollm2, ids, labels) and "Bye" in prompt_text(smollm2, ids, labels)
    share = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    ((ids2, labels2),) = encode_instructions([share], "sharegpt", smollm2, 256, "t")
    assert response_text(smollm2, ids2, labels2).strip() == "Hello.<|im_end|>"


@pytest.mark.integration
def test_records_without_a_reply_within_max_length_are_dropped(smollm2):
    rows = [{"instruction": "x " * 200, "output": "late"}, {"instruction": "short", "output": ""},
            {"instruction": "ok", "output": "yes"}]
    out = encode_instructions(rows, "alpaca", smollm2, 64, "t")
    assert len(out) == 1 and len(out[0][0]) <= 64
    with pytest.raises(DataError, match="no record has a response within max_length = 64"):
        encode_instructions(rows[:2], "alpaca", smollm2, 64, "t")


def test_without_a_template_alpaca_uses_the_alpaca_prompt_and_chat_is_refused():
    tokenizer = load_tokenizer(resolve_model("minilm"))
    assert not getattr(tokenizer, "chat_template", None)
    ((ids, labels),) = encode_instructions([{"instruction": "Say yes.", "output": "yes"}], "alpaca", tokenizer, 128,
                                           "t")
    assert "instruction : say yes. # # # response : yes" in tokenizer.decode(ids).lower()  # BERT spaces the #s
    assert response_text(tokenizer, ids, labels) == "yes"
    with pytest.raises(DataError, match="chat records need the model's chat template"):
        encode_instructions([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
                            "chat", tokenizer, 128, "t")


def test_collator_pads_with_ignored_labels():
    batch = InstructionCollator(pad_token_id=0)([([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8], [8])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].dtype == torch.long


def test_alpaca_prompt_keeps_an_instruction_with_blank_lines_whole():
    from workers.data.instructions import render_alpaca

    text, ((start, end),) = render_alpaca({"instruction": "Fix this:\n\nint x = 1", "input": "", "output": "ok"}, "</s>")
    assert "### Instruction:\nFix this:\n\nint x = 1\n\n### Response:\n" in text and "### Input" not in text
    assert text[start:end] == "ok</s>"
    text, _ = render_alpaca({"instruction": "Translate.", "input": "Hallo", "output": "Hello"}, None)
    assert "### Instruction:\nTranslate.\n\n### Input:\nHallo\n\n### Response:\nHello" in text
