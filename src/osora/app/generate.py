"""``osora generate ADAPTER_OR_MODEL "prompt" [...]``: greedy text from a base model, an adapter or a merged model.

The model is anything ``osora eval`` takes: an adapter folder (its base is read from ``adapter_config.json``; the
adapter is merged into the weights before generating), a merged or exported folder, a ``.gguf`` file, a short
name such as ``smollm2-135m-instruct``, or a hub id. A prompt goes through the tokenizer's chat template where the
model has one (``--plain`` sends it as it is). Generation stops at the end-of-sequence token, at ``--stop``
strings, or after ``--max-new-tokens``.

Example:
    osora generate osora-demo/adapters/osora "Write the date 3 May 1987 in the form YYYY-MM-DD."
    osora generate smollm2-135m-instruct "What is the capital of France?" --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .evaluate import generate, load_model, merged_for_inference


def chat_prompt(tokenizer: Any, prompt: str, plain: bool = False) -> tuple[str, bool]:
    """(text to tokenize, whether the tokenizer must add special tokens): the chat template where there is one."""
    if plain or not getattr(tokenizer, "chat_template", None):
        return prompt, True
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="osora generate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="adapter folder, merged/base model folder, .gguf file, short name or hub id")
    p.add_argument("prompts", nargs="+", help="one or more prompts (each answered separately)")
    p.add_argument(
        "--base", default=None, help="base model of an adapter (default: from adapter_config.json)"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--plain", action="store_true", help="send the prompt as it is, without the chat template")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype"
    )
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    model, tokenizer = load_model(args.model, args.base, args.dtype)
    model = merged_for_inference(model)
    texts = [chat_prompt(tokenizer, p, args.plain) for p in args.prompts]
    special = texts[0][1]
    completions = generate(
        model,
        tokenizer,
        [t for t, _ in texts],
        batch_size=len(texts),
        max_new_tokens=args.max_new_tokens,
        stop_strings=args.stop,
        add_special_tokens=special,
        progress=False,
    )
    for prompt, completion in zip(args.prompts, completions):
        if len(args.prompts) > 1:
            print(f">>> {prompt}")
        print(completion.strip())
    sys.stdout.flush()
    return 0
