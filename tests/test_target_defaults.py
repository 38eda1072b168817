"""``OSoRAConfig()`` with no target_modules on every architecture family: the defaults, and identity at init.

Each model is tiny and built from its config. The reference is the dense base model's own output, computed before
the adapter is injected (on a deep copy), so identity is checked against an independent forward pass.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
import transformers as tf
from peft import get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

import osora
from osora.config import DEFAULT_TARGET_MODULES, default_target_modules

VOCAB = 96
_DECODER = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
_LLAMA_LIKE = dict(_DECODER, hidden_size=32, intermediate_size=48, num_key_value_heads=2)


def _llama_like(config_cls: type, model_cls: type, **extra: object) -> Callable[[], nn.Module]:
    return lambda: model_cls(config_cls(**_LLAMA_LIKE, **extra))


#: model_type -> builder of a tiny model of that family
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    # osora's own defaults (DEFAULT_TARGET_MODULES)
    "llama": _llama_like(tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": _llama_like(tf.MistralConfig, tf.MistralForCausalLM),
    "qwen2": _llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": _llama_like(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=8),
    "gemma": _llama_like(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=8),
    "gemma2": _llama_like(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=8),
    "phi3": _llama_like(tf.Phi3Config, tf.Phi3ForCausalLM, pad_token_id=0),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB)),
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**_LLAMA_LIKE, num_labels=3)),
    "roberta": lambda: tf.RobertaForSequenceClassification(
        tf.RobertaConfig(**dict(_LLAMA_LIKE, max_position_embeddings=80), num_labels=3, pad_token_id=1)
    ),
    # peft's LoRA defaults
    "opt": lambda: tf.OPTForCausalLM(
        tf.OPTConfig(**_DECODER, hidden_size=32, ffn_dim=48, word_embed_proj_dim=32, pad_token_id=1)
    ),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(**_DECODER, hidden_size=32, intermediate_size=48)
    ),
    "falcon": lambda: tf.FalconForCausalLM(
        tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    ),
    "bloom": lambda: tf.BloomForCausalLM(
        tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB)
    ),
    "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**_DECODER, hidden_size=32, intermediate_size=48)),
    "mixtral": _llama_like(
        tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=2, num_experts_per_tok=1
    ),
    "t5": lambda: tf.T5ForConditionalGeneration(
        tf.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
    ),
    # in neither mapping: every linear layer but the output head
    "starcoder2": _llama_like(tf.Starcoder2Config, tf.Starcoder2ForCausalLM),
}


def _forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(input_ids=ids).logits


def _expected_targets(base: nn.Module, model_type: str) -> set[str]:
    """The module names the default should adapt, worked out here from the two mappings (suffix match)."""
    targets = DEFAULT_TARGET_MODULES.get(
        model_type, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    )
    names = set()
    for name, module in base.named_modules():
        if targets is None:  # all-linear: every nn.Linear except the output head
            hit = isinstance(module, nn.Linear) and module is not base.get_output_embeddings()
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            names.add(name)
    return names


def test_the_architectures_under_test_cover_the_three_sources() -> None:
    assert set(DEFAULT_TARGET_MODULES) <= set(BUILDERS)
    assert {"opt", "gpt_neox", "falcon", "bloom", "phi", "mixtral", "t5"} <= set(
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    )
    assert default_target_modules("starcoder2") == "all-linear"
    assert default_target_modules("opt") == ["q_proj", "v_proj"]
    assert default_target_modules("llama") == DEFAULT_TARGET_MODULES["llama"]


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_default_targets_and_identity_at_init(model_type: str) -> None:
    torch.manual_seed(0)
    base = BUILDERS[model_type]().eval()
    assert base.config.model_type == model_type
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    reference = _forward(base, ids)
    expected = _expected_targets(base, model_type)
    assert expected, "the default must match at least one module"

    model = get_peft_model(copy.deepcopy(base), osora.OSoRAConfig(r=4)).eval()

    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, osora.OSoRALayer)
    }
    assert adapted == expected
    torch.testing.assert_close(_forward(model, ids), reference, rtol=1e-5, atol=1e-5)
    # and the adapter is live: perturbing S moves the output
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, osora.OSoRALayer):
                layer.osora_S["default"].mul_(1.5)
    moved = (_forward(model, ids) - reference).abs().max()
    assert moved > 1e-3 * reference.abs().max()


def test_a_model_without_linear_layers_is_refused_clearly() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(model, osora.OSoRAConfig())
