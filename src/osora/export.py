"""Exports of a trained OSoRA model: merged weights, a standard LoRA adapter, the paper's residual form.

None of them modifies the PEFT model: each builds new tensors from ΔW and the factors.

* merged:   W' = W + ΔW, saved as plain transformers weights.
* LoRA:     ΔW = B A with rank ≤ r, so any LoRA server (plain peft, vLLM, ...) serves an OSoRA adapter:
            output variant  B = O ⊙ U diag(S) − U diag(σ),  A = Vᵀ
            input variant   B = U,  A = diag(S) Vᵀ diag(O) − diag(σ) Vᵀ
* residual: the base W − U diag(σ) Vᵀ (transformers weights) plus a LoRA adapter B = O ⊙ U diag(S), A = Vᵀ
            (input variant: B = U, A = diag(S) Vᵀ diag(O)), the form the paper trains in.
LoRA adapters are written with lora_alpha = r per module, so peft's scaling α/r is 1 and B A is ΔW exactly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from transformers import PreTrainedModel

from . import functional as OF
from .checkpoint import atomic_directory, atomic_save_file
from .config import OSoRAConfig
from .layer import OSoRALayer


@dataclass(frozen=True)
class _Factors:
    """One adapted matrix in float32: U (d_out, r), Vh (r, d_in), sigma (r,), effective S (r,), O."""

    layer: OSoRALayer
    U: torch.Tensor
    Vh: torch.Tensor
    sigma: torch.Tensor
    S: torch.Tensor
    O: torch.Tensor
    o_dim: OF.ODim


def _adapted(peft_model: PeftModel, adapter_name: str, dense_weights: bool = False) -> dict[str, _Factors]:
    """Module name (relative to the base model) → float32 factors of ``adapter_name``.

    ``dense_weights``: the export writes base weights, which a quantized layer cannot give exactly (refused).
    """
    out = {}
    for name, layer in peft_model.get_base_model().named_modules():
        if isinstance(layer, OSoRALayer) and adapter_name in layer.osora_S:
            if layer.merged:
                raise ValueError(f"module '{name}' has merged adapters; unmerge before exporting")
            if dense_weights and layer.quantization_backend is not None:
                raise ValueError(
                    f"module '{name}' is quantized ({layer.quantization_backend.backend_name}): merged and residual "
                    "exports write full-precision weights, so load the base unquantized with this adapter to export "
                    "them, or export as LoRA, which loads onto the quantized base"
                )
            sigma = layer.osora_sigma[adapter_name].float()
            S = OF.effective_S(
                layer.osora_S[adapter_name].detach().float(), sigma, layer.s_parametrization[adapter_name]
            )
            out[name] = _Factors(
                layer,
                layer.osora_U[adapter_name].float(),
                layer.osora_Vh[adapter_name].float(),
                sigma,
                S,
                layer.osora_O[adapter_name].detach().float(),
                layer.o_dim[adapter_name],
            )
    if not out:
        raise ValueError(f"the model has no OSoRA adapter named '{adapter_name}'")
    return out


def _plain_state_dict(peft_model: PeftModel, adapter_name: str, weights: dict[str, torch.Tensor]) -> dict:
    """The base model's state dict with transformers' own keys, adapter tensors dropped, ``weights`` replaced.

    Modules trained in full (modules_to_save) contribute the copy of ``adapter_name``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_model.get_base_model().state_dict().items():
        if ".osora_" in key or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            if f".modules_to_save.{adapter_name}." not in key:
                continue
            key = key.replace(f".modules_to_save.{adapter_name}.", ".")
        out[key.replace(".base_layer.", ".")] = tensor
    for name, weight in weights.items():
        out[f"{name}.weight"] = weight
    return out


def _save_plain(
    peft_model: PeftModel, adapter_name: str, weights: dict[str, torch.Tensor], out_dir: Path
) -> None:
    state_dict = {
        k: v.detach().contiguous() for k, v in _plain_state_dict(peft_model, adapter_name, weights).items()
    }
    base = cast(PreTrainedModel, peft_model.get_base_model())
    base.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)


def _weight_layout(f: _Factors, dense: torch.Tensor) -> torch.Tensor:
    """A (d_out, d_in) matrix in the base weight's layout and dtype."""
    return (dense.T if f.layer.fan_in_fan_out else dense).to(f.layer.stored_weight().dtype)


def save_merged(
    peft_model: PeftModel,
    out_dir: str | os.PathLike[str],
    adapter_name: str = "default",
    safe_merge: bool = True,
) -> None:
    """Save W' = W + ΔW of ``adapter_name`` as plain transformers weights (the PEFT model is left as it is).

    Raises:
        ValueError: A merged weight holds NaN or inf (with ``safe_merge``).
    """
    weights = {}
    for name, f in _adapted(peft_model, adapter_name, dense_weights=True).items():
        merged = f.layer.dense_base_weight().float() + OF.delta_weight(f.U, f.Vh, f.sigma, f.S, f.O, f.o_dim)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(
                f"the merged weight of '{name}' holds NaN or inf; adapter '{adapter_name}' is broken"
            )
        weights[name] = _weight_layout(f, merged)
    with atomic_directory(out_dir) as tmp:
        _save_plain(peft_model, adapter_name, weights, tmp)


def lora_factors(f: _Factors, residual: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A = ΔW (or, with ``residual``, B A = diag(O) U diag(S) Vᵀ), float32."""
    sigma = torch.zeros_like(f.sigma) if residual else f.sigma
    return OF.low_rank_factors(f.U, f.Vh, sigma, f.S, f.O, f.o_dim)


def _save_lora(peft_model: PeftModel, adapter_name: str, out_dir: Path, residual: bool) -> None:
    config = cast(OSoRAConfig, peft_model.peft_config[adapter_name])
    factors = _adapted(peft_model, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    ranks = {}
    for name, f in factors.items():
        B, A = lora_factors(f, residual)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
        ranks[name] = A.shape[0]
    from peft import get_peft_model_state_dict

    for key, tensor in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items():
        if ".osora_" not in key:  # modules_to_save and trained biases carry over unchanged
            tensors[key] = tensor
    r = max(ranks.values())
    lora = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(factors),
        rank_pattern={re.escape(n): k for n, k in ranks.items() if k != r},  # clamped ranks
        alpha_pattern={re.escape(n): k for n, k in ranks.items() if k != r},
        fan_in_fan_out=config.fan_in_fan_out,
        bias="lora_only" if config.bias == "osora_only" else config.bias,
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        init_lora_weights=True,
    )
    lora.save_pretrained(str(out_dir))
    atomic_save_file(tensors, out_dir / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})


def save_as_lora(
    peft_model: PeftModel, out_dir: str | os.PathLike[str], adapter_name: str = "default"
) -> None:
    """Save ``adapter_name`` as a standard PEFT LoRA adapter for the untouched base (no osora needed to load it)."""
    with atomic_directory(out_dir) as tmp:
        _save_lora(peft_model, adapter_name, tmp, residual=False)


def save_residual(
    peft_model: PeftModel, out_dir: str | os.PathLike[str], adapter_name: str = "default"
) -> None:
    """Save the paper's form: ``out_dir/base`` holds W − U diag(σ) Vᵀ, ``out_dir/adapter`` a LoRA adapter for it.

    Loading ``adapter`` onto ``base`` with plain peft reproduces the OSoRA model.
    """
    weights = {
        name: _weight_layout(f, OF.residual_weight(f.layer.dense_base_weight(), f.U, f.Vh, f.sigma))
        for name, f in _adapted(peft_model, adapter_name, dense_weights=True).items()
    }
    with atomic_directory(out_dir) as tmp:
        _save_plain(peft_model, adapter_name, weights, tmp / "base")
        (tmp / "adapter").mkdir()
        _save_lora(peft_model, adapter_name, tmp / "adapter", residual=True)
