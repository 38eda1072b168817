"""One method registry: every name builds its PEFT config, old spellings are refused with the new one."""

from __future__ import annotations

import peft
import pytest

import osora
from osora.app.config import ConfigError, load_config
from osora.app.methods import METHODS, get_method, peft_config


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_its_config(name: str) -> None:
    config = peft_config(name, r=4, target_modules=["q_proj"], task_type="CAUSAL_LM", dropout=0.1)
    family = METHODS[name].family
    if family is None:
        assert config is None
        return
    cls = {"osora": osora.OSoRAConfig, "lora": peft.LoraConfig, "vera": peft.VeraConfig}[family]
    assert type(config) is cls and config.r == 4
    for key, value in METHODS[name].fixed.items():
        assert getattr(config, key) == value
    dropout = {"osora": "dropout", "lora": "lora_dropout", "vera": "vera_dropout"}[family]
    assert getattr(config, dropout) == 0.1


def test_the_config_class_validates_the_fields() -> None:
    with pytest.raises(ValueError, match="o_dim"):
        peft_config("osora", r=4, o_dim="sideways")


@pytest.mark.parametrize(("old", "new"), [("osora_s", "osora-S"), ("osora_o", "osora-O")])
def test_old_spelling_names_the_new_one(old: str, new: str) -> None:
    with pytest.raises(ValueError, match=f"now spelled '{new}'"):
        get_method(old)
    with pytest.raises(ConfigError, match=f"method.name: method '{old}' is now spelled '{new}'"):
        load_config(None, [f"--method.name={old}"])


def test_unknown_method_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown method 'loraa'; choose from osora, osora-S"):
        load_config(None, ["--method.name=loraa"])
