"""Quantized base layers: what OSoRA needs beyond peft's quantization backends (bitsandbytes on the CPU).

peft's backends (``peft.utils.quantization_utils``) dequantize a base weight for the SVD and quantize W + ΔW again
for a merge. bitsandbytes' CPU inference kernel for 4-bit weights (CPUs with AVX512-BF16) repacks a layer's
weight into its own layout on the first eval-mode forward; dequantizing or requantizing that repacked tensor gives
a wrong matrix. :func:`unpacked_4bit` reads it back in the standard layout without touching the layer (bitsandbytes'
inverse restores the codes exactly and the block scales up to float rounding, ~1e-3 relative, so the layer keeps
its repacked weight and the base output stays exactly what it was).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def _is_repacked(weight: Any) -> bool:
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def unpacked_4bit(base_layer: nn.Module) -> tuple[torch.Tensor, Any] | None:
    """(codes, quant_state) of a repacked bitsandbytes 4-bit weight in the standard layout, as copies; else None."""
    weight = getattr(base_layer, "weight", None)
    if not _is_repacked(weight):
        return None
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    assert weight is not None
    return _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(weight.quant_state))


def dequantized_4bit(base_layer: nn.Module) -> torch.Tensor | None:
    """The dense weight of a repacked bitsandbytes 4-bit layer (the layer is left as it is); else None."""
    unpacked = unpacked_4bit(base_layer)
    if unpacked is None:
        return None
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(*unpacked)


def restore_layout(base_layer: nn.Module) -> None:
    """Put a repacked bitsandbytes 4-bit weight back into the standard layout in place (before it is replaced)."""
    unpacked = unpacked_4bit(base_layer)
    if unpacked is not None:
        weight = base_layer.weight
        weight.data, weight.quant_state = unpacked  # type: ignore[union-attr]
