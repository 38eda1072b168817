"""``osora params``: counts through peft's own target matching equal the closed forms and peft's own count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from osora.app import params
from osora.app.methods import peft_config
from osora.config import default_target_modules

ROOT = Path(__file__).resolve().parents[1]
QWEN2_7B = ROOT / "configs" / "models" / "qwen2-7b.json"


def _qwen2_7b_shapes() -> list[tuple[int, int]]:
    # (d_in, d_out) of the 7 linears of one Qwen2-7B block, written out from the architecture
    hidden, inter, heads, kv_heads = 3584, 18944, 28, 4
    kv = hidden // heads * kv_heads  # 512
    block = [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]
    return block * 28


@pytest.fixture(scope="module")
def qwen() -> torch.nn.Module:
    return params.meta_model(params.load_model_config(str(QWEN2_7B)))


@pytest.mark.parametrize("r", [1, 8, 64, 256])
def test_qwen2_7b_counts_equal_closed_forms(qwen: torch.nn.Module, r: int) -> None:
    shapes = _qwen2_7b_shapes()
    matrices, (row,) = params.table(qwen, [r])
    assert sorted((m.d_in, m.d_out) for m in matrices) == sorted(shapes)
    assert row["lora"] == r * sum(d_in + d_out for d_in, d_out in shapes)
    assert row["vera"] == sum(d_out + r for _, d_out in shapes)
    assert row["osora"] == sum(d_out + r for _, d_out in shapes)
    _, (row_in,) = params.table(qwen, [r], o_dim="input")
    assert row_in["osora"] == sum(d_in + r for d_in, _ in shapes)


def test_qwen2_7b_known_value(qwen: torch.nn.Module) -> None:
    # LoRA r=8 on every linear of Qwen2-7B: 20,185,088 trainable parameters
    assert params.table(qwen, [8])[1][0]["lora"] == 20_185_088


def _tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if (
        kind == "llama"
    ):  # d_in != d_out everywhere in the MLP, and k/v narrower than q (grouped-query attention)
        config = LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64,
        )  # fmt: skip
    else:  # GPT-2: Conv1D layers, c_attn is 32 -> 96
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return AutoModelForCausalLM.from_config(config)


CASES = [
    ("llama", "osora", {}),
    ("llama", "osora", {"o_dim": "input"}),
    ("llama", "osora-S", {}),
    ("llama", "lora", {}),
    ("llama", "dora", {}),
    ("llama", "vera", {}),
    ("gpt2", "osora", {}),
    ("gpt2", "osora", {"o_dim": "input"}),
    ("gpt2", "lora", {}),
    ("gpt2", "vera", {}),
    ("llama", "osora", {"target_modules": "all-linear"}),
    ("llama", "lora", {"target_modules": r".*\.mlp\.(up|down)_proj"}),
]


@pytest.mark.parametrize(("kind", "method", "fields"), CASES, ids=[f"{k}-{m}-{f}" for k, m, f in CASES])
def test_counter_equals_peft_count(kind: str, method: str, fields: dict) -> None:
    from peft import get_peft_model

    import osora  # noqa: F401  (registers OSoRA with peft)

    model = _tiny(kind)
    targets = fields.pop("target_modules", default_target_modules(model.config.model_type))
    r = 8
    if (
        method == "vera"
    ):  # VeRA needs equal-shaped targets (shared projections): the attention projections only
        targets = ["q_proj", "o_proj"] if kind == "llama" else ["c_proj"]

    def config():  # peft turns target_modules into a set in place: a fresh copy for each use
        return peft_config(
            method, r=r, target_modules=targets if isinstance(targets, str) else list(targets), **fields
        )

    meta = params.meta_model(model.config)
    matrices = params.adapted_matrices(meta, config())
    assert matrices, "no module matched"
    predicted = params.trainable_params(config(), matrices)
    peft_model = get_peft_model(model, config())
    trainable, total = params.count_parameters(peft_model)
    assert predicted == trainable
    adapted = {
        n.removeprefix("base_model.model.").removesuffix(".base_layer")
        for n, m in peft_model.named_modules()
        if n.endswith("base_layer")
    }
    assert {m.name for m in matrices} == adapted


def test_gpt2_counts_conv1d_layers() -> None:
    _, (row,) = params.table(params.meta_model(_tiny("gpt2").config), [4])
    # c_attn 32 -> 96, attn.c_proj 32 -> 32, mlp.c_fc 32 -> 128, mlp.c_proj 128 -> 32, in 2 blocks
    shapes = [(32, 96), (32, 32), (32, 128), (128, 32)] * 2
    assert row["osora"] == sum(d_out + 4 for _, d_out in shapes)
    assert row["lora"] == 4 * sum(a + b for a, b in shapes)


@pytest.mark.integration
def test_params_cli_writes_table_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, table = tmp_path / "fig1.png", tmp_path / "fig1.json"
    assert params.main([str(QWEN2_7B), "--ranks", "[4, 32]", "--png", str(png), "--json", str(table)]) == 0
    assert png.stat().st_size > 1000
    rows = json.loads(table.read_text())["rows"]
    assert [row["r"] for row in rows] == [4, 32]
    assert "OSoRA" in capsys.readouterr().out


def test_params_from_a_train_yaml() -> None:
    model = params.meta_model(params.load_model_config(str(ROOT / "configs" / "tiny" / "gsm8k-osora.yaml")))
    matrices, _ = params.table(model, [4])
    assert len(matrices) == 2 * 7
