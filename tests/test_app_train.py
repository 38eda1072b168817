"""``osora train`` and ``osora eval`` end to end on a tiny Llama built from a config, offline, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from osora.app.config import RunConfig, load_config
from osora.app.evaluate import evaluate
from osora.app.train import run

from conftest import StopAfterCheckpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "gsm8k-osora.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "gsm8k_tiny.jsonl"
METHODS = ["osora", "osora-S", "osora-O", "osora-scaled", "lora", "vera", "pissa", "dora", "full"]


def tiny_config(out: Path, *overrides: str) -> RunConfig:
    return load_config(
        TINY,
        [
            f"--training.output_dir={out}",
            f"--data.path={FIXTURE}",
            f"--eval.path={FIXTURE}",
            "--eval.max_samples=2",
            "--eval.max_new_tokens=4",
            *overrides,
        ],
    )


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_two_steps_and_evaluates(tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    trainer = run(tiny_config(out, f"--method.name={method}"))
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    if method == "full":
        assert (out / "model.safetensors").is_file()
    else:
        saved = adapter_tensors(out)
        assert saved and json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    run_info = json.loads((out / "osora_run.json").read_text())
    assert run_info["data"] == {
        "total": 14,
        "kept": 12,
        "skipped": {"empty response": 1, "missing answer": 1},
    }
    if method == "osora-S":  # S only: r per adapted matrix (2 blocks x 7 linears, r=4)
        assert run_info["trainable_params"] == 2 * 7 * 4

    report = evaluate(tiny_config(out, f"--method.name={method}"))
    assert report["total"] == 2 and 0.0 <= report["accuracy"] <= 1.0
    example = report["examples"][0]
    assert example["prompt"].startswith("Question: ") and example["reference"] == "7"
    assert set(example) == {"prompt", "completion", "prediction", "reference", "correct", "correct_by"}
    assert (out / "eval-gsm8k.json").is_file()


@pytest.mark.parametrize("method", ["osora", "lora"])
def test_interrupted_and_resumed_run_ends_with_the_same_adapter(tmp_path: Path, method: str) -> None:
    overrides = [
        f"--method.name={method}",
        "--training.max_steps=4",
        "--training.save_steps=2",
        "--training.lr_scheduler_type=linear",
    ]
    run(tiny_config(tmp_path / "straight", *overrides))

    interrupted = tmp_path / "resumed"
    run(tiny_config(interrupted, *overrides), callbacks=[StopAfterCheckpoint(2)])
    assert not (interrupted / "adapter_model.safetensors").exists()
    assert (interrupted / "checkpoint-2").is_dir()
    trainer = run(tiny_config(interrupted, *overrides, "--training.resume_from_checkpoint=true"))
    assert trainer.state.global_step == 4

    expected, got = adapter_tensors(tmp_path / "straight"), adapter_tensors(interrupted)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    before = adapter_tensors(interrupted / "checkpoint-2")
    assert any(not torch.equal(before[n], got[n]) for n in got), "the resumed run trained further"


def test_cli_trains_and_evaluates_the_commonsense_tiny_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from osora.app.cli import main

    config = ROOT / "configs" / "tiny" / "commonsense-osora.yaml"
    fixture = ROOT / "tests" / "fixtures" / "commonsense_tiny.jsonl"
    common = [
        f"--training.output_dir={tmp_path}",
        f"--data.path={fixture}",
        f"--eval.path={fixture}",
        "--eval.max_samples=2",
    ]
    assert main(["train", "--config", str(config), *common]) == 0
    assert "trainable params" in capsys.readouterr().out
    assert main(["eval", "--config", str(config), *common, "--eval.max_new_tokens=3"]) == 0
    report = json.loads((tmp_path / "eval-boolq.json").read_text())
    assert report["task"] == "boolq" and report["total"] == 2
    assert report["examples"][0]["prompt"].endswith("### Response:\n")
    assert report["examples"][0]["reference"] == "true"


def test_cli_help_lists_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    from osora.app.cli import main

    assert main(["train", "--help"]) == 0
    assert "method.name" in capsys.readouterr().out
