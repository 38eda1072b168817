"""``osora`` command line: ``osora <command> [args]``; each command lives in its own module.

Every command takes one grammar, jsonargparse's: positional arguments, ``--key value`` (or ``--key=value``)
options named after the fields or parameters they set, ``--config FILE.yaml`` for any of them and ``--help``
listing them with types, defaults and help. ``osora train`` / ``osora eval`` parse the run schema
(:mod:`osora.app.config`); the other commands' options are their function's signature (:func:`call`).

A user's mistake (see :func:`user_errors`) is printed here, in one place, as ``osora COMMAND: problem; fix``
with exit code 2 and no traceback; ``--debug`` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

#: command -> (module, one-line help). Each module exposes ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "osora.app.demo",
        "fine-tune SmolLM2-135M-Instruct offline, OSoRA beside LoRA (--encoder: the MiniLM demo)",
    ),
    "generate": (
        "osora.app.generate",
        "generate from an adapter, a merged model or a base model (chat template where it has one)",
    ),
    "train": (
        "osora.app.train",
        "fine-tune a causal LM from a YAML config (osora, lora, vera, pissa, dora, full)",
    ),
    "eval": (
        "osora.app.evaluate",
        "score a base model, an adapter or a merged model on GSM8K, MATH, commonsense (--harness: lm-eval)",
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


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the user's input is wrong" (their message names the problem and the fix)."""
    from osora.checkpoint import AdapterFileError

    from .config import ConfigError
    from .data import DataError
    from .models import ModelLoadError, ModelNotFoundError

    return (ConfigError, DataError, ModelNotFoundError, ModelLoadError, AdapterFileError, FileNotFoundError)


def call(function: Callable[..., Any], command: str, argv: list[str], skip: set[str] | None = None) -> Any:
    """``function`` called with ARGV parsed against its signature (its docstring's ``Args:`` is the help), less
    the parameters in ``skip`` (left at their defaults).

    Raises:
        ConfigError: an argument that does not fit (printed by :func:`main`, exit 2).
    """
    parser = argument_parser(command, str(function.__doc__).split("\n\n")[0])
    parser.add_function_arguments(function, as_group=False, as_positional=True, skip=skip)
    arguments = parse_arguments(parser, argv).as_dict()
    arguments.pop("config", None)
    return function(**arguments)


def argument_parser(command: str, description: str) -> Any:
    """A jsonargparse parser for ``osora COMMAND`` (``--config FILE.yaml`` included) whose mistakes raise."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog=f"osora {command}", description=description, exit_on_error=False, allow_abbrev=False
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these arguments.")
    return parser


def parse_arguments(parser: Any, argv: list[str]) -> Any:
    """``parser``'s namespace of ARGV; a mistake is a :class:`~osora.app.config.ConfigError` (exit 2)."""
    from jsonargparse import ArgumentError

    from .config import ConfigError

    try:
        return parser.parse_args(argv)
    except ArgumentError as error:
        raise ConfigError(
            f"{' '.join(str(error).split())}; {parser.prog} --help lists the arguments"
        ) from error


def _message(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError) and error.filename is not None and error.strerror:
        return f"no such file or directory: {error.filename}"
    return str(error)


def _usage() -> str:
    lines = ["usage: osora <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "every command: osora COMMAND --help lists its arguments; --key VALUE options, --config FILE.yaml",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"osora: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # raised inside peft (it reads the base model's is_gradient_checkpointing, deprecated in transformers 5) by
    # every command that builds or loads an adapter: nothing the user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    harness = command == "eval" and any(a == "--harness" or a.startswith("--harness=") for a in rest)
    module = importlib.import_module("osora.app.harness" if harness else COMMANDS[command][0])
    args = [command, *rest] if command in {"merge", "export"} else rest
    try:
        return int(module.main(args) or 0)
    except user_errors() as error:
        if debug:
            raise
        print(f"osora {command}: {_message(error)}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one during it
        if debug:
            raise
        print(f"\nosora {command}: interrupted", file=sys.stderr)
        return 128 + 2  # as a shell reports SIGINT


if __name__ == "__main__":
    sys.exit(main())
