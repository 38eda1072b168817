"""``osora params MODEL_OR_CONFIG``: trainable parameters vs rank for LoRA, VeRA and OSoRA (the paper's Figure 1).

Counts come from the model's config alone: the model is built on the meta device (no weights, no memory), and
every ``nn.Linear`` the adapter would target contributes

- LoRA: r·(d_in + d_out)  (A is r × d_in, B is d_out × r);
- VeRA: d_out + r          (the scaling vectors b and d; the random projections are frozen and shared);
- OSoRA: d_out + min(r, d_in, d_out)  (O and S; U, σ, V are frozen buffers).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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

    path = Path(source)
    if path.suffix in {".yaml", ".yml"}:
        from .config import load_config

        model = load_config(path).model
        if model.from_config is not None:
            values = dict(model.from_config)
            values.setdefault("vocab_size", 32000)
            return AutoConfig.for_model(values.pop("model_type"), **values)
        if model.name_or_path is None:
            raise ValueError(f"{source}: model.name_or_path or model.from_config is needed")
        source = model.name_or_path
        path = Path(source)
    if path.is_file() and path.suffix == ".json":
        values = json.loads(path.read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values)
    from .models import (
        _from_pretrained,
        resolve,
    )  # a short name, a folder, a .gguf file or a hub id (paths first)

    return _from_pretrained(AutoConfig, resolve(source))


def adapted_matrices(model_config, target_modules: list[str] | str | None = None) -> list[Matrix]:
    """The linear layers an adapter with ``target_modules`` (None: osora's default for the architecture) adapts."""
    from transformers import AutoModelForCausalLM

    from osora.config import DEFAULT_TARGET_MODULES

    if target_modules is None:
        target_modules = DEFAULT_TARGET_MODULES[model_config.model_type]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    matrices = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith(f".{t}") for t in target_modules)
        if hit:
            matrices.append(Matrix(name, module.in_features, module.out_features))
    return matrices


def trainable_params(matrices: list[Matrix], r: int) -> dict[str, int]:
    """Trainable parameter counts of LoRA, VeRA and OSoRA at rank ``r`` over ``matrices``."""
    return {
        "lora": sum(r * (m.d_in + m.d_out) for m in matrices),
        "vera": sum(m.d_out + r for m in matrices),
        "osora": sum(m.d_out + min(r, m.d_in, m.d_out) for m in matrices),
    }


def table(matrices: list[Matrix], ranks: list[int]) -> list[dict[str, int]]:
    """One row per rank: ``{"r", "lora", "vera", "osora"}``."""
    return [{"r": r, **trainable_params(matrices, r)} for r in ranks]


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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="osora params", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="config.json, model dir, hub id, or an osora train YAML")
    parser.add_argument("--ranks", type=int, nargs="+", default=DEFAULT_RANKS, help="ranks to tabulate")
    parser.add_argument(
        "--targets", nargs="+", default=None, help="module names to adapt (default: all linears)"
    )
    parser.add_argument(
        "--png", type=Path, default=Path("params_vs_rank.png"), help="where to write the plot"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)

    model_config = load_model_config(args.source)
    matrices = adapted_matrices(model_config, args.targets)
    rows = table(matrices, args.ranks)
    total = sum(m.d_in * m.d_out for m in matrices)
    print(f"{args.source}: {len(matrices)} adapted matrices, {total:,} weights in them")
    print(f"{'r':>5} {'LoRA':>15} {'VeRA':>12} {'OSoRA':>12}")
    for row in rows:
        print(f"{row['r']:>5} {row['lora']:>15,} {row['vera']:>12,} {row['osora']:>12,}")
    plot(rows, f"{Path(args.source).stem}: trainable parameters vs rank", args.png)
    print(f"plot: {args.png}")
    if args.json is not None:
        args.json.write_text(json.dumps({"source": args.source, "rows": rows}, indent=2))
    return 0
