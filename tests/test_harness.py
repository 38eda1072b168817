"""``osora eval --harness``: lm-evaluation-harness on a tiny Llama (built from a config, word-level tokenizer),
offline, on the local data layout (fixture records in a temporary data folder)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'osora[harness]')")

from osora import OSoRAConfig  # noqa: E402
from osora.app import cli  # noqa: E402
from osora.app.data import make_prompt, texts_of, word_level_tokenizer  # noqa: E402
from osora.app.evaluate import generate  # noqa: E402
from osora.app.harness import evaluate_harness  # noqa: E402
from osora.app.scoring import commonsense_options, option_response  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


BOOLQ, GSM8K = _records("commonsense_tiny.jsonl"), _records("gsm8k_tiny.jsonl")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The ../shared/data layout with the fixture records: commonsense/boolq/*.json, gsm8k/*.jsonl."""
    root = tmp_path_factory.mktemp("data")
    (root / "commonsense" / "boolq").mkdir(parents=True)
    (root / "gsm8k").mkdir()
    for split in ("train", "test"):
        (root / "commonsense" / "boolq" / f"{split}.json").write_text(json.dumps(BOOLQ))
        (root / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    return root


@pytest.fixture(scope="module")
def tiny():
    """(base model, tokenizer): a 2-layer Llama and a word-level tokenizer trained on the fixture records."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_level_tokenizer(texts_of([*BOOLQ, *GSM8K]))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def _harness(model, tokenizer, data_dir: Path, tmp_path: Path, tasks: str = "boolq", prompt="paper") -> dict:
    return evaluate_harness(
        "tiny",
        harness=tasks,
        loaded=(model, tokenizer),
        data_dir=str(data_dir),
        prompt=prompt,
        limit=4,
        batch_size=4,
        max_gen_toks=6,
        output=str(tmp_path / "harness.json"),
    )


def _logliks(report: dict, task: str = "osora_boolq") -> list[float]:
    """Every option's log-likelihood, question after question."""
    return [float(pair[0]) for s in report["samples"][task] for pair in s["resps"]]


@torch.no_grad()
def _reference_logliks(model, tokenizer, record: dict, style: str = "paper") -> list[float]:
    """log p(response | osora's prompt) of each option, summed over the response's tokens (explicit log-softmax)."""
    prompt = make_prompt(record, "commonsense", style, tokenizer)  # type: ignore[arg-type]
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for option in commonsense_options(record):
        response = (" " if style == "paper" else "") + option_response(record, option)
        whole = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)  # (seq, vocab)
        scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
    return scores


def test_harness_scores_the_base_model_like_a_dense_reference(tiny, data_dir, tmp_path):
    model, tokenizer = tiny
    report = _harness(model, tokenizer, data_dir, tmp_path, "boolq,gsm8k")
    assert report["n_samples"]["osora_boolq"]["effective"] == 4
    reference = [_reference_logliks(model, tokenizer, r) for r in BOOLQ[:4]]
    assert _logliks(report) == pytest.approx([x for r in reference for x in r], abs=1e-4)
    labels = [commonsense_options(r).index(r["answer"]) for r in BOOLQ[:4]]
    expected = sum(max(range(len(s)), key=s.__getitem__) == y for s, y in zip(reference, labels)) / 4
    assert report["results"]["osora_boolq"]["acc,none"] == pytest.approx(expected)
    # GSM8K: the same greedy completions as osora eval's generate(), scored by the same last-number rule
    prompts = [make_prompt(r, "gsm8k", "paper") for r in GSM8K[:4]]
    ours = generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=6, stop_strings=["Question:"])
    assert [s["resps"][0] for s in report["samples"]["osora_gsm8k"]] == ours
    assert report["results"]["osora_gsm8k"]["exact_match,none"] == 0.0
    written = json.loads((tmp_path / "harness.json").read_text())
    assert written["results"]["osora_boolq"]["acc,none"] == report["results"]["osora_boolq"]["acc,none"]


def test_chat_prompt_is_osoras_chat_template_prompt(tiny, data_dir, tmp_path):
    model, tokenizer = tiny
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    report = _harness(model, chat, data_dir, tmp_path, prompt="auto")  # auto: the tokenizer has a template
    assert report["prompt"] == "chat"
    reference = [x for r in BOOLQ[:4] for x in _reference_logliks(model, chat, r, "chat")]
    assert _logliks(report) == pytest.approx(reference, abs=1e-4)


def test_adapter_equals_base_at_init_and_differs_after_training_its_s(tiny, data_dir, tmp_path):
    from peft import get_peft_model

    model, tokenizer = tiny
    base = _logliks(_harness(model, tokenizer, data_dir, tmp_path))
    adapted = get_peft_model(copy.deepcopy(model), OSoRAConfig(r=4, init_method="exact")).eval()
    assert _logliks(_harness(adapted, tokenizer, data_dir, tmp_path)) == pytest.approx(base, abs=1e-5)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("osora_S.default"):
                p.mul_(1.5)  # a stand-in for training: S moved away from σ
    moved = _logliks(_harness(adapted, tokenizer, data_dir, tmp_path))
    assert max(abs(a - b) for a, b in zip(moved, base)) > 1e-3


def test_unknown_task_is_a_user_error(capsys):
    code = cli.main(["eval", "--harness", "boolq,hellaswag", "no-such-model-is-loaded"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "unknown task 'hellaswag'" in err and "arc_e" in err and "gsm8k" in err


def test_missing_data_folder_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-data"
    code = cli.main(["eval", "--harness", "arc_c", "no-such-model-is-loaded", "--data_dir", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(missing / "commonsense" / "arc_c" / "test.json") in err and "--data_dir" in err


def test_auto_prompt_is_the_runs_then_the_tokenizers(tiny, tmp_path):
    from osora.app.checkpoints import RUN_FILE
    from osora.app.harness import prompt_style

    _, tokenizer = tiny
    assert prompt_style(str(tmp_path), tokenizer, "auto") == "paper"  # no run file, no chat template
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert prompt_style(str(tmp_path), chat, "auto") == "chat"
    (tmp_path / RUN_FILE).write_text(json.dumps({"config": {"data": {"prompt": "alpaca"}}}))
    assert prompt_style(str(tmp_path), chat, "auto") == "alpaca"  # what the run trained with
    assert prompt_style(str(tmp_path), chat, "paper") == "paper"
