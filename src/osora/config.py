"""OSoRAConfig: the one schema for an OSoRA adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.constants import (
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)

from .checkpoint import read_adapter_file
from .functional import ODim, SParametrization
from .registration import osora_peft_type
from .svd import InitMethod, SketchDtype, SVDSpec, SVDSpecError

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


def default_target_modules(model_type: str | None) -> list[str] | str:
    """The modules OSoRA adapts when ``target_modules`` is None, for a model's ``config.model_type``.

    In order: osora's own choice (:data:`DEFAULT_TARGET_MODULES`), then peft's LoRA default for the architecture
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, dozens of them), then ``"all-linear"``: every linear
    layer except the output head, as peft expands it. A model with no linear layer at all is refused when the
    adapter is injected.
    """
    for mapping in (DEFAULT_TARGET_MODULES, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING):
        targets = mapping.get(model_type or "")
        if targets is not None:
            return targets if isinstance(targets, str) else list(targets)
    return INCLUDE_LINEAR_LAYERS_SHORTHAND


_SVD = SVDSpec()  # the defaults of the SVD fields below
#: OSoRAConfig field -> SVDSpec field
_SPEC_FIELDS = {
    "init_method": "method",
    "svd_oversample": "oversample",
    "svd_power_iters": "power_iters",
    "svd_max_power_iters": "max_power_iters",
    "svd_seed": "seed",
    "svd_sigma_tolerance": "sigma_tolerance",
    "svd_subspace_tolerance": "subspace_tolerance",
    "svd_sketch_dtype": "sketch_dtype",
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
            "help": "Module names (suffix match), one regex (full match) or 'all-linear' to adapt. None: the default "
            "for the architecture (osora's DEFAULT_TARGET_MODULES, else peft's LoRA default, else 'all-linear'). "
            "Only torch.nn.Linear and transformers' Conv1D, plain or bitsandbytes-quantized, are supported."
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
        default=_SVD.method,
        metadata={
            "help": "How the top-r SVD is computed, on the weight's device, for all targeted weights of "
            "one shape at once. 'randomized': block Krylov iteration on a seeded random sketch, or the exact SVD for "
            "the shapes where a cost model says that is cheaper; it checks its own accuracy against the svd_*"
            "_tolerance fields, grows the Krylov basis of a matrix that misses them and warns with the estimated "
            "figures when it still does. 'exact': the full SVD of every weight."
        },
    )
    svd_oversample: int | None = field(
        default=_SVD.oversample,
        metadata={
            "help": "'randomized': columns per Krylov block beyond r (None: max(16, r // 2)). Wider blocks cost "
            "more per step but capture more of a slowly decaying spectrum."
        },
    )
    svd_power_iters: int = field(
        default=_SVD.power_iters,
        metadata={
            "help": "'randomized': Krylov blocks always added after the first (q), each two products with the "
            "weight; more are added, up to svd_max_power_iters, while a matrix's accuracy estimate misses a "
            "tolerance."
        },
    )
    svd_max_power_iters: int = field(
        default=_SVD.max_power_iters,
        metadata={"help": "'randomized': most Krylov blocks added before a missed tolerance warns."},
    )
    svd_seed: int = field(
        default=_SVD.seed,
        metadata={
            "help": "'randomized': seed of the random sketch (a generator on the weight's device). Same weight, "
            "seed and device: bit-identical factors, which compact adapters (save_factors=False) rely on."
        },
    )
    svd_sigma_tolerance: float = field(
        default=_SVD.sigma_tolerance,
        metadata={"help": "'randomized': target estimated max relative error of the r singular values."},
    )
    svd_subspace_tolerance: float = field(
        default=_SVD.subspace_tolerance,
        metadata={
            "help": "'randomized': target estimated 1 − mean squared cosine of the principal angles between the "
            "computed and the exact top-r singular subspaces (0.01: agreement ≥ 0.99)."
        },
    )
    svd_sketch_dtype: SketchDtype = field(
        default=_SVD.sketch_dtype,
        metadata={
            "help": "'randomized': precision of the Krylov products with the weight. 'bfloat16' (the final "
            "Rayleigh–Ritz step and the accuracy estimate stay float32), 'float32', or 'auto': bfloat16 on CUDA "
            "and on CPUs with native bfloat16 matrix instructions (AVX-512 BF16, AMX), float32 elsewhere."
        },
    )
    factor_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory caching the factors per (weight fingerprint, r, SVD method and knobs, device type), so "
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
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)  # type: ignore[assignment]
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)  # type: ignore[assignment]
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("OSoRAConfig.layers_pattern needs layers_to_transform")
        # Tensors of the adapter file this config was loaded with (set by from_pretrained, never serialised):
        # the saved factors are reused instead of recomputing the SVD.
        self._checkpoint: dict[str, torch.Tensor] | None = None
        _ = self.svd_spec  # building the spec validates the SVD fields

    @property
    def svd_spec(self) -> SVDSpec:
        """The SVD method and knobs of the ``init_method`` and ``svd_*`` fields, as the layers hand them down."""
        try:
            return SVDSpec(**{spec: getattr(self, name) for name, spec in _SPEC_FIELDS.items()})
        except SVDSpecError as err:
            name = next(n for n, spec in _SPEC_FIELDS.items() if spec == err.field)
            raise ValueError(f"OSoRAConfig.{name}{str(err).removeprefix(err.field)}") from None

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
