"""``osora generate ADAPTER_OR_MODEL "prompt"``: greedy text from a base model, an adapter or a merged model.

The model is anything ``osora eval`` takes: an adapter folder (its base is read from ``adapter_config.json``; the
adapter is merged into the weights before generating), a merged or exported folder, a ``.gguf`` file, a short
name such as ``smollm2-135m-instruct``, or a hub id. A prompt goes through the tokenizer's chat template where the
model has one (``--plain true`` sends it as it is). Generation stops at the end-of-sequence token, at ``--stop``
strings, or after ``--max_new_tokens``.

Example:
    osora generate osora-demo/adapters/osora "Write the date 3 May 1987 in the form YYYY-MM-DD."
    osora generate smollm2-135m-instruct "What is the capital of France?" --max_new_tokens 32
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from .cli import call
from .evaluate import generate, load_model, merged_for_inference


def chat_prompt(tokenizer: Any, prompt: str, plain: bool = False) -> tuple[str, bool]:
    """(text to tokenize, whether the tokenizer must add special tokens): the chat template where there is one."""
    if plain or not getattr(tokenizer, "chat_template", None):
        return prompt, True
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def main(argv: list[str]) -> int:
    return call(generate_text, "generate", argv)


def generate_text(
    model: str,
    prompts: str | list[str],
    base: str | None = None,
    max_new_tokens: int = 128,
    stop: list[str] = [],  # noqa: B006 (never modified)
    plain: bool = False,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
) -> int:
    """Generate from an adapter, a merged model or a base model (chat template where it has one).

    Args:
        model: Adapter folder, merged/base model folder, .gguf file, short name or hub id.
        prompts: A prompt, or a list of them ('["first", "second"]'), each answered separately.
        base: Base model of an adapter (default: from adapter_config.json).
        max_new_tokens: Generation length limit.
        stop: Strings that end a completion besides end of sequence (--stop+ STRING adds one).
        plain: Send the prompt as it is, without the chat template.
        dtype: Dtype the weights are loaded in.
    """
    prompts = [prompts] if isinstance(prompts, str) else prompts
    loaded, tokenizer = load_model(model, base, dtype)
    loaded = merged_for_inference(loaded)
    texts = [chat_prompt(tokenizer, p, plain) for p in prompts]
    completions = generate(
        loaded,
        tokenizer,
        [t for t, _ in texts],
        batch_size=len(texts),
        max_new_tokens=max_new_tokens,
        stop_strings=stop,
        add_special_tokens=texts[0][1],
        progress=False,
    )
    for prompt, completion in zip(prompts, completions):
        if len(prompts) > 1:
            print(f">>> {prompt}")
        print(completion.strip())
    sys.stdout.flush()
    return 0
