"""``osora params MODEL_OR_CONFIG``: trainable parameters vs rank for LoRA, VeRA and OSoRA (the paper's Figure 1),
and the one parameter counter of the application.

Counts come from the model's config alone: the model is built on the meta device (no weights, no memory), each
method's PEFT config (from :mod:`osora.app.methods`) picks its modules with peft's own target matching
(``all-linear`` expanded as peft does, ``nn.Linear`` and transformers' ``Conv1D`` alike), and every adapted
(d_out × d_in) weight contributes

- LoRA: r·(d_in + d_out)  (A is r × d_in, B is d_out × r; DoRA adds its magnitude, d_out);
- VeRA: d_out + r          (the scaling vectors b and d; the random projections are frozen and shared);
- OSoRA: len(O) + min(r, d_in, d_out)  (O and S; U, σ, V are frozen buffers), len(O) = d_out, or d_in with
  ``o_dim="input"``.

:func:`count_parameters` counts a built model (peft's own count for a PEFT model); ``osora train``, the demo and
the benchmarks print and record that one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from json import dumps
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from osora.config import default_target_modules

from .cli import call
from .methods import get_method, peft_config

DEFAULT_RANKS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@dataclass(frozen=True)
class Matrix:
    """One adapted weight: its module name and shape."""

    name: str
    d_in: int
    d_out: int


def load_model_config(source: str):  # -> transformers.PretrainedConfig
    """A transformers config from a config.json file, a model dir / hub id, or an ``osora train`` YAML."""
    from transformers import AutoConfig

    from .models import _from_pretrained, config_from_dict, resolve

    path = Path(source)
    if path.suffix in {".yaml", ".yml"}:
        from .config import load_config

        model = load_config(path).model
        if model.from_config is not None:
            return config_from_dict(model.from_config, vocab_size=32000)
        if model.name_or_path is None:
            raise ValueError(f"{source}: model.name_or_path or model.from_config is needed")
        source = model.name_or_path
        path = Path(source)
    if path.is_file() and path.suffix == ".json":
        return config_from_dict(json.loads(path.read_text()))
    return _from_pretrained(AutoConfig, resolve(source))  # a short name, a folder, a .gguf file or a hub id


def meta_model(model_config: Any) -> nn.Module:
    """The causal LM of ``model_config`` on the meta device: its modules and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def adapted_matrices(model: nn.Module, config: Any) -> list[Matrix]:
    """The weights PEFT config ``config`` adapts in ``model``, found with peft's own target matching.

    Raises:
        ValueError: A matched module is not an ``nn.Linear`` or ``Conv1D`` (not counted here).
    """
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    config = _maybe_include_all_linear_layers(config, model)
    matrices = []
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        if isinstance(module, nn.Linear):
            matrices.append(Matrix(name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):  # weight stored (d_in, d_out)
            matrices.append(Matrix(name, module.weight.shape[0], module.weight.shape[1]))
        else:
            raise ValueError(f"module '{name}' is a {type(module).__name__}; only linear layers are counted")
    return matrices


def trainable_params(config: Any, matrices: list[Matrix]) -> int:
    """Trainable parameters of PEFT config ``config`` (OSoRA, LoRA or VeRA) over ``matrices``."""
    import peft

    import osora

    if isinstance(config, osora.OSoRAConfig):
        total = 0
        for m in matrices:
            s = min(config.r, m.d_in, m.d_out)
            o = m.d_out if config.o_dim == "output" else m.d_in
            total += {"both": s + o, "S": s, "O": o}[config.trainable]
        return total
    if isinstance(config, peft.LoraConfig):
        return sum(config.r * (m.d_in + m.d_out) + (m.d_out if config.use_dora else 0) for m in matrices)
    if isinstance(config, peft.VeraConfig):
        return sum(m.d_out + config.r for m in matrices)
    raise TypeError(f"cannot count the trainable parameters of a {type(config).__name__}")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of a built model; for a PEFT model as peft counts them."""
    peft_count = getattr(model, "get_nb_trainable_parameters", None)
    if callable(peft_count):
        return peft_count()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


#: The methods of the figure, by the name of their column.
FIGURE_METHODS = ("lora", "vera", "osora")


def table(
    model: nn.Module, ranks: list[int], targets: list[str] | str | None = None, **osora_fields: Any
) -> tuple[list[Matrix], list[dict[str, int]]]:
    """The adapted matrices, and one row per rank: ``{"r", "lora", "vera", "osora"}``.

    ``targets``: module names or a regex (None: :func:`osora.config.default_target_modules`); ``osora_fields`` go to OSoRAConfig
    (e.g. ``o_dim="input"``).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    targets = targets if targets is not None else default_target_modules(model_type)

    def config(name: str, r: int) -> Any:
        extra = osora_fields if get_method(name).family == "osora" else {}
        # a copy of a list: peft turns target_modules into a set in place
        return peft_config(
            name, r=r, target_modules=targets if isinstance(targets, str) else list(targets), **extra
        )

    matrices = {name: adapted_matrices(model, config(name, 1)) for name in FIGURE_METHODS}
    rows = [
        {"r": r, **{name: trainable_params(config(name, r), matrices[name]) for name in FIGURE_METHODS}}
        for r in ranks
    ]
    return matrices["osora"], rows


def plot(rows: list[dict[str, int]], title: str, png: Path) -> None:
    """Trainable parameters vs rank on log-log axes, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = [row["r"] for row in rows]
    for method, label, marker in (("lora", "LoRA", "o"), ("vera", "VeRA", "s"), ("osora", "OSoRA", "^")):
        ax.plot(ranks, [row[method] for row in rows], marker=marker, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel("trainable parameters")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def params(
    source: str,
    ranks: list[int] = DEFAULT_RANKS,
    targets: list[str] | None = None,
    o_dim: Literal["output", "input"] = "output",
    png: Path = Path("params_vs_rank.png"),
    json: Path | None = None,
) -> int:
    """Trainable parameters vs rank for LoRA, VeRA and OSoRA (the paper's Figure 1).

    Args:
        source: config.json, model dir, short name, hub id, or an osora train YAML.
        ranks: Ranks to tabulate.
        targets: Module names to adapt (default: OSoRA's defaults for the architecture, else all linears).
        o_dim: The dimension OSoRA's O scales.
        png: Where to write the plot.
        json: Also write the table as JSON here.
    """
    model = meta_model(load_model_config(source))
    matrices, rows = table(model, ranks, targets, o_dim=o_dim)
    total = sum(m.d_in * m.d_out for m in matrices)
    print(f"{source}: {len(matrices)} adapted matrices, {total:,} weights in them")
    print(f"{'r':>5} {'LoRA':>15} {'VeRA':>12} {'OSoRA':>12}")
    for row in rows:
        print(f"{row['r']:>5} {row['lora']:>15,} {row['vera']:>12,} {row['osora']:>12,}")
    plot(rows, f"{Path(source).stem}: trainable parameters vs rank", png)
    print(f"plot: {png}")
    if json is not None:
        json.write_text(dumps({"source": source, "o_dim": o_dim, "rows": rows}, indent=2))
    return 0


def main(argv: list[str]) -> int:
    return call(params, "params", argv)
