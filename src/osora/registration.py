"""Make OSoRA a PEFT method: the only module that touches peft's registry internals. Imports nothing of osora.

peft's ``PeftType`` is a closed ``str`` Enum and ``register_peft_method`` refuses names that are not members, so
an out-of-tree method has to add its member first (:func:`osora_peft_type`, which the config needs), then
register its config and tuner classes (:func:`register`, called by ``osora/__init__.py``). Both steps are
idempotent. ``tests/test_registration.py`` checks the internals relied on here, so a peft release that changes
them fails loudly instead of silently.
"""

from __future__ import annotations

import enum

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType

PEFT_NAME = "osora"
PREFIX = "osora_"


def osora_peft_type() -> PeftType:
    """The ``PeftType.OSORA`` member, added to peft's enum on first use."""
    name = PEFT_NAME.upper()
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    # Enum lookups (PeftType.OSORA, PeftType("OSORA"), list(PeftType)) read these three tables.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    if not isinstance(PeftType(name), enum.Enum):  # pragma: no cover - guards a changed Enum implementation
        raise RuntimeError("could not add OSORA to peft.PeftType")
    return member


def register(config_cls: type[PeftConfig], model_cls: type[BaseTuner]) -> None:
    """Register ``config_cls`` and ``model_cls`` as peft's OSORA method (idempotent)."""
    peft_type = osora_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return
    register_peft_method(name=PEFT_NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
