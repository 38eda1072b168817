"""``osora merge`` / ``osora export`` on an adapter trained by ``osora train``: same logits as the adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from osora.app import exports
from osora.app.config import load_config
from osora.app.evaluate import load_model
from osora.app.train import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "gsm8k-osora.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "gsm8k_tiny.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("osora-run")
    # a large learning rate and 4 steps so the adapter is far from the identity
    run(
        load_config(
            TINY,
            [
                f"--training.output_dir={out}",
                f"--data.path={FIXTURE}",
                "--training.max_steps=4",
                "--training.learning_rate=0.2",
            ],
        )
    )
    return out


@pytest.fixture(scope="module")
def reference(trained: Path) -> tuple[torch.Tensor, torch.Tensor]:
    model, tokenizer = load_model(str(trained))
    ids = tokenizer(["Question: Tom has 3 apples", "A box holds 6 pens"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits
    base = AutoModelForCausalLM.from_pretrained(trained / "base_model")
    with torch.no_grad():
        base_logits = base(**ids).logits
    assert not torch.allclose(logits, base_logits, atol=1e-4), "the trained adapter changes the model"
    return ids, logits


def _logits(model: torch.nn.Module, ids: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**ids).logits


def test_merge_cli_gives_a_plain_model_with_the_adapter_logits(
    trained: Path, reference, tmp_path: Path
) -> None:
    ids, expected = reference
    assert exports.main(["merge", str(trained), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_export_lora_cli_loads_with_plain_peft(trained: Path, reference, tmp_path: Path) -> None:
    ids, expected = reference
    assert exports.main(["export", str(trained), str(tmp_path / "lora"), "--format", "lora"]) == 0
    base = AutoModelForCausalLM.from_pretrained(trained / "base_model")
    model = PeftModel.from_pretrained(base, tmp_path / "lora")
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-4, rtol=1e-4)


def test_export_residual_cli(trained: Path, reference, tmp_path: Path) -> None:
    ids, expected = reference
    assert exports.main(["export", str(trained), str(tmp_path / "res"), "--format", "residual"]) == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "res" / "base")
    model = PeftModel.from_pretrained(base, tmp_path / "res" / "adapter")
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-4, rtol=1e-4)


def test_merge_refuses_a_plain_model(trained: Path, tmp_path: Path) -> None:
    from osora.checkpoint import AdapterFileError

    with pytest.raises(AdapterFileError, match="not an adapter folder"):
        exports.main(["merge", str(trained / "base_model"), str(tmp_path / "x")])


def test_eval_scores_a_merged_model(trained: Path, tmp_path: Path) -> None:
    from osora.app.evaluate import evaluate

    assert exports.main(["merge", str(trained), str(tmp_path / "merged")]) == 0
    cfg = load_config(
        TINY,
        [
            f"--eval.model={tmp_path / 'merged'}",
            f"--eval.path={FIXTURE}",
            "--eval.max_samples=2",
            "--eval.max_new_tokens=3",
            "--eval.k_shot=1",
        ],
    )
    report = evaluate(cfg)
    assert report["total"] == 2 and (tmp_path / "merged" / "eval-gsm8k.json").is_file()
    assert report["examples"][0]["prompt"].count("Question: ") == 2  # one shot + the question
