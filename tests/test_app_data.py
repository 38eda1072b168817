"""Data: formats, prompts, response-only labels, and bad records counted rather than dropped silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from osora.app.config import DataConfig
from osora.app.data import (
    PAPER_TEMPLATE,
    DataError,
    build_train_dataset,
    detect_format,
    few_shot_prefix,
    load_records,
    make_prompt,
    texts_of,
    word_level_tokenizer,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"

RECORDS = {
    "metamath": {"query": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is: 5"},
    "gsm8k": {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
    "commonsense": {
        "instruction": "Is ice cold?",
        "input": "",
        "output": "the correct answer is true",
        "answer": "true",
    },
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    "math": {"problem": "What is 2 + 3?", "solution": "It is $\\boxed{5}$."},
}


@pytest.fixture(scope="module")
def tokenizer():
    records = load_records(str(FIXTURES / "gsm8k_tiny.jsonl"))
    return word_level_tokenizer(texts_of([*records, *RECORDS.values()]))


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_detect_format(fmt: str) -> None:
    assert detect_format(RECORDS[fmt]) == fmt


def test_prompts() -> None:
    assert (
        make_prompt(RECORDS["gsm8k"], "gsm8k", "paper")
        == "Question: What is 2 + 3?\nLet's think step by step\nAnswer:"
    )
    assert make_prompt(RECORDS["metamath"], "metamath", "paper") == PAPER_TEMPLATE.format(
        question="What is 2 + 3?"
    )
    alpaca = make_prompt(RECORDS["alpaca"], "alpaca", "alpaca")
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n" in alpaca
    assert make_prompt(RECORDS["commonsense"], "commonsense", "alpaca").endswith(
        "Is ice cold?\n\n### Response:\n"
    )


def test_labels_cover_the_response_only(tokenizer) -> None:
    examples, report = build_train_dataset([RECORDS["gsm8k"]], tokenizer, DataConfig(format="gsm8k"))
    (example,) = examples
    prompt_len = len(tokenizer(make_prompt(RECORDS["gsm8k"], "gsm8k", "paper"))["input_ids"])
    assert example["labels"][:prompt_len] == [-100] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert example["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["labels"][prompt_len:-1]).split()[-1] == "5"
    assert report.kept == 1 and not report.skipped


def test_bad_records_are_counted_and_logged(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    records = [
        RECORDS["gsm8k"],
        {"question": "no answer"},
        {"question": "empty", "answer": "   "},
        {"question": "long " * 300, "answer": "#### 1"},
        {"question": None, "answer": "#### 2"},
    ]
    examples, report = build_train_dataset(records, tokenizer, DataConfig(format="gsm8k", max_length=64))
    assert len(examples) == 1
    assert report.total == 5 and report.kept == 1
    assert report.skipped == {
        "missing answer": 1,
        "empty response": 1,
        "longer than 64 tokens": 1,
        "missing question": 1,
    }
    with caplog.at_level("WARNING"):
        message = report.log()
    assert "1/5 records kept" in message and "longer than 64 tokens" in caplog.text


def test_dataset_has_lengths_for_grouping(tokenizer) -> None:
    records = load_records(str(FIXTURES / "gsm8k_tiny.jsonl"))
    dataset, report = build_train_dataset(records, tokenizer, DataConfig(format="auto", max_length=128))
    assert len(dataset) == report.kept == 12
    assert dataset["length"] == [len(ids) for ids in dataset["input_ids"]]


def test_few_shot_prefix() -> None:
    shots = [RECORDS["gsm8k"], {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}]
    add = few_shot_prefix(shots, "gsm8k", "paper")
    prompt = add(make_prompt({"question": "What is 4 + 4?", "answer": ""}, "gsm8k", "paper"))
    assert prompt.count("Question: ") == 3
    assert "Answer: 1 + 1 = 2\n#### 2\n\nQuestion: What is 4 + 4?" in prompt
    assert few_shot_prefix([], "gsm8k", "paper")("x") == "x"


def test_chat_template_prompt(tokenizer) -> None:
    tokenizer.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant : {% endif %}"
    )
    try:
        prompt = make_prompt(RECORDS["gsm8k"], "gsm8k", "chat", tokenizer)
        assert prompt == "<s> user : What is 2 + 3? </s> <s> assistant : "
        (example,), _ = build_train_dataset(
            [RECORDS["gsm8k"]], tokenizer, DataConfig(format="gsm8k", prompt="chat")
        )
        n_prompt = example["labels"].count(-100)
        assert example["input_ids"][:n_prompt] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    finally:
        tokenizer.chat_template = None


def test_local_json_records_keep_their_strings(tmp_path: Path) -> None:
    """ISO-date strings stay strings (pyarrow's JSON reader would make them timestamps), ints stay ints; a field
    that changes type and a non-object line are named with their line."""
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"instruction": "When?", "output": "1938-11-06", "n": 1}\n{"instruction": "x", "output": "2001"}\n'
    )
    assert load_records(str(path)) == [
        {"instruction": "When?", "output": "1938-11-06", "n": 1},
        {"instruction": "x", "output": "2001", "n": None},
    ]
    listed = tmp_path / "d.json"
    listed.write_text('[{"q": "a", "a": "2020-01-01T10:00:00"}]')
    assert load_records(str(listed)) == [{"q": "a", "a": "2020-01-01T10:00:00"}]
    path.write_text('{"output": "a"}\n{"output": 3}\n')
    with pytest.raises(
        DataError, match=r"d\.jsonl:2: field 'output' is a number, but a string at .*d\.jsonl:1"
    ):
        load_records(str(path))
    path.write_text('{"output": "a"}\n[1]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: a record must be a JSON object"):
        load_records(str(path))
