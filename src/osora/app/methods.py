"""The fine-tuning methods the application knows, by name: one registry for ``osora train``, ``osora params``, the
demo and the benchmarks.

Each method is a PEFT config class and the fields it fixes (the ablations ``osora-S`` / ``osora-O`` fix
``trainable``, PiSSA fixes ``init_lora_weights``); everything else is passed to that class as given, so the class
validates it. ``head`` and ``full`` attach no adapter: ``head`` trains a classifier head only, ``full`` every
weight.

Example:
    >>> peft_config("osora-S", r=8, target_modules=["q_proj"], task_type="CAUSAL_LM").trainable
    'S'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["osora", "lora", "vera"]


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Args:
        name: Its name on the command line and in configs.
        summary: One line for help texts.
        family: The PEFT config class it builds (None: no adapter).
        fixed: Fields of that class the method sets.
        needs_head: Only for models with a new task head (sequence classification).
    """

    name: str
    summary: str
    family: Family | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    needs_head: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("osora", "OSoRA: S and O train (OSoRAConfig's defaults)", "osora"),
        Method("osora-S", "OSoRA, S only (the paper's ablation)", "osora", {"trainable": "S"}),
        Method("osora-O", "OSoRA, O only (the paper's ablation)", "osora", {"trainable": "O"}),
        Method("osora-scaled", "OSoRA training s with S = σ ⊙ s", "osora", {"s_parametrization": "scaled"}),
        Method("lora", "PEFT LoRA", "lora"),
        Method("pissa", "PEFT LoRA with PiSSA initialisation", "lora", {"init_lora_weights": "pissa"}),
        Method("dora", "PEFT DoRA", "lora", {"use_dora": True}),
        Method("vera", "PEFT VeRA", "vera"),
        Method("full", "full fine-tuning: every weight trains"),
        Method("head", "the classifier head only", needs_head=True),
    )
}

#: Names used before the registry was one; refused with the new name in the message.
RENAMED = {"osora_s": "osora-S", "osora_o": "osora-O"}

#: Each family's field for dropout on the adapter's input.
_DROPOUT_FIELD = {"osora": "dropout", "lora": "lora_dropout", "vera": "vera_dropout"}


def get_method(name: str) -> Method:
    """The method called ``name``; a ValueError naming the choices (or the new spelling) otherwise."""
    if name in METHODS:
        return METHODS[name]
    if name in RENAMED:
        raise ValueError(
            f"method '{name}' is now spelled '{RENAMED[name]}'; use --method.name={RENAMED[name]}"
        )
    raise ValueError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")


def config_class(family: Family) -> type:
    """The PEFT config class of ``family`` (importing osora registers OSoRA with peft)."""
    import peft

    import osora

    return {"osora": osora.OSoRAConfig, "lora": peft.LoraConfig, "vera": peft.VeraConfig}[family]


def peft_config(name: str, *, dropout: float | None = None, **fields: Any) -> Any:
    """The PEFT config of method ``name`` with ``fields`` (its class's own field names), or None for no adapter.

    Args:
        name: A key of :data:`METHODS`.
        dropout: Dropout on the adapter's input, under the family's field name (``lora_dropout``, ...).
        **fields: Passed to the config class as they are, e.g. ``r``, ``target_modules``, ``task_type``.
    """
    method = get_method(name)
    if method.family is None:
        return None
    values = {**fields, **method.fixed}
    if dropout is not None:
        values[_DROPOUT_FIELD[method.family]] = dropout
    return config_class(method.family)(**values)
