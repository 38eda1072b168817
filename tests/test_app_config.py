"""The application's config schema: every shipped YAML loads, overrides fill it, unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from osora.app.config import ConfigError, RunConfig, help_text, load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_shipped_configs() -> None:
    assert len(SHIPPED) >= 8


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("osora" in first), "a shipped YAML starts with its launch command"
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.path is not None
    assert cfg.model.name_or_path is not None or cfg.model.from_config is not None


def test_overrides_fill_the_schema_with_types() -> None:
    cfg = load_config(
        None,
        [
            "method.name=vera",
            "method.r=256",
            "training.learning_rate=4e-3",
            "method.target_modules=[q_proj, v_proj]",
            "training.resume_from_checkpoint=true",
            "model.from_config={model_type: llama, hidden_size: 8}",
        ],
    )
    assert cfg.method.name == "vera" and cfg.method.r == 256
    assert cfg.training.learning_rate == pytest.approx(4e-3)
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.resume_from_checkpoint is True
    assert cfg.model.from_config == {"model_type": "llama", "hidden_size": 8}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("training.lr=1", "training.lr"),
        ("trainer.max_steps=1", "trainer"),
        ("method.name=qlora", "method.name"),
        ("method.r=eight", "method.r"),
        ("data.prompt=fancy", "data.prompt"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: x\n  revison: main\n")
    with pytest.raises(ConfigError, match=r"model\.revison"):
        load_config(path)


def test_help_lists_every_field_with_its_help() -> None:
    text = help_text()
    assert "training.gradient_accumulation_steps" in text
    assert "Micro-batches per optimizer step." in text


@pytest.mark.parametrize("command", ["train", "eval"])
def test_cli_reports_a_bad_key_without_a_traceback(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from osora.app.cli import main

    assert main([command, str(ROOT / "configs" / "tiny" / "gsm8k-osora.yaml"), "training.lr=1"]) == 2
    assert "unknown config key 'training.lr'" in capsys.readouterr().err
