"""OSoRA for PyTorch and the HuggingFace stack: ``import osora`` makes it a PEFT method.

W' = W − U_r diag(σ_r) V_rᵀ + diag(O) U_r diag(S) V_rᵀ; only S (r) and O (d_out) train. See
:mod:`osora.functional` for the equation and :class:`osora.OSoRAConfig` for the options.
"""

from . import _logging, registration  # noqa: F401 (_logging first: it acts before peft is imported)
from .checkpoint import AdapterFileError, save_adapter, weight_fingerprint
from .config import DEFAULT_TARGET_MODULES, OSoRAConfig, default_target_modules
from .layer import OSoRALayer
from .model import OSoRAModel
from .svd import SVDAccuracyWarning, SVDSpec


def register() -> None:
    """Register OSoRAConfig and OSoRAModel with peft (idempotent; ``import osora`` already did)."""
    registration.register(OSoRAConfig, OSoRAModel)


register()

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_TARGET_MODULES",
    "AdapterFileError",
    "OSoRAConfig",
    "OSoRALayer",
    "OSoRAModel",
    "SVDAccuracyWarning",
    "SVDSpec",
    "register",
    "save_adapter",
    "default_target_modules",
    "weight_fingerprint",
]
