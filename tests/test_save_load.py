"""Saving, loading in a fresh process, compact files, corrupt files and the three exports."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import xxhash
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import osora
from osora.checkpoint import CHECKSUM_KEY, atomic_directory, tensors_checksum
from osora.export import save_as_lora, save_merged, save_residual

from conftest import logits, tiny_inputs, tiny_model

TESTS = Path(__file__).parent


def run_fresh(script: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Run ``script`` in a new Python process; it saves a dict of tensors to OUT, which is returned."""
    out = tmp_path / "fresh_out.pt"
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OUT": str(out),
    }
    code = "import os, torch\nfrom conftest import tiny_model, tiny_inputs, logits\n" + textwrap.dedent(
        script
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def trained_model(arch: str = "llama", **config: object) -> PeftModel:
    model = get_peft_model(tiny_model(arch), osora.OSoRAConfig(r=4, init_weights=False, **config))
    return model.eval()


@pytest.mark.integration
def test_fresh_process_round_trip_and_plain_peft_exports(tmp_path: Path) -> None:
    ids = tiny_inputs()
    full, compact = trained_model(), trained_model(save_factors=False)
    with torch.no_grad():  # make the two adapters different
        for p in compact.parameters():
            if p.requires_grad:
                p.mul_(0.9)
    expected = {"full": logits(full, ids), "compact": logits(compact, ids)}
    full.save_pretrained(tmp_path / "full")
    osora.save_adapter(compact, tmp_path / "compact")
    save_as_lora(full, tmp_path / "lora")
    save_residual(full, tmp_path / "residual")
    save_merged(full, tmp_path / "merged")

    full_keys = load_file(tmp_path / "full" / "adapter_model.safetensors").keys()
    compact_keys = load_file(tmp_path / "compact" / "adapter_model.safetensors").keys()
    assert any("osora_U" in k for k in full_keys)
    assert not any(n in k for k in compact_keys for n in ("osora_U", "osora_Vh", "osora_sigma"))
    assert {k.split(".")[-1] for k in compact_keys} == {
        "osora_S",
        "osora_O",
        "osora_fingerprint",
        "osora_trained_sigma",
        "osora_checksum",
    }

    got = run_fresh(
        f"""
        import sys
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        ids = tiny_inputs()
        res = {{}}
        # plain peft, osora never imported: the LoRA and residual exports and the merged model
        res["lora"] = logits(PeftModel.from_pretrained(tiny_model("llama"), "{tmp_path / "lora"}"), ids)
        res["merged"] = logits(AutoModelForCausalLM.from_pretrained("{tmp_path / "merged"}"), ids)
        residual_base = AutoModelForCausalLM.from_pretrained("{tmp_path / "residual" / "base"}")
        res["residual"] = logits(PeftModel.from_pretrained(residual_base, "{tmp_path / "residual" / "adapter"}"), ids)
        assert "osora" not in sys.modules
        import osora
        res["full"] = logits(PeftModel.from_pretrained(tiny_model("llama"), "{tmp_path / "full"}"), ids)
        res["compact"] = logits(PeftModel.from_pretrained(tiny_model("llama"), "{tmp_path / "compact"}"), ids)
        torch.save(res, os.environ["OUT"])
        """,
        tmp_path,
    )
    torch.testing.assert_close(got["full"], expected["full"], atol=0, rtol=0)
    torch.testing.assert_close(got["compact"], expected["compact"], atol=0, rtol=0)
    for name in ("lora", "merged", "residual"):
        torch.testing.assert_close(got[name], expected["full"], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_exports_in_process(arch: str, tmp_path: Path) -> None:
    """Conv1D (fan_in_fan_out) and modules_to_save survive the LoRA export."""
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    model = trained_model(arch, **extra)
    ids = tiny_inputs()
    expected = logits(model, ids)
    save_as_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "lora")
    torch.testing.assert_close(logits(lora, ids), expected, atol=2e-5, rtol=1e-4)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


def test_compact_adapter_refuses_a_different_base(tmp_path: Path) -> None:
    osora.save_adapter(trained_model(save_factors=False), tmp_path / "compact")
    other = tiny_model("llama", seed=1)
    with pytest.raises(osora.AdapterFileError, match="differs from the one adapter 'default' was trained on"):
        PeftModel.from_pretrained(other, tmp_path / "compact")
    # a full adapter carries its factors: it loads, with a warning
    trained_model().save_pretrained(tmp_path / "full")
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        PeftModel.from_pretrained(tiny_model("llama", seed=1), tmp_path / "full")


def _digest(name: str, weight: torch.Tensor) -> torch.Tensor:
    """A fingerprint computed independently of osora: hash of shape|dtype| and the weight's bytes."""
    h = xxhash.xxh3_128() if name == "xxh3_128" else hashlib.sha256()
    h.update(
        f"{tuple(weight.shape)}|{weight.dtype}|".encode()
        + weight.detach().contiguous().view(torch.uint8).numpy().tobytes()
    )
    return torch.tensor(list(h.digest()), dtype=torch.uint8)


@pytest.mark.parametrize("save_factors", [False, True], ids=["compact", "with-factors"])
def test_files_with_the_earlier_sha256_fingerprints_load_and_are_still_checked(
    save_factors: bool, tmp_path: Path
) -> None:
    model = trained_model(save_factors=save_factors)
    ids = tiny_inputs()
    expected = logits(model, ids)
    osora.save_adapter(model, tmp_path / "new")
    tensors = load_file(tmp_path / "new" / "adapter_model.safetensors")
    base = dict(tiny_model("llama").named_modules())
    suffix = ".osora_fingerprint"
    fingerprints = [k for k in tensors if k.endswith(suffix)]
    assert fingerprints
    for key in fingerprints:  # today's files: XXH3-128 of the base weight
        weight = base[key.removesuffix(suffix).removeprefix("base_model.model.")].weight
        assert torch.equal(tensors[key], _digest("xxh3_128", weight))
        tensors[key] = _digest("sha256", weight)  # what osora wrote before
    with pytest.raises(ValueError, match="unknown fingerprint algorithm 'md5'"):
        osora.weight_fingerprint(weight, "md5")
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    tensors = {k: v for k, v in tensors.items() if k != CHECKSUM_KEY}
    save_file({**tensors, CHECKSUM_KEY: tensors_checksum(tensors)}, old / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = PeftModel.from_pretrained(tiny_model("llama"), old)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=0, rtol=0)
    osora.save_adapter(loaded, tmp_path / "again")  # it keeps the file's fingerprints, which still verify
    PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "again")
    other = tiny_model("llama", seed=1)
    if save_factors:
        with pytest.warns(UserWarning, match="fingerprint mismatch"):
            PeftModel.from_pretrained(other, old)
    else:
        with pytest.raises(
            osora.AdapterFileError, match="differs from the one adapter 'default' was trained on"
        ):
            PeftModel.from_pretrained(other, old)


@pytest.mark.parametrize("damage", ["truncate", "garble", "missing"])
def test_corrupt_adapter_file_gives_a_clear_error_and_leaves_the_base_untouched(
    damage: str, tmp_path: Path
) -> None:
    trained_model().save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garble":
        weights.write_bytes(b"\xff" * 16 + data[16:])
    else:
        weights.unlink()
    base = tiny_model("llama")
    before = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(osora.AdapterFileError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(base, tmp_path / "a")
    assert {n: type(m) for n, m in base.named_modules()} == before


def test_compact_adapter_warns_when_its_recomputed_factors_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import osora.factors

    compact = trained_model(save_factors=False)
    osora.save_adapter(compact, tmp_path / "a")
    with warnings.catch_warnings():  # the same software recomputes the same factors: no warning
        warnings.simplefilter("error", UserWarning)
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    # a compact file saved before σ was stored loads as before: no check, no missing-key warning
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "a", old)
    tensors = load_file(old / "adapter_model.safetensors")
    tensors = {k: v for k, v in tensors.items() if "osora_trained_sigma" not in k and k != CHECKSUM_KEY}
    save_file({**tensors, CHECKSUM_KEY: tensors_checksum(tensors)}, old / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PeftModel.from_pretrained(tiny_model("llama"), old)

    real = osora.factors.batched_top_r_svd

    def changed_svd(*args: object, **kwargs: object) -> list[object]:  # another SVD's last digits
        factors = real(*args, **kwargs)  # type: ignore[arg-type]
        return [dataclasses.replace(f, sigma=f.sigma * (1 + 1e-4)) for f in factors]

    monkeypatch.setattr(osora.factors, "batched_top_r_svd", changed_svd)
    with pytest.warns(
        UserWarning, match=r"differ from those it was trained with in \d+ of \d+ matrices .*1\.0e-04"
    ):
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    layer = next(m for m in loaded.modules() if isinstance(m, osora.OSoRALayer))
    torch.testing.assert_close(  # the buffer holds σ as trained with, for the next save
        layer.osora_trained_sigma["default"] * (1 + 1e-4), layer.osora_sigma["default"], rtol=1e-6, atol=0
    )


def test_saved_factors_are_reused_not_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = trained_model()
    model.save_pretrained(tmp_path / "a")
    import osora.factors

    def no_svd(*args: object, **kwargs: object) -> None:
        raise AssertionError("the SVD ran although the adapter file carries the factors")

    monkeypatch.setattr(osora.factors, "batched_top_r_svd", no_svd)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, tiny_inputs()), logits(model, tiny_inputs()), atol=0, rtol=0)


def test_atomic_directory_keeps_old_files_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    trained_model().save_pretrained(target)
    old = (target / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"half-written")
        raise RuntimeError("crash mid-save")
    assert (target / "adapter_model.safetensors").read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_auto_peft_model_and_adapter_subfolders(tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, osora.OSoRAConfig(r=4, init_weights=False))
    model.add_adapter("second", osora.OSoRAConfig(r=2, init_weights=False))
    ids = tiny_inputs()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "second" / "adapter_model.safetensors").is_file()
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(auto, ids), expected, atol=0, rtol=0)
    auto.load_adapter(tmp_path / "adapter" / "second", adapter_name="second")
    model.set_adapter("second")
    auto.set_adapter("second")
    torch.testing.assert_close(logits(auto, ids), logits(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("save_factors", [True, False])
def test_low_cpu_mem_usage_load(save_factors: bool, tmp_path: Path) -> None:
    model = trained_model(save_factors=save_factors)
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a", low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(loaded, tiny_inputs()), logits(model, tiny_inputs()), atol=0, rtol=0)


@pytest.mark.parametrize("built_with_factors", [True, False])
def test_save_adapter_overrides_the_file_mode_and_leaves_the_model_as_it_was(
    tmp_path: Path, built_with_factors: bool
) -> None:
    model = trained_model(save_factors=built_with_factors)
    ids = tiny_inputs()
    expected = logits(model, ids)
    before = set(model.state_dict())
    osora.save_adapter(model, tmp_path / "compact", save_factors=False)
    osora.save_adapter(model, tmp_path / "full", save_factors=True)
    assert (
        set(model.state_dict()) == before and model.peft_config["default"].save_factors is built_with_factors
    )
    kinds = {
        mode: {k.split(".")[-1] for k in load_file(tmp_path / mode / "adapter_model.safetensors")}
        for mode in ("compact", "full")
    }
    assert kinds["compact"] == {
        "osora_S",
        "osora_O",
        "osora_fingerprint",
        "osora_trained_sigma",
        "osora_checksum",
    }
    assert kinds["full"] == {
        "osora_S",
        "osora_O",
        "osora_U",
        "osora_Vh",
        "osora_sigma",
        "osora_fingerprint",
        "osora_checksum",
    }
    sizes = {mode: (tmp_path / mode / "adapter_model.safetensors").stat().st_size for mode in kinds}
    assert sizes["compact"] < sizes["full"] / 2  # tiny matrices: the header is much of it
    for mode in kinds:
        config = json.loads((tmp_path / mode / "adapter_config.json").read_text())
        assert config["save_factors"] is (mode == "full")
        reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / mode)
        torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="save_factors must be True, False or None"):
        osora.save_adapter(model, tmp_path / "bad", save_factors="no")  # type: ignore[arg-type]
    assert not (tmp_path / "bad").exists()
