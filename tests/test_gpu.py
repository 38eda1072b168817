"""OSoRA on a CUDA device in bfloat16: identity at init, training, merge, save/load and CUDA factors.

Run on a GPU machine with ``python -m pytest -m gpu``; skipped elsewhere. ``OSORA_GPU_TEST_DEVICE=cpu`` runs the
same checks on the CPU (to check the tests themselves without a GPU).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model

import osora
from osora.svd import SVDSpec, subspace_agreement, top_r_svd

from conftest import VOCAB, tiny_model

DEVICE = os.environ.get("OSORA_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _base() -> torch.nn.Module:
    return tiny_model("llama", dtype=torch.bfloat16).to(DEVICE)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def test_identity_at_init_and_factors_on_the_device() -> None:
    ids = _ids()
    expected = _logits(_base(), ids)
    model = get_peft_model(_base(), osora.OSoRAConfig(r=4))
    layer = next(m for m in model.modules() if isinstance(m, osora.OSoRALayer))
    assert layer.osora_U["default"].device.type == DEVICE and layer.osora_S["default"].dtype == torch.float32
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-2, rtol=2e-2)


def test_a_training_step_updates_only_s_and_o_and_the_merge_matches(tmp_path) -> None:
    model = get_peft_model(_base(), osora.OSoRAConfig(r=4))
    ids = _ids()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("osora_S" in n or "osora_O" in n for n in trained)
    expected = _logits(model, ids)
    model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(_base(), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=2e-2, rtol=2e-2)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, osora.OSoRALayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, ids), expected, atol=5e-2, rtol=5e-2)  # W + ΔW rounded to bf16


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_device_factors_agree_with_the_cpu_ones(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(512, 768, generator=g) * torch.logspace(0, -2, 768)  # a decaying column scale
    spec = SVDSpec(method=method)  # type: ignore[arg-type]
    cpu, dev = top_r_svd(W, 16, spec), top_r_svd(W.to(DEVICE), 16, spec)
    assert dev.U.device.type == DEVICE
    assert subspace_agreement(cpu.U, dev.U.cpu()) >= 0.999
    assert subspace_agreement(cpu.Vh.T, dev.Vh.cpu().T) >= 0.999
    assert float(((dev.sigma.cpu() - cpu.sigma).abs() / cpu.sigma).max()) <= 1e-3


def test_classification_trains_on_the_device_and_predicts_from_there() -> None:
    """``osora demo --encoder`` and benchmarks/glue.py: Trainer moves the model to the GPU; prediction follows it
    there and returns CPU logits."""
    from transformers import BertConfig, BertForSequenceClassification

    from osora.app import classify as C

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:  # right-padding with token 0
        n = max(len(f["input_ids"]) for f in features)
        ids = [f["input_ids"] + [0] * (n - len(f["input_ids"])) for f in features]
        mask = [[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in features]
        out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if "labels" in features[0]:
            out["labels"] = torch.tensor([f["labels"] for f in features])
        return out

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (24,), generator=g).tolist()
    features = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist()} for n in lengths]
    data = C.Encoded(features, torch.tensor([n % 2 for n in lengths]), collate)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    model = C.build(
        "osora", BertForSequenceClassification(config), ["classifier"], C.MethodSpec("osora", 8, 4)
    )
    args = C.training_arguments(1e-2, 1.0, 8, use_cpu=DEVICE == "cpu", disable_tqdm=True)
    result = C.train(model, data, args)
    assert result.steps == 3 and len(result.losses) == 3 and all(map(math.isfinite, result.losses))
    assert next(model.parameters()).device.type == DEVICE
    logits = C.predict(model, data)
    assert logits.shape == (24, 2) and logits.device.type == "cpu" and torch.isfinite(logits).all()
