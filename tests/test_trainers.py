"""OSoRA under transformers' Trainer and TRL's SFTTrainer(peft_config=...), with a tokenizer built in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

import osora
from osora.layer import OSoRALayer

from conftest import VOCAB, tiny_model

WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def texts(n: int = 16) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, 20, (8,), generator=g)) for _ in range(n)]


def frozen_and_trained(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    frozen = {n: b.clone() for n, b in model.named_buffers() if "osora_" in n}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, trained


def assert_only_vectors_changed(model, frozen, trained) -> None:
    assert trained and all("osora_S" in n or "osora_O" in n for n in trained)
    for n, b in model.named_buffers():
        if n in frozen:
            assert torch.equal(b, frozen[n]), n
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


def test_transformers_trainer(tmp_path: Path) -> None:
    from peft import get_peft_model

    tok = tiny_tokenizer()
    enc = tok(texts(), padding=True)
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "labels": enc["input_ids"]})
    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4))
    frozen, trained = frozen_and_trained(model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    Trainer(model=model, args=args, train_dataset=ds).train()
    assert_only_vectors_changed(model, frozen, trained)


@pytest.mark.integration
def test_trl_sft_trainer_with_peft_config(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    tok = tiny_tokenizer()
    ds = Dataset.from_dict({"text": texts()})
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=16,
        dataset_text_field="text",
    )
    trainer = trl.SFTTrainer(
        model=tiny_model("llama"),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=osora.OSoRAConfig(r=4),
    )
    assert any(isinstance(m, OSoRALayer) for m in trainer.model.modules())
    frozen, trained = frozen_and_trained(trainer.model)
    trainer.train()
    assert_only_vectors_changed(trainer.model, frozen, trained)
    trainer.model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_torch_compile_matches_eager() -> None:
    from peft import get_peft_model

    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4, init_weights=False))
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="eager")(input_ids=ids).logits  # graph capture, no C++ build
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
