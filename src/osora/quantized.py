"""Quantized base layers: what OSoRA needs beyond peft's quantization backends (bitsandbytes on the CPU).

peft's backends (``peft.utils.quantization_utils``) dequantize a base weight for the SVD and quantize W + ΔW again
for a merge. bitsandbytes' CPU inference kernel for 4-bit weights (CPUs with AVX512-BF16) repacks a layer's
weight into its own layout on the first eval-mode forward; dequantizing or requantizing that repacked tensor gives
a wrong matrix. :func:`standard_layout` packs it back first (bitsandbytes repacks on the next eval forward).
"""

from __future__ import annotations

from torch import nn


def standard_layout(base_layer: nn.Module) -> None:
    """Put a bitsandbytes 4-bit weight that its CPU kernel repacked back into the standard layout, in place."""
    weight = getattr(base_layer, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if weight is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)  # type: ignore[arg-type]
