"""OSoRAConfig: the one schema for an OSoRA adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .checkpoint import read_adapter_file
from .functional import ODim, SParametrization
from .svd import InitMethod

Trainable = Literal["both", "S", "O"]
Bias = Literal["none", "all", "osora_only"]

_ALL_LINEAR_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Default targets per ``config.model_type``: every linear layer of the transformer blocks (the most adapted
#: setting; pass target_modules to narrow it). Encoders target their block's linears but not the pooler.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "llama": _ALL_LINEAR_LLAMA,
    "mistral": _ALL_LINEAR_LLAMA,
    "qwen2": _ALL_LINEAR_LLAMA,
    "qwen3": _ALL_LINEAR_LLAMA,
    "gemma": _ALL_LINEAR_LLAMA,
    "gemma2": _ALL_LINEAR_LLAMA,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "roberta": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
}


def _check_choice(name: str, value: object, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ValueError(f"OSoRAConfig.{name} must be one of {choices}, got {value!r}")


@dataclass
class OSoRAConfig(PeftConfig):
    """Configuration of an OSoRA adapter (https://arxiv.org/abs/2505.14350).

    Each targeted weight W gets W' = W − U diag(σ) Vᵀ + diag(O) U diag(S) Vᵀ from its own top-r SVD; only S (r)
    and O (d_out) train, so an adapted matrix costs r + d_out trainable numbers.

    Example:
        >>> import osora
        >>> from peft import get_peft_model
        >>> config = osora.OSoRAConfig(r=32, target_modules=["q_proj", "v_proj"])
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
    """

    r: int = field(
        default=8,
        metadata={
            "help": "Rank: number of singular triplets per matrix. Clamped to min(d_in, d_out) per matrix."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or one regex (full match) to adapt. None: the default for the "
            "architecture (DEFAULT_TARGET_MODULES). Only torch.nn.Linear and transformers' Conv1D are supported."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or a regex to leave out even if they match target_modules."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the blocks with these indices (needs a layer pattern)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Name of the nn.ModuleList holding the blocks (e.g. 'layers', 'h'), for layers_to_transform."
        },
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the input of the OSoRA branch, in [0, 1)."}
    )
    bias: Bias = field(
        default="none",
        metadata={"help": "Which biases train: 'none', 'all' (every bias in the model) or 'osora_only'."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter, e.g. a new classification head."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "The weight is stored (d_in, d_out), as in GPT-2's Conv1D; set automatically for Conv1D."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: S = σ, O = 1, so the model starts exactly as the base. False: random S and O "
            "(a non-identity adapter, for tests)."
        },
    )
    trainable: Trainable = field(
        default="both",
        metadata={
            "help": "Which vectors train (the paper's ablation): 'both', 'S' or 'O'. The other one is frozen, gets "
            "no gradient and is not counted as trainable."
        },
    )
    o_dim: ODim = field(
        default="output",
        metadata={
            "help": "Whether O scales the 'output' dimension (the paper, O ∈ R^d_out) or the 'input' one."
        },
    )
    s_parametrization: SParametrization = field(
        default="raw",
        metadata={
            "help": "'raw': train S itself (initialised to σ, the paper). 'scaled': train s with S = σ ⊙ s, s "
            "initialised to ones, so S and O move at comparable relative speed under one learning rate."
        },
    )
    init_method: InitMethod = field(
        default="randomized",
        metadata={
            "help": "How the top-r SVD is computed, in float32 on the weight's device. 'randomized': subspace "
            "iteration on a seeded random sketch; tens of times faster than 'exact' on large weights (4096², "
            "r=32: well under a second on 2 CPU cores against ~15 s), checks its own accuracy against the svd_*"
            "_tolerance fields and warns with the estimated figures when it misses them. 'exact': the full SVD."
        },
    )
    svd_oversample: int | None = field(
        default=None,
        metadata={
            "help": "'randomized': extra sketch columns beyond r (None: max(32, r // 2)). More columns make each "
            "iteration costlier but converge faster, since direction i converges like (σ_{r+p+1} / σ_i)^(2q+1)."
        },
    )
    svd_power_iters: int = field(
        default=4,
        metadata={
            "help": "'randomized': power iterations always run (q). Each costs two products with the weight; "
            "more iterations are added, up to svd_max_power_iters, while the accuracy estimate misses a tolerance."
        },
    )
    svd_max_power_iters: int = field(
        default=16,
        metadata={"help": "'randomized': most power iterations run before a missed tolerance warns."},
    )
    svd_seed: int = field(
        default=0,
        metadata={
            "help": "'randomized': seed of the random sketch (a generator on the weight's device). Same weight, "
            "seed and device: bit-identical factors, which compact adapters (save_factors=False) rely on."
        },
    )
    svd_sigma_tolerance: float = field(
        default=1e-3,
        metadata={"help": "'randomized': target estimated max relative error of the r singular values."},
    )
    svd_subspace_tolerance: float = field(
        default=1e-2,
        metadata={
            "help": "'randomized': target estimated 1 − mean squared cosine of the principal angles between the "
            "computed and the exact top-r singular subspaces (0.01: agreement ≥ 0.99)."
        },
    )
    factor_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory caching the factors per (weight fingerprint, r, method and knobs, device type), so "
            "initialising the same base again is near-instant. Stale or corrupt entries are recomputed."
        },
    )
    save_factors: bool = field(
        default=True,
        metadata={
            "help": "True: the adapter file carries U, V and σ, so any machine reloads it exactly. False (compact): "
            "only S, O and a fingerprint of each base weight are saved; the factors are recomputed on load and a "
            "base whose weights differ is refused."
        },
    )

    def __post_init__(self) -> None:
        from .registration import osora_peft_type

        super().__post_init__()
        self.peft_type = osora_peft_type()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"OSoRAConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"OSoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        _check_choice("bias", self.bias, Bias)
        _check_choice("trainable", self.trainable, Trainable)
        _check_choice("o_dim", self.o_dim, ODim)
        _check_choice("s_parametrization", self.s_parametrization, SParametrization)
        _check_choice("init_method", self.init_method, InitMethod)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)  # type: ignore[assignment]
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)  # type: ignore[assignment]
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("OSoRAConfig.layers_pattern needs layers_to_transform")
        # Tensors of the adapter file this config was loaded with (set by from_pretrained, never serialised):
        # the saved factors are reused instead of recomputing the SVD.
        self._checkpoint: dict[str, torch.Tensor] | None = None
        for name in ("svd_power_iters", "svd_max_power_iters", "svd_seed", "svd_oversample"):
            value = getattr(self, name)
            if value is None and name == "svd_oversample":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"OSoRAConfig.{name} must be a non-negative integer, got {value!r}")
        if self.svd_max_power_iters < self.svd_power_iters:
            raise ValueError(
                f"OSoRAConfig.svd_max_power_iters ({self.svd_max_power_iters}) must be ≥ svd_power_iters "
                f"({self.svd_power_iters})"
            )
        for name in ("svd_sigma_tolerance", "svd_subspace_tolerance"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"OSoRAConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> OSoRAConfig:
        """Load the config and, for a local adapter, check its weights file before any model is touched.

        A truncated or corrupt file raises :class:`osora.AdapterFileError` here, before
        ``PeftModel.from_pretrained`` injects anything into the base model.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            config._checkpoint = read_adapter_file(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
        return config
