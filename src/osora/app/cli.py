"""``osora`` command line: ``osora <command> [args]``; each command lives in its own module."""

from __future__ import annotations

import importlib
import sys

#: command -> (module, one-line help). Each module exposes ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("osora.app.demo", "fine-tune MiniLM offline: head-only vs OSoRA vs LoRA vs VeRA, side by side"),
    "train": (
        "osora.app.train",
        "fine-tune a causal LM from a YAML config (osora, lora, vera, pissa, dora, full)",
    ),
    "eval": (
        "osora.app.evaluate",
        "score a base model, an adapter or a merged model on GSM8K, MATH, commonsense",
    ),
    "merge": (
        "osora.app.exports",
        "merge an OSoRA adapter into its base and save plain transformers weights",
    ),
    "export": (
        "osora.app.exports",
        "export an OSoRA adapter as a PEFT LoRA adapter or the paper's residual form",
    ),
    "params": (
        "osora.app.params",
        "trainable parameters vs rank for LoRA, VeRA and OSoRA (the paper's Figure 1)",
    ),
}


def _usage() -> str:
    lines = ["usage: osora <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"osora: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    if command in {"merge", "export"}:
        return int(module.main([command, *rest]) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
