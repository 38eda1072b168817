"""Invariants of the OSoRA tuner against independent dense references written out here."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn

import osora
from osora.layer import OSoRALayer

from conftest import logits, tiny_inputs, tiny_model


def osora_layers(model: nn.Module) -> dict[str, OSoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OSoRALayer)}


def dense_W(layer: OSoRALayer) -> torch.Tensor:
    w = layer.get_base_layer().weight.detach().float()
    return w.T if layer.fan_in_fan_out else w


def reference_output(layer: OSoRALayer, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """W x + b + (diag(O) U diag(S) Vᵀ − U diag(σ) Vᵀ) x, with explicit matrices (output variant, raw S)."""
    U = layer.osora_U[adapter].float()
    Vh = layer.osora_Vh[adapter].float()
    sigma = layer.osora_sigma[adapter].float()
    S = layer.osora_S[adapter].detach().float()
    O = layer.osora_O[adapter].detach().float()
    W_new = dense_W(layer) - U @ torch.diag(sigma) @ Vh + torch.diag(O) @ U @ torch.diag(S) @ Vh
    bias = layer.get_base_layer().bias
    out = x.float() @ W_new.T
    return out + bias.detach().float() if bias is not None else out


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b differ by more than 1e-3 of their scale (the tiny BERT's logits are ~1e-2)."""
    return bool((a - b).abs().max() > 1e-3 * b.abs().max())


def test_identity_at_init(arch: str) -> None:
    base = tiny_model(arch)
    ids = tiny_inputs()
    ref = logits(base, ids)
    model = get_peft_model(base, osora.OSoRAConfig(r=4))
    assert len(osora_layers(model)) > 0
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=0)


def test_random_adapter_matches_dense_reference(arch: str) -> None:
    model = get_peft_model(tiny_model(arch), osora.OSoRAConfig(r=4, init_weights=False))
    layers = osora_layers(model)
    torch.manual_seed(3)
    for name, layer in layers.items():
        x = torch.randn(2, 5, layer.in_features)
        with torch.no_grad():
            out = layer(x)
        torch.testing.assert_close(out, reference_output(layer, x), atol=2e-5, rtol=1e-4, msg=name)
        assert not torch.allclose(out, layer.get_base_layer()(x), atol=1e-4), (
            f"{name}: adapter is the identity"
        )


def test_factors_are_the_top_r_svd(arch: str) -> None:
    model = get_peft_model(tiny_model(arch), osora.OSoRAConfig(r=3))
    for name, layer in osora_layers(model).items():
        sv = torch.linalg.svdvals(dense_W(layer))
        torch.testing.assert_close(layer.osora_sigma["default"], sv[:3], atol=1e-5, rtol=1e-5, msg=name)
        U, Vh = layer.osora_U["default"], layer.osora_Vh["default"]
        torch.testing.assert_close(U.T @ U, torch.eye(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(Vh @ Vh.T, torch.eye(3), atol=1e-5, rtol=0)


def test_trainable_count_is_sum_of_r_plus_d_out() -> None:
    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4))
    expected = sum(
        min(4, m.in_features, m.out_features) + m.out_features for m in osora_layers(model).values()
    )
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    names = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"osora_S", "osora_O"}


@pytest.mark.parametrize(("trainable", "expect_S", "expect_O"), [("both", 1, 1), ("S", 1, 0), ("O", 0, 1)])
def test_ablation_switches_freeze_what_they_say(trainable: str, expect_S: int, expect_O: int) -> None:
    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4, trainable=trainable))
    layers = osora_layers(model).values()
    n_S = sum(min(4, m.in_features, m.out_features) for m in layers)
    n_O = sum(m.out_features for m in layers)
    assert model.get_nb_trainable_parameters()[0] == expect_S * n_S + expect_O * n_O
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "osora_" in n}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = tiny_inputs()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if "osora_S" in n and not expect_S or "osora_O" in n and not expect_O:
            assert p.grad is None, f"{n} is frozen but got a gradient"
    opt.step()
    for n, p in model.named_parameters():
        if "osora_S" in n:
            assert (not torch.equal(p, before[n])) == bool(expect_S), n
        if "osora_O" in n:
            assert (not torch.equal(p, before[n])) == bool(expect_O), n
    # re-activating the adapter must not unfreeze the frozen vector
    model.set_adapter("default")
    assert model.get_nb_trainable_parameters()[0] == expect_S * n_S + expect_O * n_O


def test_training_changes_only_S_and_O(arch: str) -> None:
    base = tiny_model(arch)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, osora.OSoRAConfig(r=4))
    buffers = {n: b.clone() for n, b in model.named_buffers() if "osora_" in n}
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = tiny_inputs()
    for _ in range(3):
        out = model(input_ids=ids, labels=ids if arch != "bert" else torch.tensor([0, 1, 2]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    for n, b in model.named_buffers():
        if "osora_" in n:
            assert torch.equal(b, buffers[n]), f"frozen factor {n} changed"
    for n, p in model.named_parameters():
        if n in params:
            assert not torch.equal(p, params[n]), f"{n} did not train"
    unloaded = model.unload()
    for k, v in unloaded.state_dict().items():
        assert torch.equal(v, base_state[k]), f"base weight {k} changed"


def test_merge_unmerge_and_merge_and_unload(arch: str) -> None:
    model = get_peft_model(tiny_model(arch), osora.OSoRAConfig(r=4, init_weights=False))
    ids = tiny_inputs()
    weights = {n: m.get_base_layer().weight.clone() for n, m in osora_layers(model).items()}
    expected = logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for n, m in osora_layers(model).items():
        torch.testing.assert_close(m.get_base_layer().weight, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    assert not osora_layers(merged)
    assert not any("osora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-5)


def test_safe_merge_raises_on_non_finite() -> None:
    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4))
    layer = next(iter(osora_layers(model).values()))
    with torch.no_grad():
        layer.osora_O["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)


def test_disable_adapter_and_unload_give_the_base(arch: str) -> None:
    base = tiny_model(arch)
    ids = tiny_inputs()
    ref = logits(base, ids)
    model = get_peft_model(base, osora.OSoRAConfig(r=4, init_weights=False))
    assert differs(logits(model, ids), ref)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model.unload(), ids), ref, atol=1e-6, rtol=0)


def test_several_adapters_share_factors_and_switch() -> None:
    base = tiny_model("llama")
    ids = tiny_inputs()
    model = get_peft_model(base, osora.OSoRAConfig(r=4, init_weights=False), adapter_name="a")
    model.add_adapter("b", osora.OSoRAConfig(r=4, init_weights=False))
    model.add_adapter("c", osora.OSoRAConfig(r=2, init_weights=False))
    for layer in osora_layers(model).values():
        assert layer.osora_U["a"].data_ptr() == layer.osora_U["b"].data_ptr()
        assert layer.osora_Vh["a"].data_ptr() == layer.osora_Vh["b"].data_ptr()
        assert layer.osora_U["a"].data_ptr() != layer.osora_U["c"].data_ptr()
        assert layer.osora_U["c"].shape[1] == 2
    outs = {}
    for name in "abc":
        model.set_adapter(name)
        outs[name] = logits(model, ids)
    assert differs(outs["a"], outs["b"])
    # only the active adapter trains
    model.set_adapter("b")
    assert all(("osora_" in n and ".b" in n) for n, p in model.named_parameters() if p.requires_grad)
    model.delete_adapter("a")
    for layer in osora_layers(model).values():
        assert "a" not in layer.osora_U and "b" in layer.osora_U
    torch.testing.assert_close(logits(model, ids), outs["b"], atol=1e-6, rtol=0)


def test_mixed_batch_rows_equal_single_adapter_runs() -> None:
    base = tiny_model("llama")
    model = get_peft_model(base, osora.OSoRAConfig(r=4, init_weights=False), adapter_name="a")
    model.add_adapter("b", osora.OSoRAConfig(r=2, init_weights=False))
    model.eval()
    ids = tiny_inputs(batch=4)
    single = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        single[name] = logits(model, ids)
    with model.disable_adapter():
        single["__base__"] = logits(model, ids)
    names = ["a", "__base__", "b", "a"]
    mixed = logits(model, ids, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], single[name][i], atol=1e-5, rtol=1e-5, msg=f"row {i} ({name})")
    # generate follows the same routing
    gen = model.generate(input_ids=ids[:, :3], adapter_names=names, max_new_tokens=4, do_sample=False)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                solo = model.generate(input_ids=ids[i : i + 1, :3], max_new_tokens=4, do_sample=False)
        else:
            model.set_adapter(name)
            solo = model.generate(input_ids=ids[i : i + 1, :3], max_new_tokens=4, do_sample=False)
        assert torch.equal(gen[i], solo[0]), f"row {i} ({name})"
    with pytest.raises(ValueError, match="do not exist"):
        logits(model, ids, adapter_names=["a", "zz", "b", "a"])


def test_o_dim_input_matches_dense_reference() -> None:
    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4, o_dim="input", init_weights=False))
    for name, layer in osora_layers(model).items():
        assert layer.osora_O["default"].shape == (layer.in_features,)
        U, Vh = layer.osora_U["default"], layer.osora_Vh["default"]
        sigma, S, O = (
            layer.osora_sigma["default"],
            layer.osora_S["default"].detach(),
            layer.osora_O["default"].detach(),
        )
        W_new = dense_W(layer) - U @ torch.diag(sigma) @ Vh + U @ torch.diag(S) @ Vh @ torch.diag(O)
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ W_new.T, atol=2e-5, rtol=1e-4, msg=name)


def test_scaled_parametrization_is_the_same_model_family() -> None:
    base = tiny_model("llama")
    ids = tiny_inputs()
    ref = logits(base, ids)
    model = get_peft_model(base, osora.OSoRAConfig(r=4, s_parametrization="scaled"))
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=0)
    for name, layer in osora_layers(model).items():
        assert torch.equal(layer.osora_S["default"], torch.ones_like(layer.osora_S["default"]))
        with torch.no_grad():
            layer.osora_S["default"].mul_(1.5)
        U, Vh, sigma = layer.osora_U["default"], layer.osora_Vh["default"], layer.osora_sigma["default"]
        W_new = dense_W(layer) + U @ torch.diag(sigma * 1.5 - sigma) @ Vh
        x = torch.randn(2, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ W_new.T, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases(dtype: torch.dtype, autocast: bool) -> None:
    base = tiny_model("llama", dtype=dtype)
    ids = tiny_inputs()
    ref = logits(base, ids)
    model = get_peft_model(base, osora.OSoRAConfig(r=4), autocast_adapter_dtype=autocast)
    adapter_dtype = (
        torch.float32 if autocast else dtype
    )  # PEFT's autocast_adapter_dtype upcasts adapter tensors
    for layer in osora_layers(model).values():
        assert layer.osora_S["default"].dtype == adapter_dtype
        assert layer.osora_O["default"].dtype == adapter_dtype
        assert layer.osora_U["default"].dtype == adapter_dtype
    out = logits(model, ids)
    assert out.dtype == dtype
    assert torch.equal(out, ref), "the branch must be exactly zero at init in half precision too"
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_rank_is_clamped_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="min\\(d_in, d_out\\)"):
        model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=40))
    for layer in osora_layers(model).values():
        assert layer.osora_S["default"].numel() == min(layer.in_features, layer.out_features)


def test_bad_input_gives_clear_errors() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        osora.OSoRAConfig(r=0)
    with pytest.raises(ValueError, match="trainable"):
        osora.OSoRAConfig(trainable="U")
    with pytest.raises(ValueError, match="o_dim"):
        osora.OSoRAConfig(o_dim="both")
    with pytest.raises(ValueError, match="not found|target modules"):
        get_peft_model(tiny_model("llama"), osora.OSoRAConfig(target_modules=["no_such_proj"]))
    with pytest.raises(TypeError, match="embed_tokens.*Embedding"):
        get_peft_model(tiny_model("llama"), osora.OSoRAConfig(target_modules=["embed_tokens"]))
    int_model = nn.Sequential(nn.Linear(4, 4))
    int_model[0].weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="floating-point.*'0'"):
        get_peft_model(int_model, osora.OSoRAConfig(target_modules=["0"]))


def test_modules_to_save_and_bias() -> None:
    base = tiny_model("bert")
    model = get_peft_model(base, osora.OSoRAConfig(r=4, modules_to_save=["classifier"], bias="osora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert any(n.endswith("base_layer.bias") for n in trainable)


def test_add_adapter_while_merged_is_refused() -> None:
    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4, init_weights=False))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge first"):
        model.add_adapter("b", osora.OSoRAConfig(r=4))


def test_gradient_checkpointing_trains() -> None:
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4, init_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = tiny_inputs()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_deepcopy_and_repeat_registration() -> None:
    osora.register()
    osora.register()
    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4, init_weights=False))
    clone = copy.deepcopy(model)
    ids = tiny_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(logits(clone, ids), logits(model, ids))


@pytest.mark.parametrize("o_dim", ["output", "input"])
@pytest.mark.parametrize("s_parametrization", ["raw", "scaled"])
def test_merge_equals_forward_for_every_variant(o_dim: str, s_parametrization: str) -> None:
    config = osora.OSoRAConfig(r=4, init_weights=False, o_dim=o_dim, s_parametrization=s_parametrization)
    model = get_peft_model(tiny_model("gpt2"), config)
    ids = tiny_inputs()
    expected = logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
