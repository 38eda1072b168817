"""``osora demo`` (the LLM demo) and ``osora generate``: the generated task, and both end to end on a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from osora.app import demo
from osora.app.cli import main as osora

CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def test_date_task_is_seeded_and_holds_out_years() -> None:
    task = demo.date_task(200, 50, seed=1)
    assert task == demo.date_task(200, 50, seed=1) and task != demo.date_task(200, 50, seed=2)
    train_years = {int(r["output"][:4]) for r in task.train}
    test_years = {int(r["output"][:4]) for r in task.test}
    assert test_years <= task.test_years and not train_years & task.test_years
    for record in task.train + task.test:
        y, m, d = (int(x) for x in record["output"].split("-"))
        assert str(y) in record["instruction"] and demo.MONTHS[m - 1] in record["instruction"]
        assert f" {d} " in record["instruction"] or f" {d}," in record["instruction"]


@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama with a word-level tokenizer over the demo's texts and a chat template, as a model dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from osora.app.data import word_level_tokenizer

    task = demo.date_task(64, 16, seed=0)
    texts = [r[k] for r in task.train + task.test for k in ("instruction", "output")]
    tokenizer = word_level_tokenizer(texts + ["assistant user system : 3 May 1987"])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.integration
def test_demo_then_generate_end_to_end(
    tiny_chat_llama: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--model", tiny_chat_llama, "--out", str(out), "--steps", "2", "--train_size", "32"]
    assert osora([*args, "--test_size", "8", "--batch_size", "4"]) == 0
    printed = capsys.readouterr().out
    for row in ("base", "osora r=32", "lora r=8"):
        assert f"\n{row} " in printed, printed
    assert "try the adapter: osora generate" in printed
    for adapter in ("osora", "osora-as-lora", "osora-compact", "lora"):
        assert (out / "adapters" / adapter / "adapter_config.json").is_file()
    assert (
        json.loads((out / "adapters" / "osora-as-lora" / "adapter_config.json").read_text())["peft_type"]
        == "LORA"
    )
    report = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in report["results"]] == ["base", "osora r=32", "lora r=8"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["results"])
    assert len(report["examples"]) == 8 and all("osora" in e and "base" in e for e in report["examples"])
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert "the osora adapter without its frozen factors" in printed
    for model in (str(out / "adapters" / "osora"), str(out / "adapters" / "osora-compact"), tiny_chat_llama):
        assert osora(["generate", model, "Write the date 3 May 1987 in the form YYYY-MM-DD.",
                      "--max_new_tokens", "4"]) == 0  # fmt: skip


def test_generate_names_a_missing_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert osora(["generate", "./no-such-model", "hello"]) == 2
    assert "no such file or directory: ./no-such-model" in capsys.readouterr().err


def test_generate_names_an_unknown_model_offline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert osora(["generate", "not-a-model", "hello"]) == 2
    err = capsys.readouterr().err
    assert "'not-a-model' is not a local folder or file, not a known model (smollm2-135m-instruct)" in err


def test_stop_strings_end_a_sequence_and_cut_its_completion() -> None:
    import torch

    from osora.app.data import word_level_tokenizer
    from osora.app.evaluate import StopOnStrings, cut_at_stop

    tokenizer = word_level_tokenizer(["the answer is 42 Question : next one"])
    prompt = tokenizer("the answer is")["input_ids"]
    stopped = tokenizer("the answer is 42 Question : next")["input_ids"]
    running = tokenizer("the answer is 42 next one one")["input_ids"]
    criterion = StopOnStrings(tokenizer, ["Question"], prompt_length=len(prompt))
    ids = torch.tensor([stopped, running[: len(stopped)]])
    assert criterion(ids, torch.zeros(2, 1)).tolist() == [True, False]
    in_prompt = torch.tensor(
        [tokenizer("Question : the next")["input_ids"]]
    )  # the stop string is in the prompt
    assert criterion(in_prompt, torch.zeros(1, 1)).tolist() == [False]
    assert cut_at_stop("42\n\nQuestion: next", ["Question:", "###"]) == "42\n\n"
    assert cut_at_stop("42", ["Question:"]) == "42"


def test_demo_encoder_flag_runs_the_minilm_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        osora(["demo", "--encoder", "--help"])
    assert exit_.value.code == 0
    assert "usage: osora demo --encoder" in capsys.readouterr().out
