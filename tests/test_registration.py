"""Guards for the peft internals that osora.registration relies on, and the public PEFT entry points."""

from __future__ import annotations

import enum

import peft
import pytest
import torch
from packaging.version import Version
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import osora
from osora.registration import osora_peft_type

from conftest import tiny_inputs, tiny_model


def test_peft_version_is_in_the_tested_range() -> None:
    # pyproject pins peft>=0.21.2,<0.22: widen it only together with this test suite passing on the new version
    assert Version("0.21.2") <= Version(peft.__version__) < Version("0.22")


def test_peft_internals_relied_on() -> None:
    """If peft changes any of these, registration must be revisited: fail loudly here."""
    assert issubclass(PeftType, str) and issubclass(PeftType, enum.Enum)
    for table in ("_member_map_", "_value2member_map_", "_member_names_"):
        assert hasattr(PeftType, table), f"PeftType.{table} is gone"
    assert hasattr(peft.utils, "register_peft_method")
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    for hook in (
        "_create_and_replace",
        "_pre_injection_hook",
        "_post_injection_hook",
        "_remap_adapter_state_dict_for_load",
    ):
        assert hasattr(BaseTuner, hook), f"BaseTuner.{hook} is gone"
    for attr in ("frozen_peft_weight_names", "_move_adapter_to_device_of_base_layer", "set_adapter"):
        assert hasattr(BaseTunerLayer, attr), f"BaseTunerLayer.{attr} is gone"


def test_registration_is_complete_and_idempotent() -> None:
    osora.register()
    osora.register()
    member = osora_peft_type()
    assert member is PeftType.OSORA is PeftType("OSORA") is PeftType["OSORA"]
    assert member in list(PeftType) and member == "OSORA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is osora.OSoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is osora.OSoRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "osora_"
    assert list(PeftType).count(member) == 1


def test_config_round_trip_through_peft(tmp_path) -> None:
    config = osora.OSoRAConfig(
        r=16, target_modules=["q_proj"], trainable="S", o_dim="input", save_factors=False
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, osora.OSoRAConfig)
    assert (loaded.r, loaded.trainable, loaded.o_dim, loaded.save_factors) == (16, "S", "input", False)
    assert loaded.target_modules == {"q_proj"}


def test_default_target_modules_per_architecture(arch: str) -> None:
    model = get_peft_model(tiny_model(arch), osora.OSoRAConfig(r=2))
    adapted = model.base_model.targeted_module_names
    assert adapted, arch
    if arch == "bert":
        assert not any("pooler" in n or "classifier" in n for n in adapted)
    if arch in ("llama", "qwen2"):
        assert {n.rsplit(".", 1)[-1] for n in adapted} == set(osora.DEFAULT_TARGET_MODULES["llama"])


def test_print_trainable_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=2))
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out
    assert torch.is_tensor(model(input_ids=tiny_inputs()).logits)
