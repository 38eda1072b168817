"""Shared fixtures: tiny models built from configs (no downloads), one per supported architecture family.

Markers (declared in pyproject.toml):
    slow         longer than a few seconds on 2 CPU cores; deselected by default, run with ``-m slow``.
    gpu          needs a CUDA device; deselected by default, run with ``-m gpu`` on a GPU machine.
    integration  spawns subprocesses or runs a whole application end to end (kept in the default run when fast).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny randomly initialised model of the given family, in eval mode."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        )
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
        model = GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = BertConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            num_labels=3,
        )
        model = BertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def tiny_inputs(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


ARCHS = ["llama", "qwen2", "gpt2", "bert"]


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


class StopAfterCheckpoint(TrainerCallback):
    """Simulates an interruption of ``osora train``: training stops right after the checkpoint of ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            control.should_training_stop = True
        return control
