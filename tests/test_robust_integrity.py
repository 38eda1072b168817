"""Adapter integrity: a checksum of the tensors verified on load, non-finite S/O refused at save, compact adapters
checked against the base before any SVD, and a refused load leaves the user's base model as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import osora
import osora.factors
from osora.checkpoint import CHECKSUM_KEY, tensors_checksum

from conftest import logits, tiny_inputs, tiny_model

WEIGHTS = "adapter_model.safetensors"


def trained(save_factors: bool = True, r: int = 4) -> PeftModel:
    model = get_peft_model(
        tiny_model("llama"), osora.OSoRAConfig(r=r, init_weights=False, save_factors=save_factors)
    )
    return model.eval()


def snapshot(model: torch.nn.Module) -> tuple[dict[str, tuple[type, int]], dict[str, torch.Tensor], set[str]]:
    """The module tree (type and identity of every module), the state, and the attribute names of ``model``."""
    modules = {name: (type(m), id(m)) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return modules, state, set(vars(model))


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    modules, state, attrs = snapshot(model)
    assert modules == before[0], "the module tree changed"
    assert state.keys() == before[1].keys()
    for key in state:
        assert torch.equal(state[key], before[1][key]), key
    assert attrs == before[2], attrs ^ before[2]


def test_the_file_carries_a_checksum_of_its_tensors(tmp_path: Path) -> None:
    trained().save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS)
    assert torch.equal(tensors[CHECKSUM_KEY], tensors_checksum(tensors))
    # an independent digest: SHA-256 over name|shape|dtype|bytes of the osora_* tensors in name order
    import hashlib

    h = hashlib.sha256()
    for key in sorted(k for k in tensors if k != CHECKSUM_KEY):
        t = tensors[key]
        h.update(
            f"{key}|{tuple(t.shape)}|{t.dtype}|".encode() + t.contiguous().view(torch.uint8).numpy().tobytes()
        )
    assert bytes(tensors[CHECKSUM_KEY].tolist()) == h.digest()


def _corrupt_body(path: Path) -> None:
    """Flip one bit inside a tensor's data, keeping the header (and so the file's structure) valid."""
    data = bytearray(path.read_bytes())
    body = 8 + int.from_bytes(
        data[:8], "little"
    )  # safetensors: u64 header length, JSON header, then the bytes
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("osora_S"))
    start = data.index(tensors[key].contiguous().view(torch.uint8).numpy().tobytes(), body)
    data[start] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("save_factors", [True, False], ids=["with-factors", "compact"])
def test_a_corrupt_body_is_refused_naming_the_file_and_the_base_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, save_factors: bool
) -> None:
    trained(save_factors=save_factors).save_pretrained(tmp_path / "a")
    _corrupt_body(tmp_path / "a" / WEIGHTS)
    load_file(tmp_path / "a" / WEIGHTS)  # still a valid safetensors file: only the checksum catches it
    monkeypatch.setattr(osora.factors, "batched_top_r_svd", _no_svd)
    base = tiny_model("llama")
    before = snapshot(base)
    with pytest.raises(
        osora.AdapterFileError, match=rf"{WEIGHTS} is corrupt: its tensors do not match the checksum"
    ):
        PeftModel.from_pretrained(base, tmp_path / "a")
    assert_unchanged(base, before)


def test_an_adapter_with_non_finite_s_or_o_is_not_saved(tmp_path: Path) -> None:
    model = trained()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.osora_S["default"][1] = float("nan")
    with pytest.raises(
        osora.AdapterFileError,
        match="refusing to save OSoRA adapter 'default': osora_S of "
        "'model.layers.0.self_attn.q_proj' holds non-finite values",
    ):
        osora.save_adapter(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    with torch.no_grad():
        layer.osora_S["default"][1] = 1.0
        layer.osora_O["default"][0] = float("inf")
    with pytest.raises(osora.AdapterFileError, match="osora_O of"):
        model.save_pretrained(tmp_path / "inf")


def test_a_nan_adapter_file_is_refused_before_any_svd_and_the_base_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained(save_factors=False).save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS)
    key = next(k for k in tensors if k.endswith("osora_O"))
    tensors[key][0] = float("nan")
    tensors[CHECKSUM_KEY] = tensors_checksum(tensors)  # a file written with NaN by some other tool
    save_file(tensors, tmp_path / "a" / WEIGHTS)
    monkeypatch.setattr(osora.factors, "batched_top_r_svd", _no_svd)
    base = tiny_model("llama")
    before = snapshot(base)
    with pytest.raises(osora.AdapterFileError, match="non-finite"):
        PeftModel.from_pretrained(base, tmp_path / "a")
    assert_unchanged(base, before)


def _no_svd(*args: object, **kwargs: object) -> None:
    raise AssertionError("an SVD ran before the refusal")


def test_a_wrong_base_compact_adapter_is_refused_before_any_svd_and_the_base_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained(save_factors=False).save_pretrained(tmp_path / "compact")
    monkeypatch.setattr(osora.factors, "batched_top_r_svd", _no_svd)
    other = tiny_model("llama", seed=1)
    before = snapshot(other)
    with pytest.raises(osora.AdapterFileError, match="differs from the one adapter 'default' was trained on"):
        PeftModel.from_pretrained(other, tmp_path / "compact")
    assert_unchanged(other, before)


def test_a_shape_mismatch_is_refused_and_the_base_gets_its_modules_back(tmp_path: Path) -> None:
    trained(r=4).save_pretrained(tmp_path / "r4")
    config = osora.OSoRAConfig.from_pretrained(str(tmp_path / "r4"))
    config.r = 2  # the file's factors are rank 4: as if the config and weights came from different runs
    config.save_pretrained(str(tmp_path / "r4"))
    base = tiny_model("llama")
    before = snapshot(base)
    expected = logits(base, tiny_inputs())
    with pytest.raises(osora.AdapterFileError, match="does not fit this model"):
        PeftModel.from_pretrained(base, tmp_path / "r4")
    assert_unchanged(base, before)
    torch.testing.assert_close(logits(base, tiny_inputs()), expected, atol=0, rtol=0)


def test_a_refused_second_adapter_leaves_the_first(tmp_path: Path) -> None:
    trained(save_factors=False).save_pretrained(tmp_path / "compact")
    model = get_peft_model(tiny_model("llama", seed=1), osora.OSoRAConfig(r=4, init_weights=False)).eval()
    expected = logits(model, tiny_inputs())
    with pytest.raises(osora.AdapterFileError, match="differs"):
        model.load_adapter(str(tmp_path / "compact"), adapter_name="other")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(logits(model, tiny_inputs()), expected, atol=0, rtol=0)
