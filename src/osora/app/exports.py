"""``osora merge`` and ``osora export``: the core library's exports (:mod:`osora.export`) on the command line.

    osora merge ADAPTER_DIR OUT_DIR [--base PATH]
        W' = W + ΔW saved as plain transformers weights (loads with AutoModelForCausalLM, no osora needed).
    osora export ADAPTER_DIR OUT_DIR --format lora|residual [--base PATH]
        lora:     a standard PEFT LoRA adapter for the untouched base (B A = ΔW).
        residual: the paper's form, OUT_DIR/base (W − U diag(σ) Vᵀ) plus OUT_DIR/adapter (a LoRA adapter).

The base model is read from the adapter's adapter_config.json unless ``--base`` is given. The tokenizer is
copied next to the weights so the result is self-contained.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoints import require_osora_adapter
from .evaluate import load_model


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"osora {command}", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "adapter_dir", help="an OSoRA adapter directory (from osora train or save_pretrained)"
    )
    parser.add_argument("out_dir", help="where to write the result")
    parser.add_argument(
        "--base", default=None, help="base model path or hub id (default: from adapter_config.json)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype the base model is loaded in",
    )
    if command == "export":
        parser.add_argument("--format", required=True, choices=["lora", "residual"], help="export format")
    return parser


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    args = _parser(command).parse_args(rest)
    from peft import PeftModel

    from osora import export

    require_osora_adapter(Path(args.adapter_dir), command)
    model, tokenizer = load_model(args.adapter_dir, args.base, args.dtype)
    if not isinstance(model, PeftModel):
        raise SystemExit(
            f"osora {command}: {args.adapter_dir} is not an adapter directory (no adapter_config.json)"
        )
    out = Path(args.out_dir)
    if command == "merge":
        export.save_merged(model, out)
        tokenizer_dir = out
    elif args.format == "lora":
        export.save_as_lora(model, out)
        tokenizer_dir = out
    else:
        export.save_residual(model, out)
        tokenizer_dir = out / "base"
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(tokenizer_dir)
    print(f"osora {command}: wrote {out}")
    return 0
