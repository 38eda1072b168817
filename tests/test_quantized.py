"""OSoRA on bitsandbytes-quantized bases (4-bit NF4 with double quantisation, 8-bit), on the CPU.

The tiny Llama is saved once and loaded through transformers' ``BitsAndBytesConfig`` as a user would
(``device_map="cpu"``). References are computed inline: the SVD of the dequantised weight (bitsandbytes' own
dequantisation) and the quantized base model's own logits.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import osora
from osora.export import save_as_lora, save_merged

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install osora[quant])")

# each test loads a quantized model through transformers (seconds on 2 cores): the whole module is -m slow
pytestmark = pytest.mark.slow

VOCAB = 96
# bitsandbytes' CPU 4-bit kernel needs every in_features to be a multiple of its block size (64)
CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
QUANT = {
    "nf4": lambda: BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}
LAYER = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path)
    return path


def _load(base_dir: Path, kind: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=QUANT[kind](), device_map="cpu", dtype=torch.float32
    ).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _layers(model: torch.nn.Module) -> dict[str, osora.OSoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, osora.OSoRALayer)}


def _train(model: torch.nn.Module, steps: int = 5) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids, losses = _ids(2), []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _dequantised(layer: torch.nn.Module) -> torch.Tensor:
    """The weight bitsandbytes stores, dequantised with its own functions (4-bit) or by hand (8-bit: int8 · SCB / 127)."""
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scale = weight.SCB if weight.SCB is not None else layer.state.SCB  # (d_out,) absmax of each row
    return weight.data.float() * scale.float()[:, None] / 127


@pytest.fixture(params=["nf4", "int8"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_factors_are_the_svd_of_the_dequantised_weight_and_init_is_exact(base_dir: Path, kind: str) -> None:
    base = _load(base_dir, kind)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == LAYER[kind]
    dense = _dequantised(
        q_proj
    )  # before any forward: bitsandbytes' CPU 4-bit kernel repacks the weight in eval
    full = LlamaForCausalLM.from_pretrained(base_dir).model.layers[0].self_attn.q_proj.weight
    assert (dense - full).abs().max() < 0.15 * full.abs().max()  # the reference is the quantized full weight
    ids = _ids()
    reference = _logits(base, ids)

    model = get_peft_model(base, osora.OSoRAConfig(r=4, init_method="exact"))

    layers = _layers(model)
    assert len(layers) == 14  # every linear of the blocks (osora's Llama default)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.get_base_layer()).__name__ == LAYER[kind]  # still quantized
    U, sigma, Vh = torch.linalg.svd(dense.float(), full_matrices=False)
    # The reference forward above let bitsandbytes' CPU kernel repack the 4-bit weight; osora reads it back with
    # bitsandbytes' own inverse, which restores the block scales only up to float rounding ("best-effort", its
    # docstring says): σ then agrees to ~6e-4 relative on 4-bit, exactly on 8-bit. The layer itself is untouched.
    tolerance = 2e-3 if kind == "nf4" else 1e-5
    torch.testing.assert_close(layer.osora_sigma["default"], sigma[:4], rtol=tolerance, atol=1e-5)
    projector = layer.osora_U["default"] @ layer.osora_U["default"].T  # the same left subspace
    torch.testing.assert_close(projector, U[:, :4] @ U[:, :4].T, rtol=0, atol=10 * tolerance)
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-5)


def test_training_moves_only_s_and_o_and_the_quantized_weight_stays(base_dir: Path, kind: str) -> None:
    model = get_peft_model(_load(base_dir, kind), osora.OSoRAConfig(r=4))
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in _layers(model).items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".osora_S." in n or ".osora_O." in n for n in trainable)

    losses = _train(model)

    assert losses[-1] < losses[0]
    for name, layer in _layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, weights[name])


def test_save_load_onto_a_fresh_quantized_base(base_dir: Path, kind: str, tmp_path: Path) -> None:
    model = get_peft_model(_load(base_dir, kind), osora.OSoRAConfig(r=4))
    _train(model, steps=2)
    model.eval()
    ids = _ids()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")

    loaded = PeftModel.from_pretrained(_load(base_dir, kind), tmp_path / "adapter").eval()

    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-5)


def test_lora_export_loads_with_plain_peft_onto_the_quantized_base(
    base_dir: Path, kind: str, tmp_path: Path
) -> None:
    model = get_peft_model(_load(base_dir, kind), osora.OSoRAConfig(r=4))
    _train(model, steps=2)
    model.eval()
    ids = _ids()
    expected = _logits(model, ids)
    save_as_lora(model, tmp_path / "lora")

    lora = PeftModel.from_pretrained(_load(base_dir, kind), tmp_path / "lora").eval()

    assert lora.peft_config["default"].peft_type.value == "LORA"
    torch.testing.assert_close(_logits(lora, ids), expected, rtol=1e-4, atol=1e-4)


def test_merge_requantises_with_a_warning_and_stays_close(base_dir: Path, kind: str) -> None:
    model = get_peft_model(_load(base_dir, kind), osora.OSoRAConfig(r=4))
    _train(model, steps=2)
    model.eval()
    ids = _ids()
    expected = _logits(model, ids)
    base_only = _logits(_load(base_dir, kind), ids)

    with pytest.warns(UserWarning, match="quantiz"):
        merged = model.merge_and_unload()

    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == LAYER[kind]  # requantised in place
    got = _logits(merged, ids)
    # requantising W + ΔW rounds it again: closer to the adapted model than the base is, not bit-exact
    assert (got - expected).abs().max() < 0.5 * (base_only - expected).abs().max()


def test_merged_export_of_a_quantized_base_is_refused(base_dir: Path, kind: str, tmp_path: Path) -> None:
    model = get_peft_model(_load(base_dir, kind), osora.OSoRAConfig(r=4))
    with pytest.raises(ValueError, match="quantized"):
        save_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _logits(model, _ids())  # the model is untouched and still runs
