"""``osora merge`` and ``osora export``: the core library's exports (:mod:`osora.export`) on the command line.

    osora merge ADAPTER_DIR OUT_DIR [--base PATH] [--dtype DTYPE]
        W' = W + ΔW saved as plain transformers weights (loads with AutoModelForCausalLM, no osora needed).
    osora export ADAPTER_DIR OUT_DIR [--format lora|residual] [--base PATH] [--dtype DTYPE]
        lora:     a standard PEFT LoRA adapter for the untouched base (B A = ΔW).
        residual: the paper's form, OUT_DIR/base (W − U diag(σ) Vᵀ) plus OUT_DIR/adapter (a LoRA adapter).

The base model is read from the adapter's adapter_config.json unless ``--base`` is given. The tokenizer is
copied next to the weights so the result is self-contained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .checkpoints import require_osora_adapter
from .cli import call
from .evaluate import load_model

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def merge(adapter_dir: str, out_dir: str, base: str | None = None, dtype: Dtype = "auto") -> int:
    """Merge an OSoRA adapter into its base and save plain transformers weights (W' = W + ΔW).

    Args:
        adapter_dir: An OSoRA adapter directory (from osora train or save_pretrained).
        out_dir: Where to write the merged model.
        base: Base model path or hub id (default: from adapter_config.json).
        dtype: Dtype the base model is loaded in.
    """
    return _write("merge", adapter_dir, out_dir, base, dtype)


def export(
    adapter_dir: str,
    out_dir: str,
    format: Literal["lora", "residual"] = "lora",
    base: str | None = None,
    dtype: Dtype = "auto",
) -> int:
    """Export an OSoRA adapter as a PEFT LoRA adapter or the paper's residual form.

    Args:
        adapter_dir: An OSoRA adapter directory (from osora train or save_pretrained).
        out_dir: Where to write the export.
        format: lora (a PEFT LoRA adapter for the untouched base) or residual (OUT_DIR/base, OUT_DIR/adapter).
        base: Base model path or hub id (default: from adapter_config.json).
        dtype: Dtype the base model is loaded in.
    """
    return _write(format, adapter_dir, out_dir, base, dtype)


def _write(what: str, adapter_dir: str, out_dir: str, base: str | None, dtype: str) -> int:
    from osora import export as exports

    command = "merge" if what == "merge" else "export"
    require_osora_adapter(Path(adapter_dir), command)
    model, tokenizer = load_model(adapter_dir, base, dtype)  # an adapter: require_osora_adapter checked it
    out = Path(out_dir)
    write = {"merge": exports.save_merged, "lora": exports.save_as_lora, "residual": exports.save_residual}[
        what
    ]
    write(model, out)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(out / "base" if what == "residual" else out)
    print(f"osora {command}: wrote {out}")
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    return call(merge if command == "merge" else export, command, rest)
