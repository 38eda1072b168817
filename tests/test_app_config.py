"""The application's config schema: every shipped YAML loads, overrides fill it, unknown keys are errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from osora.app.config import ConfigError, RunConfig, load_config, parser

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))
TINY_CONFIG = ROOT / "configs" / "tiny" / "gsm8k-osora.yaml"


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
            "--method.name=vera",
            "--method.r=128",
            "--training.learning_rate=4e-3",
            "--method.target_modules=[q_proj, v_proj]",
            "--training.resume_from_checkpoint=true",
            "--model.from_config={model_type: llama, hidden_size: 8}",
        ],
    )
    assert cfg.method.name == "vera" and cfg.method.fields["r"] == 128
    assert cfg.training.learning_rate == pytest.approx(4e-3)
    assert cfg.method.fields["target_modules"] == ["q_proj", "v_proj"]
    assert cfg.training.resume_from_checkpoint is True
    assert cfg.model.from_config == {"model_type": "llama", "hidden_size": 8}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--training.lr=1", "training.lr"),
        ("trainer.max_steps=1", "trainer"),
        ("--method.name=qlora", "method.name"),
        ("--method.r=eight", "method.r"),
        ("--data.prompt=fancy", "data.prompt"),
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
    text = " ".join(parser("train").format_help().split())  # the default method's: OSoRAConfig's fields
    assert "--method.svd_seed SVD_SEED" in text and "(type: int, default: 0)" in text
    assert "--method.save_factors {true,false}" in text and "--training.resume_from_checkpoint" in text
    assert "--training.train_sampling_strategy" in text and "default: group_by_length" in text
    assert "--data.max_length MAX_LENGTH Records whose prompt + response exceed this many tokens" in text
    lora = " ".join(parser("train", "lora").format_help().split())
    assert "--method.lora_alpha LORA_ALPHA" in lora and "--method.dropout" in lora


def test_every_key_is_in_the_help_of_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    from osora.app.cli import main

    assert main(["train", "--method.name", "vera", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--method.d_initial" in out and "--method.svd_seed" not in out  # the chosen method's fields


@pytest.mark.parametrize("command", ["train", "eval"])
def test_cli_reports_a_bad_key_without_a_traceback(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from osora.app.cli import main

    assert (
        main([command, "--config", str(ROOT / "configs" / "tiny" / "gsm8k-osora.yaml"), "--training.lr=1"])
        == 2
    )
    assert "unknown config key 'training.lr'" in capsys.readouterr().err


#: A valid value other than the default for every OSoRAConfig field a user sets (peft's bookkeeping excluded).
OSORA_VALUES = {
    "r": 16,
    "target_modules": ["q_proj", "v_proj"],
    "exclude_modules": ["k_proj"],
    "layers_to_transform": [0],
    "layers_pattern": "layers",
    "dropout": 0.1,
    "bias": "none",  # OSoRA supports no other; the default is the one value
    "modules_to_save": ["lm_head"],
    "fan_in_fan_out": True,
    "init_weights": False,
    "trainable": "S",
    "o_dim": "input",
    "s_parametrization": "scaled",
    "init_method": "exact",
    "svd_oversample": 8,
    "svd_power_iters": 2,
    "svd_max_power_iters": 6,
    "svd_seed": 7,
    "svd_sigma_tolerance": 0.01,
    "svd_subspace_tolerance": 0.05,
    "svd_sketch_dtype": "float32",
    "factor_cache_dir": "/tmp/osora-factors",
    "save_factors": False,
}
PEFT_BOOKKEEPING = {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "peft_version"}


def test_every_osora_config_field_is_settable_from_yaml(tmp_path: Path) -> None:
    import dataclasses

    import yaml

    from osora import OSoRAConfig

    fields = {f.name for f in dataclasses.fields(OSoRAConfig) if f.init} - PEFT_BOOKKEEPING
    assert fields - {"task_type", "inference_mode"} == set(OSORA_VALUES), (
        "a new OSoRAConfig field needs a value here"
    )
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "osora", **OSORA_VALUES, "inference_mode": True}}))
    config = load_config(path).method.peft_config()
    assert isinstance(config, OSoRAConfig)
    for name, value in OSORA_VALUES.items():
        got = getattr(config, name)
        assert (set(got) if isinstance(got, set) else got) == (
            set(value) if isinstance(got, set) else value
        ), name
    assert config.inference_mode is True and config.task_type == "CAUSAL_LM"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--method.svd_power_iters=-1", "svd_power_iters"),  # OSoRAConfig's own check, named by it
        ("--method.svd_max_power_iters=1", "svd_max_power_iters"),
        ("--method.init_method=fancy", "method.init_method"),  # its annotation
        ("--method.rank=4", "unknown config key 'method.rank': OSoRAConfig"),
        ("--method.name=osora_s", "now spelled 'osora-S'"),
    ],
)
def test_method_fields_are_validated_by_the_method_config_class(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_peft_baselines_take_their_own_fields() -> None:
    lora = load_config(
        None, ["--method.name=lora", "--method.r=16", "--method.lora_alpha=32", "--method.dropout=0.1"]
    )
    config = lora.method.peft_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.1)
    assert load_config(None, ["--method.name=dora"]).method.peft_config().use_dora is True
    vera = load_config(None, ["--method.name=vera", "--method.d_initial=0.2"]).method.peft_config()
    assert vera.d_initial == 0.2
    with pytest.raises(ConfigError, match="'method.lora_alpha': VeraConfig"):
        load_config(None, ["--method.name=vera", "--method.lora_alpha=2"])


def test_the_training_section_is_training_arguments() -> None:
    from osora.app.train import training_arguments

    cfg = load_config(
        TINY_CONFIG,
        ["--training.adam_beta2=0.95", "--training.label_smoothing_factor=0.1", "--training.optim=adafactor"],
    )
    args = training_arguments(cfg)
    assert (args.adam_beta2, args.label_smoothing_factor, args.optim) == (0.95, 0.1, "adafactor")
    assert (
        args.train_sampling_strategy == "group_by_length" and args.report_to == []
    )  # YAML over osora's default
    assert (
        load_config(None, ["--method.name=lora"]).training.learning_rate == 1e-4
    )  # osora's default over transformers'
    with pytest.raises(ConfigError, match=r"training\.warmup_steps"):
        load_config(None, ["--training.warmup_ratio=0.1"])  # a transformers 4 name says the new one
    with pytest.raises(ConfigError, match="training settings"):
        training_arguments(load_config(TINY_CONFIG, ["--training.fp16=true", "--training.bf16=true"]))


def test_the_one_grammar_refuses_positional_config_and_undashed_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from osora.app.cli import main

    assert main(["eval", str(TINY_CONFIG), "eval.model=smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and "write --config CONFIG.yaml and --section.key VALUE" in err
    assert len(err.strip().splitlines()) == 2  # the problem and the fix, then the --debug hint
    with pytest.raises(ConfigError, match=r"config key 'eval\.max_samples'"):
        load_config(TINY_CONFIG, ["--eval.max_samples=many"])


def test_print_config_shows_the_merged_settings(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from osora.app.cli import main

    assert main(["train", "--config", str(TINY_CONFIG), "--method.r", "4", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"]["r"] == 4 and printed["training"]["learning_rate"] == 0.01


def test_osora_methods_default_to_their_measured_learning_rate() -> None:
    """Unset, training.learning_rate is OSoRA's rule (benchmarks/lr_rule.py) for every OSoRA method, the generic
    default for the others; a file's or an option's rate wins over both."""
    for name in ("osora", "osora-S", "osora-O", "osora-scaled"):
        assert load_config(None, [f"--method.name={name}"]).training.learning_rate == 1e-2
    for name in ("lora", "vera", "full"):
        assert load_config(None, [f"--method.name={name}"]).training.learning_rate == 1e-4
    assert load_config(None, ["--training.learning_rate=3e-3"]).training.learning_rate == 3e-3
    assert load_config(TINY_CONFIG, ["--method.name=lora"]).training.learning_rate == 0.01  # the YAML's
