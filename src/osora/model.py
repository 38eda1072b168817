"""OSoRAModel: injects OSoRA layers into a model (peft's BaseTuner)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .checkpoint import (
    CHECKSUM_KEY,
    AdapterFileError,
    fingerprint_matches,
    tensors_checksum,
    weight_fingerprint,
)
from .config import OSoRAConfig, default_target_modules
from .distributed import gathered_parameters, is_partitioned
from .factors import compute_factors
from .layer import Linear, OSoRALayer
from .svd import SVDFactors

_FACTOR_NAMES = ("osora_U", "osora_Vh", "osora_sigma")
#: Show a progress bar (one step per shape) while factors are computed for at least this many matrices.
PROGRESS_MIN_MATRICES = 16


def _adapter_names_hook(
    module: nn.Module, args: Any, kwargs: dict[str, Any], adapter_names: list[str]
) -> Any:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class OSoRAModel(BaseTuner):
    """Adds OSoRA adapters to the targeted linear layers of a model.

    Use it through peft after ``import osora``; see :class:`osora.OSoRAConfig`.

    Example:
        >>> import osora
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, osora.OSoRAConfig(r=32))  # doctest: +SKIP
        >>> model.print_trainable_parameters()  # doctest: +SKIP
    """

    prefix: str = "osora_"
    tuner_layer_cls = OSoRALayer

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict[str, Any]) -> PeftConfig:
        """Fill ``target_modules=None`` with :func:`osora.config.default_target_modules` for the architecture."""
        config = cast(OSoRAConfig, peft_config)
        if config.target_modules is None:
            targets = default_target_modules(model_config.get("model_type"))
            config.target_modules = targets if isinstance(targets, str) else set(targets)  # type: ignore[assignment]
        return config

    def inject_adapter(  # type: ignore[override]
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """peft's injection, checked first, with every factor computed up front, and undone if it fails.

        A compact adapter file is checked against the base's fingerprints before any SVD runs. peft creates the
        layers one by one (``_create_and_replace``); decomposing each weight there would be one small SVD at a
        time. So the weights that need fresh factors are found first with peft's own matching, decomposed together
        (:func:`osora.factors.compute_factors`, one call per shape, split across ranks under torch.distributed),
        and handed to the layers as they are created. A layer not covered here computes its own, with the same
        result. If anything fails, the user's model is restored: it is never left half-adapted. Called for
        ``get_peft_model``, ``add_adapter`` and ``load_adapter`` alike.
        """
        config = cast(OSoRAConfig, self.peft_config[adapter_name])
        from_file = getattr(config, "_checkpoint", None) is not None
        _check_fingerprints_before_svd(model, config, adapter_name)
        try:
            self._prefetched = self._batched_factors(model, adapter_name, state_dict)
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except Exception as error:
            _restore_modules(model, adapter_name)
            if (
                from_file
                and isinstance(error, (RuntimeError, ValueError))
                and not isinstance(error, AdapterFileError)
            ):
                raise AdapterFileError(
                    f"OSoRA adapter '{adapter_name}' does not fit this model ({error}); load it onto the base model "
                    "and with the config it was saved with"
                ) from error
            raise
        finally:
            self._prefetched = {}
        # injected to load a file: undone if the file is then refused (_remap_adapter_state_dict_for_load)
        config._injected_from_file = from_file  # type: ignore[attr-defined]
        config._checkpoint = None  # the saved factors are in the layers now; drop the file's copy

    def _batched_factors(
        self, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor] | None
    ) -> dict[str, tuple[SVDFactors, torch.Tensor]]:
        """Factors and fingerprint of every weight this injection will adapt that needs fresh ones, by module key.

        Left out (the layer deals with them): weights shared with an existing adapter of equal r and spec,
        factors in the adapter file being loaded, ZeRO-3 partitioned, quantized or unsupported modules.
        """
        config = cast(OSoRAConfig, self.peft_config[adapter_name])
        config = cast(OSoRAConfig, self._prepare_adapter_config(config, self.get_model_config(model)))
        config = cast(OSoRAConfig, _maybe_include_all_linear_layers(config, model))
        from_file = None
        if state_dict is not None:
            from_file = {k.rsplit("." + self.prefix, 1)[0].removeprefix("_orig_mod.") for k in state_dict}
        groups: dict[tuple[int, tuple[int, int]], list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        inner: list[str] = []  # modules inside existing OSoRA layers: peft's injection skips them too
        for key, module in model.named_modules():
            key = key.removeprefix("_orig_mod.")
            if not key or any(key.startswith(prefix) for prefix in inner):
                continue
            if isinstance(module, OSoRALayer):
                inner.append(key + ".")
            matched = (
                key in from_file if from_file is not None else self._check_target_module_exists(config, key)
            )
            if not matched or self._saved_factors(config, key) is not None:
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, (nn.Linear, Conv1D)) or getattr(module, "merged", False):
                continue
            stored = base.weight
            if not stored.is_floating_point() or is_partitioned(stored) or stored.device.type == "meta":
                continue
            shape = (stored.shape[1], stored.shape[0]) if isinstance(base, Conv1D) else tuple(stored.shape)
            r = min(config.r, *shape)
            if isinstance(module, OSoRALayer) and module.shared_factors((r, config.svd_spec)) is not None:
                continue
            dense = stored.T if isinstance(base, Conv1D) else stored  # (d_out, d_in)
            groups.setdefault((r, (shape[0], shape[1])), []).append((key, dense.detach(), stored.detach()))
        found: dict[str, tuple[SVDFactors, torch.Tensor]] = {}
        total = sum(len(g) for g in groups.values())
        progress = tqdm(
            total=total,
            desc=f"OSoRA factors ({adapter_name})",
            unit="matrix",
            leave=False,
            disable=total < PROGRESS_MIN_MATRICES,
        )
        with progress:
            for (r, _), members in groups.items():
                keys, dense, stored = zip(*members)
                fingerprints = [weight_fingerprint(w).to(w.device) for w in stored]
                factors = compute_factors(
                    dense, r, config.svd_spec, config.factor_cache_dir, fingerprints, names=keys
                )
                found.update(zip(keys, zip(factors, fingerprints)))
                progress.update(len(members))
        return found

    def _create_and_replace(  # type: ignore[override]
        self,
        peft_config: OSoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        saved = self._saved_factors(peft_config, current_key)
        factors = getattr(self, "_prefetched", {}).get(current_key)
        if isinstance(target, OSoRALayer):
            if target.merged:
                raise ValueError(
                    f"cannot add adapter '{adapter_name}' to '{current_key}' while adapters are merged into it; "
                    "unmerge first (its SVD must be of the original weight)"
                )
            target.update_layer(
                adapter_name, peft_config, module_name=current_key, saved=saved, factors=factors
            )
        else:
            new_module = self._create_new_module(
                peft_config, adapter_name, target, current_key, saved, factors
            )
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added adapter is not automatically trainable
            self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _saved_factors(config: OSoRAConfig, key: str) -> dict[str, torch.Tensor] | None:
        checkpoint = getattr(config, "_checkpoint", None)
        if not checkpoint:
            return None
        names = {n: f"base_model.model.{key}.{n}" for n in _FACTOR_NAMES}
        if not all(k in checkpoint for k in names.values()):
            return None
        return {n: checkpoint[k] for n, k in names.items()}

    @staticmethod
    def _create_new_module(
        config: OSoRAConfig,
        adapter_name: str,
        target: nn.Module,
        current_key: str = "",
        saved: dict[str, torch.Tensor] | None = None,
        factors: tuple[SVDFactors, torch.Tensor] | None = None,
    ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Conv1D):
            if not config.fan_in_fan_out:
                config.fan_in_fan_out = True  # Conv1D stores (d_in, d_out)
        elif isinstance(base, nn.Linear):
            if config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out=True but the target is torch.nn.Linear; using False", stacklevel=2
                )
                config.fan_in_fan_out = False
        else:
            raise TypeError(
                f"OSoRA cannot adapt module '{current_key}' of type {type(base).__name__}: only torch.nn.Linear and "
                "transformers' Conv1D are supported. Change target_modules so that it does not match it."
            )
        return Linear(target, adapter_name, config, module_name=current_key, saved=saved, factors=factors)

    # -- mixed batches ------------------------------------------------------------------------------------------

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Route ``adapter_names=[...]`` (one per row, "__base__" for none) to every OSoRA layer."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names cannot be passed while the model is in training mode")
        known = {n for m in self.modules() if isinstance(m, OSoRALayer) for n in m.osora_S}
        unknown = {n for n in adapter_names if n != "__base__"} - known
        if unknown:
            raise ValueError(f"adapter_names names adapters that do not exist: {sorted(unknown)}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [n for n in adapter_names for _ in range(num_beams)]
        handles = [
            module.register_forward_pre_hook(
                partial(_adapter_names_hook, adapter_names=adapter_names), with_kwargs=True
            )
            for module in self.modules()
            if isinstance(module, (OSoRALayer, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- saving and loading -------------------------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors plus their checksum; a diverged (non-finite) S or O is refused, not saved."""
        selected = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        for key, tensor in selected.items():
            if (".osora_S." in key or ".osora_O." in key) and not torch.isfinite(tensor).all():
                module = key.rsplit(".osora_", 1)[0].removeprefix("base_model.model.")
                raise AdapterFileError(
                    f"refusing to save OSoRA adapter '{adapter_name}': {key.rsplit('.', 2)[-2]} of '{module}' holds "
                    "non-finite values (training diverged); lower the learning rate or resume from an earlier "
                    "checkpoint"
                )
        as_saved = {cls._remove_adapter_name_from_key(k, adapter_name): v for k, v in selected.items()}
        selected[CHECKSUM_KEY] = tensors_checksum(as_saved)
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Check each saved base-weight fingerprint against the base this adapter is loaded onto.

        Compact adapters recompute their factors from the base, so a different base is refused. Adapters that
        carry their factors still load (ΔW is exact), with a warning.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        remapped.pop(
            CHECKSUM_KEY, None
        )  # verified when the file was read (osora.checkpoint.read_adapter_file)
        injected_by_this_load = getattr(config, "_injected_from_file", False)
        config._injected_from_file = False  # type: ignore[attr-defined]
        try:
            return cls._check_loaded_state(model, config, adapter_name, remapped)
        except AdapterFileError:
            if injected_by_this_load:  # a refused load leaves the user's model as it was
                _remove_failed_adapter(model, adapter_name)
            raise

    @classmethod
    def _check_loaded_state(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, remapped: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        fp_suffix = f".osora_fingerprint.{adapter_name}"
        own = model.state_dict()
        for key, tensor in remapped.items():
            current = own.get(key)
            if current is not None and current.shape != tensor.shape and not key.endswith(fp_suffix):
                raise AdapterFileError(
                    f"OSoRA adapter '{adapter_name}' does not fit this model: {key} has shape "
                    f"{tuple(tensor.shape)} in the file but {tuple(current.shape)} here (different model or r)"
                )
        save_factors = cast(OSoRAConfig, config).save_factors
        layers = {name: m for name, m in model.named_modules() if isinstance(m, OSoRALayer)}
        checked = 0
        for key, saved_fp in remapped.items():
            if not key.endswith(fp_suffix):
                continue
            name = key.removesuffix(fp_suffix)
            layer = layers.get(name)
            if layer is None or adapter_name not in layer.osora_fingerprint:
                continue
            checked += 1
            if _layer_matches(layer, adapter_name, saved_fp):
                continue
            module = name.removeprefix("base_model.model.")
            msg = (
                f"the base weight of '{module}' differs from the one adapter '{adapter_name}' was trained on "
                "(fingerprint mismatch: different model, revision, dtype or modified weights)"
            )
            if not save_factors:
                raise AdapterFileError(f"refusing to load a compact OSoRA adapter: {msg}")
            warnings.warn(f"OSoRA: {msg}; its saved factors are used, so ΔW is exact", stacklevel=2)
        expected = sum(adapter_name in m.osora_S for m in layers.values())
        if not save_factors and checked < expected:
            raise AdapterFileError(
                f"compact OSoRA adapter '{adapter_name}' has fingerprints for {checked} of {expected} adapted "
                "matrices; the file is incomplete or was saved from a different model"
            )
        if not save_factors:
            _check_recomputed_sigma(layers, remapped, adapter_name)
        return remapped


def _layer_matches(layer: OSoRALayer, adapter_name: str, saved: torch.Tensor) -> bool:
    """Whether the fingerprint ``saved`` for ``layer`` (either algorithm) is that of the layer's base weight.

    A file from before XXH3 fingerprints carries SHA-256 ones: the base weight is hashed again with it, and the
    layer takes the saved fingerprint, so the file's entry loads into a buffer of its own size.
    """
    own = layer.osora_fingerprint[adapter_name]
    if own.numel() == saved.numel():
        return torch.equal(own.cpu(), saved.cpu())
    weight = layer.stored_weight()
    with gathered_parameters(weight):
        same = fingerprint_matches(saved, weight)
    layer.osora_fingerprint.set(adapter_name, saved.to(own.device), persistent=True)
    return same


#: Largest relative difference between a compact adapter's recomputed σ and the σ it was trained with that counts
#: as the same factors (recomputation on the same software is bit-identical; another BLAS can differ by ~1e-7).
SIGMA_CHECK_TOLERANCE = 1e-5


def _check_recomputed_sigma(
    layers: dict[str, OSoRALayer], remapped: dict[str, torch.Tensor], adapter_name: str
) -> None:
    """Warn when the factors a compact adapter recomputed on load are not those it was trained with.

    Compact files carry no factors, only σ as trained with (``osora_trained_sigma``). A difference means that
    another osora version (a changed SVD), SVD backend or device computed the factors: the adapter still loads,
    and its outputs differ slightly. Files saved before σ was stored are not checked: their entries are filled in
    with the recomputed σ (so peft reports no missing keys).
    """
    suffix = f".osora_trained_sigma.{adapter_name}"
    for name, own in layers.items():
        if adapter_name in own.osora_trained_sigma and name + suffix not in remapped:
            remapped[name + suffix] = own.osora_trained_sigma[adapter_name]
    worst, where, differing, compared = 0.0, "", 0, 0
    for key, trained in remapped.items():
        layer = layers.get(key.removesuffix(suffix)) if key.endswith(suffix) else None
        if layer is None or adapter_name not in layer.osora_sigma:
            continue
        now, before = layer.osora_sigma[adapter_name].float().cpu(), trained.float().cpu()
        compared += 1
        gap = float(((now - before).abs() / before.abs().clamp_min(torch.finfo(torch.float32).tiny)).max())
        if gap > SIGMA_CHECK_TOLERANCE:
            differing += 1
            if gap > worst:
                worst, where = gap, key.removesuffix(suffix).removeprefix("base_model.model.")
    if differing:
        warnings.warn(
            f"OSoRA: the factors recomputed for compact adapter '{adapter_name}' differ from those it was trained "
            f"with in {differing} of {compared} matrices (largest relative σ difference {worst:.1e}, at '{where}'): "
            "another osora version, SVD backend or device computed them. The adapter's outputs differ slightly "
            "from the trained model's; save adapters with save_factors=True to carry the exact factors.",
            stacklevel=3,
        )


def _check_fingerprints_before_svd(model: nn.Module, config: OSoRAConfig, adapter_name: str) -> None:
    """Refuse a compact adapter loaded onto a base other than its own before any SVD runs.

    Compact files recompute their factors from the base weights, so a different base would cost a full SVD (minutes
    on a large model) only to be refused afterwards; the fingerprints are compared first. Nothing is modified.
    """
    checkpoint = getattr(config, "_checkpoint", None)
    if not checkpoint or config.save_factors:
        return
    modules = dict(model.named_modules())
    suffix = ".osora_fingerprint"
    for key, saved in checkpoint.items():
        if not key.endswith(suffix):
            continue
        name = key.removesuffix(suffix).removeprefix("base_model.model.")
        module = modules.get(name)
        if module is None:
            continue  # a missing matrix is counted once the adapter is loaded
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        weight = getattr(base, "weight", None)
        if (
            not isinstance(weight, torch.Tensor) or weight.numel() == 0
        ):  # e.g. ZeRO-3 partitioned: checked later
            continue
        if not fingerprint_matches(saved, weight):
            raise AdapterFileError(
                f"refusing to load a compact OSoRA adapter: the base weight of '{name}' differs from the one adapter "
                f"'{adapter_name}' was trained on (fingerprint mismatch: different model, revision, dtype or "
                "modified weights); load it onto its own base model"
            )


def _restore_modules(model: nn.Module, adapter_name: str) -> None:
    """Take ``adapter_name`` out of every OSoRA layer of ``model``; a layer left with no adapter becomes its base."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, OSoRALayer):
            continue
        adapters = set(module.factor_key) | set(module.osora_S)
        if adapter_name not in adapters:
            continue
        if adapters == {adapter_name}:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
        else:
            module.delete_adapter(adapter_name)


def _remove_failed_adapter(model: nn.Module, adapter_name: str) -> None:
    """Undo the injection of ``adapter_name`` after a refused load: the base model gets its own modules back."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, OSoRAModel) or adapter_name not in tuner.peft_config:
        return
    if len(tuner.peft_config) > 1:
        if hasattr(model, "delete_adapter"):
            model.delete_adapter(adapter_name)  # type: ignore[operator]
        return
    base = tuner.unload()  # puts every original module back in place
    if getattr(base, "peft_config", None) is tuner.peft_config:
        del base.peft_config
