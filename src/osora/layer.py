"""OSoRALayer: a tuner layer that adds the OSoRA branch ΔW x to a frozen linear layer."""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from . import functional as OF
from .checkpoint import weight_fingerprint
from .config import OSoRAConfig
from .distributed import gathered_parameters
from .factors import compute_factors
from .quantized import dequantized_4bit, restore_layout, unpacked_4bit
from .svd import SVDFactors, SVDSpec


class FactorDict(BufferDict):
    """A BufferDict whose entries keep the persistence they were registered with when they are replaced.

    Compact adapters (``save_factors=False``) keep their factors out of the state dict, per adapter.
    """

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        persistent = key not in self._non_persistent_buffers_set if key in self._buffers else self.persistent
        self.register_buffer(key, buffer, persistent=persistent)

    def set(self, key: str, buffer: torch.Tensor, persistent: bool) -> None:
        self._non_persistent_buffers_set.discard(key)
        self.register_buffer(key, buffer, persistent=persistent)


class OSoRALayer(BaseTunerLayer):
    """Holds, per adapter, the frozen factors U, Vᵀ, σ and the trainable vectors S and O of one weight."""

    adapter_layer_names = ("osora_S", "osora_O")
    other_param_names = (
        "osora_U",
        "osora_Vh",
        "osora_sigma",
        "osora_fingerprint",
        "osora_trained_sigma",
        "osora_dropout",
        "o_dim",
        "s_parametrization",
        "factor_key",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.o_dim: dict[str, OF.ODim] = {}
        self.s_parametrization: dict[str, OF.SParametrization] = {}
        self.factor_key: dict[
            str, tuple[int, SVDSpec]
        ] = {}  # (r, spec) the adapter's factors were computed with
        self.osora_dropout = nn.ModuleDict({})
        self.osora_S = nn.ParameterDict({})
        self.osora_O = nn.ParameterDict({})
        self.osora_U = FactorDict({}, persistent=True)
        self.osora_Vh = FactorDict({}, persistent=True)
        self.osora_sigma = FactorDict({}, persistent=True)
        self.osora_fingerprint = FactorDict({}, persistent=True)
        # compact adapters only: σ as trained with, checked against the recomputed σ when the file is loaded
        self.osora_trained_sigma = FactorDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        self.in_features: int = in_features  # type: ignore[assignment]
        self.out_features: int = out_features  # type: ignore[assignment]
        self.kwargs = kwargs

    # -- construction -------------------------------------------------------------------------------------------

    fan_in_fan_out: bool = False  # set per instance: the weight is stored (d_in, d_out), as in Conv1D

    def stored_weight(self) -> torch.Tensor:
        """The base layer's weight tensor as stored (quantized, Conv1D-transposed or plain)."""
        unpacked = unpacked_4bit(self.get_base_layer())  # the standard layout, whatever the CPU kernel did
        return unpacked[0] if unpacked is not None else cast(torch.Tensor, self.get_base_layer().weight)

    def get_base_weight(self) -> torch.Tensor:
        """The base weight, dequantized by peft's quantization backend when the base layer is quantized."""
        dense = dequantized_4bit(self.get_base_layer())
        return dense if dense is not None else super().get_base_weight()

    def set_base_weight(self, weight_data: torch.Tensor) -> None:
        """Store ``weight_data`` as the base weight, quantized again by peft's backend when the base is quantized."""
        restore_layout(self.get_base_layer())
        super().set_base_weight(weight_data)

    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a (d_out, d_in) matrix (dequantized, untransposed for Conv1D)."""
        weight = self.get_base_weight()
        return weight.T if self.fan_in_fan_out else weight

    def update_layer(
        self,
        adapter_name: str,
        config: OSoRAConfig,
        module_name: str = "",
        saved: dict[str, torch.Tensor] | None = None,
        inference_mode: bool = False,
        factors: tuple[SVDFactors, torch.Tensor] | None = None,
    ) -> None:
        """Add adapter ``adapter_name``: take (or reuse, or compute) the factors and create S, O.

        Args:
            adapter_name: Name of the adapter.
            config: Its configuration.
            module_name: The module's path in the model, for messages.
            saved: Tensors from the adapter file being loaded (keys osora_U, osora_Vh, osora_sigma), if any.
            inference_mode: Freeze the new adapter.
            factors: The factors of this weight and its fingerprint, computed with every other targeted weight by
                :class:`osora.OSoRAModel` (one batched SVD per shape); computed here when None.
        """
        weight = self.dense_base_weight()
        where = f"module '{module_name}'" if module_name else f"a {type(self.get_base_layer()).__name__}"
        if not weight.is_floating_point():
            raise TypeError(f"OSoRA needs a floating-point weight, but {where} has dtype {weight.dtype}")
        max_r = min(self.in_features, self.out_features)
        r = min(config.r, max_r)
        if r < config.r:
            warnings.warn(
                f"OSoRA: r={config.r} > min(d_in, d_out)={max_r} for {where}; using r={r}", stacklevel=2
            )
        # factors depend on r and the SVD spec only: adapters that agree on both share one copy
        key = (r, config.svd_spec)
        found, fingerprint = factors or self._find_factors(key, saved, config.factor_cache_dir)
        self.o_dim[adapter_name] = config.o_dim
        self.s_parametrization[adapter_name] = config.s_parametrization
        self.factor_key[adapter_name] = key
        self.osora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.osora_U.set(adapter_name, found.U, persistent=config.save_factors)
        self.osora_Vh.set(adapter_name, found.Vh, persistent=config.save_factors)
        self.osora_sigma.set(adapter_name, found.sigma, persistent=config.save_factors)
        self.osora_fingerprint.set(adapter_name, fingerprint, persistent=True)
        if not config.save_factors:
            self.osora_trained_sigma.set(adapter_name, found.sigma.clone(), persistent=True)
        o_size = self.out_features if config.o_dim == "output" else self.in_features
        self.osora_S[adapter_name] = nn.Parameter(torch.ones(r, device=weight.device))
        self.osora_O[adapter_name] = nn.Parameter(torch.ones(o_size, device=weight.device))
        # Cast factors (and S, O) to the base layer's device and dtype first, then initialise S from the *cast*
        # σ: S − σ is then exactly zero, whatever dtype S is later promoted to.
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.reset_osora_parameters(adapter_name, config.init_weights)
        frozen = {"both": (), "S": ("osora_O",), "O": ("osora_S",)}[config.trainable]
        if frozen:
            self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: frozen}
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def shared_factors(
        self, key: tuple[int, SVDSpec], saved: dict[str, torch.Tensor] | None = None
    ) -> tuple[SVDFactors, torch.Tensor] | None:
        """The factors (and fingerprint) of an adapter of this layer computed with ``key`` = (r, spec), if any
        (and equal to ``saved``, when given): adapters of equal r and spec share one copy of the frozen factors."""
        names = ("osora_U", "osora_sigma", "osora_Vh")
        for other, other_key in self.factor_key.items():
            if other_key == key:
                factors = SVDFactors(self.osora_U[other], self.osora_sigma[other], self.osora_Vh[other])
                shared = (factors.U, factors.sigma, factors.Vh)
                if saved is None or all(torch.equal(saved[n].to(t), t) for n, t in zip(names, shared)):
                    return factors, self.osora_fingerprint[other]
        return None

    def _find_factors(
        self, key: tuple[int, SVDSpec], saved: dict[str, torch.Tensor] | None, cache_dir: str | None = None
    ) -> tuple[SVDFactors, torch.Tensor]:
        """Factors for ``key``: shared with an adapter of equal r and spec, from the file being loaded, or fresh.

        Fresh factors come from :func:`osora.factors.compute_factors` (factor cache in ``cache_dir``; under
        torch.distributed one rank computes and broadcasts, so every rank holds identical factors). A ZeRO-3
        partitioned weight is gathered for the fingerprint and the decomposition.
        """
        shared = self.shared_factors(key, saved)
        if shared is not None:
            return shared
        base_weight = self.stored_weight()
        with gathered_parameters(base_weight):
            fingerprint = weight_fingerprint(base_weight).to(base_weight.device)
            if saved is not None:
                return SVDFactors(saved["osora_U"], saved["osora_sigma"], saved["osora_Vh"]), fingerprint
            r, spec = key
            (factors,) = compute_factors([self.dense_base_weight()], r, spec, cache_dir, [fingerprint])
        return factors, fingerprint

    def reset_osora_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """S = σ (or s = 1 when scaled) and O = 1; random values around them when ``init_weights`` is False."""
        with torch.no_grad():
            S, O = self.osora_S[adapter_name], self.osora_O[adapter_name]
            S.copy_(self.osora_sigma[adapter_name] if self.s_parametrization[adapter_name] == "raw" else 1.0)
            O.fill_(1.0)
            if not init_weights:
                S.mul_(1.0 + 0.3 * torch.randn_like(S))
                O.add_(0.3 * torch.randn_like(O))

    # -- merging ------------------------------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW of ``adapter`` in the base weight's layout and dtype."""
        sigma = self.osora_sigma[adapter]
        S = OF.effective_S(self.osora_S[adapter], sigma, self.s_parametrization[adapter])
        delta = OF.delta_weight(
            self.osora_U[adapter],
            self.osora_Vh[adapter],
            sigma,
            S,
            self.osora_O[adapter],
            self.o_dim[adapter],
        )
        delta = delta.T if self.fan_in_fan_out else delta
        stored = (
            self.stored_weight().dtype
        )  # a quantized weight is stored as integers: ΔW stays in the factors' dtype
        return delta.to(stored) if stored.is_floating_point else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ΔW of the active (or given) adapters into the base weight.

        Args:
            safe_merge: Merge into a copy first and raise if it holds non-finite values.
            adapter_names: Adapters to merge; default: the active ones.
        """
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.osora_S:
                continue
            if self.quantization_backend is not None:
                warnings.warn(
                    f"OSoRA: merging into a quantized ({self.quantization_backend.backend_name}) weight dequantizes "
                    "it, adds ΔW and quantizes the sum again; the rounding changes the outputs slightly and unmerge "
                    "does not restore the original quantized weight exactly",
                    stacklevel=2,
                )
            weight = self.get_base_weight()
            merged = weight.float() + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(  # peft's wording, as its other tuners raise it
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                )
            self.set_base_weight(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters' ΔW again, in reverse order."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.osora_S:
                weight = self.get_base_weight()
                self.set_base_weight((weight.float() - self.get_delta_weight(name).float()).to(weight.dtype))

    # -- forward ------------------------------------------------------------------------------------------------

    def osora_branch(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """ΔW x = B (A x) of one adapter, (..., d_out), in the factors' dtype (:func:`osora.functional.delta_forward`).

        With O on the output side, autograd keeps z = Vᵀx (r numbers per token) for backward, never x.
        """
        sigma = self.osora_sigma[adapter]
        S = OF.effective_S(self.osora_S[adapter], sigma, self.s_parametrization[adapter])
        x = self.osora_dropout[adapter](x)
        return OF.delta_forward(
            x,
            self.osora_U[adapter],
            self.osora_Vh[adapter],
            sigma,
            S,
            self.osora_O[adapter],
            self.o_dim[adapter],
        )

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True


class Linear(nn.Module, OSoRALayer):
    """OSoRA on a ``torch.nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out=True``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: OSoRAConfig,
        module_name: str = "",
        saved: dict[str, torch.Tensor] | None = None,
        factors: tuple[SVDFactors, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        OSoRALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name, saved=saved, factors=factors)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names: list[str] | None = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.osora_S:
                result = result + self.osora_branch(name, x).to(result.dtype)
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Row i of the batch goes through adapter ``adapter_names[i]`` ("__base__": none)."""
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged; unmerge first")
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"got {len(adapter_names)} adapter_names for a batch of {x.shape[0]} rows")
        result = self.base_layer(x, *args, **kwargs)
        for name in sorted(set(adapter_names)):
            if name not in self.osora_S:
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            delta = self.osora_branch(name, x.index_select(0, rows)).to(result.dtype)
            result = result.index_add(0, rows, delta)
        return result

    def __repr__(self) -> str:
        return "osora." + super().__repr__()
