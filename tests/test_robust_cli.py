"""Every common user mistake is one or two lines naming the problem and the fix, exit code 2, no traceback
(``--debug`` shows it); paths are never sent to the Hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from osora.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "gsm8k-osora.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "gsm8k_tiny.jsonl"


def fails_cleanly(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``osora ARGV``; assert exit code 2 and a short message; return the message."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "examples/s]" not in line]  # progress bars
    assert 1 <= len(lines) <= 2, err
    return "\n".join(lines)


def train_args(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        "train",
        "--config",
        str(TINY),
        f"--training.output_dir={tmp_path / 'out'}",
        f"--data.path={FIXTURE}",
        *overrides,
    ]


def test_malformed_jsonl_line_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    lines = FIXTURE.read_text().splitlines()
    data.write_text("\n".join([lines[0], lines[1][:25], *lines[2:]]) + "\n")  # line 2 cut short
    err = fails_cleanly(capsys, *train_args(tmp_path, f"--data.path={data}"))
    assert f"{data}:2: invalid JSON" in err and "fix or remove that line" in err


def test_a_record_that_is_not_an_object_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(FIXTURE.read_text().splitlines()[0] + "\n[1, 2]\n")
    err = fails_cleanly(capsys, *train_args(tmp_path, f"--data.path={data}"))
    assert f"{data}:2: a record must be a JSON object" in err


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_data_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    err = fails_cleanly(capsys, *train_args(tmp_path, f"--data.path={data}"))
    assert str(data) in err and ("empty" in err or "no records" in err)
    assert not (tmp_path / "out").exists()


def test_a_missing_data_file_is_not_sent_to_the_hub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails_cleanly(capsys, *train_args(tmp_path, "--data.path=./no/such.jsonl"))
    assert "./no/such.jsonl: no such file or directory" in err


def test_yaml_syntax_error_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  dtype: float32\nmethod:\n  name: osora\n   r: 4\n")
    err = fails_cleanly(capsys, "train", "--config", str(config))
    assert f"{config}:5:" in err and "invalid YAML" in err


def test_a_missing_yaml_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = fails_cleanly(capsys, "train", "--config", str(tmp_path / "nope.yaml"))
    assert f"config file {tmp_path / 'nope.yaml'}: no such file" in err


def test_a_bad_key_names_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("method:\n  rank: 4\n")
    err = fails_cleanly(capsys, "train", "--config", str(config))
    assert f"{config}: unknown config key 'method.rank'" in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [("--method.r=0", "r must be a positive integer"), ("--method.dropout=1.5", "dropout must be in [0, 1)")],
)
def test_invalid_method_settings_are_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    err = fails_cleanly(capsys, *train_args(tmp_path, override))
    assert "method settings (osora)" in err and expected in err
    assert not (tmp_path / "out").exists()


def test_a_used_output_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "osora_run.json").write_text("{}")
    err = fails_cleanly(capsys, *train_args(tmp_path))
    assert (
        "is not empty" in err and "overwrite_output_dir=true" in err and "resume_from_checkpoint=true" in err
    )


def _lora_adapter(folder: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(folder)


@pytest.mark.parametrize("command", [["merge"], ["export", "--format", "lora"]])
def test_a_lora_adapter_given_to_an_osora_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    _lora_adapter(tmp_path / "lora")
    err = fails_cleanly(capsys, command[0], str(tmp_path / "lora"), str(tmp_path / "out"), *command[1:])
    assert "holds a LORA adapter, not an OSoRA one" in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_without_its_config_is_called_incomplete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # what a kill during the final save of an old run left; osora merge/eval said "Should have a `model_type` key"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    err = fails_cleanly(capsys, "merge", str(tmp_path / "run"), str(tmp_path / "out"))
    assert "no adapter_config.json: an incomplete adapter" in err
    err = fails_cleanly(
        capsys, "eval", "--config", str(TINY), f"--eval.model={tmp_path / 'run'}", f"--eval.path={FIXTURE}"
    )
    assert "incomplete adapter" in err


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    return tmp_path


def test_a_mistyped_run_folder_is_no_such_directory(
    in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails_cleanly(capsys, "merge", "runs/tiny-gsm8k-osra", "merged")
    assert "no such file or directory: runs/tiny-gsm8k-osra" in err
    err = fails_cleanly(
        capsys, "eval", "--config", str(TINY), "--eval.model=runs/tiny-gsm8k-osra", f"--eval.path={FIXTURE}"
    )
    assert "no such file or directory: runs/tiny-gsm8k-osra" in err
    for name in ("./runs/x", "~/no-such-osora-dir", "/no/such/model"):
        err = fails_cleanly(capsys, "params", name)
        assert f"no such file or directory: {name}" in err


def test_offline_mode_is_said_for_a_hub_id(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = fails_cleanly(capsys, "params", str(ROOT / "configs" / "qwen2-7b-metamath-osora.yaml"))
    assert "'Qwen/Qwen2-7B'" in err and "offline (HF_HUB_OFFLINE=1)" in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from osora.app.config import ConfigError

    with pytest.raises(ConfigError, match="no such file"):
        main(["train", "--config", str(tmp_path / "nope.yaml"), "--debug"])


def test_the_real_command_prints_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "osora.app.cli", "train", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("osora ", "(run with"))]
    assert ours == [
        f"osora train: config file {tmp_path / 'nope.yaml'}: no such file; "
        "pass the path of a YAML config such as configs/tiny/gsm8k-osora.yaml",
        "(run with --debug for the traceback)",
    ]
    assert "Traceback" not in proc.stderr


def test_ctrl_c_outside_training_is_one_line_and_exit_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import osora.app.params

    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(osora.app.params, "main", interrupted)
    assert main(["params", "x"]) == 130
    assert capsys.readouterr().err.strip() == "osora params: interrupted"
