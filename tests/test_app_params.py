"""``osora params``: trainable parameters per method equal the closed forms, from a config alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from osora.app import params

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
def qwen_matrices() -> list[params.Matrix]:
    return params.adapted_matrices(params.load_model_config(str(QWEN2_7B)))


@pytest.mark.parametrize("r", [1, 8, 64, 256])
def test_qwen2_7b_counts_equal_closed_forms(qwen_matrices: list[params.Matrix], r: int) -> None:
    shapes = _qwen2_7b_shapes()
    assert sorted((m.d_in, m.d_out) for m in qwen_matrices) == sorted(shapes)
    counts = params.trainable_params(qwen_matrices, r)
    assert counts["lora"] == r * sum(d_in + d_out for d_in, d_out in shapes)
    assert counts["vera"] == sum(d_out + r for _, d_out in shapes)
    assert counts["osora"] == sum(d_out + r for _, d_out in shapes)


def test_qwen2_7b_known_value(qwen_matrices: list[params.Matrix]) -> None:
    # LoRA r=8 on every linear of Qwen2-7B: 20,185,088 trainable parameters
    assert params.trainable_params(qwen_matrices, 8)["lora"] == 20_185_088


@pytest.mark.integration
def test_params_cli_writes_table_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, table = tmp_path / "fig1.png", tmp_path / "fig1.json"
    assert params.main([str(QWEN2_7B), "--ranks", "4", "32", "--png", str(png), "--json", str(table)]) == 0
    assert png.stat().st_size > 1000
    rows = json.loads(table.read_text())["rows"]
    assert [row["r"] for row in rows] == [4, 32]
    assert "OSoRA" in capsys.readouterr().out


def test_params_from_a_train_yaml() -> None:
    config = params.load_model_config(str(ROOT / "configs" / "tiny" / "gsm8k-osora.yaml"))
    matrices = params.adapted_matrices(config)
    assert len(matrices) == 2 * 7
