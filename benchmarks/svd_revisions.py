"""Benchmark: ``osora.svd`` of this working tree against another git revision's, on single matrices, interleaved.

Each case (shape, r, method) decomposes one Gaussian matrix with ``top_r_svd`` of both versions in alternating order
(the machine's load falls on both alike) and prints min and median wall time and whether the two versions give
bitwise identical factors. A single matrix runs with torch's and BLAS's own thread counts (no batch to split
across threads), the case where thread pools of different libraries alternate.

``--smollm2``: also SmolLM2-135M-Instruct's 210 targeted weights decomposed one by one (as layers that compute
their own factors do: quantized bases, ZeRO-3), the total per version, at r = 8 and 32; and ``get_peft_model`` with
OSoRA r = 8 on all its linear layers loaded in 4-bit (bitsandbytes; each version's ``batched_top_r_svd`` in
``osora.factors``), 2 repetitions per version.

    python benchmarks/svd_revisions.py --base HEAD~1        # this tree against the previous commit
    python benchmarks/svd_revisions.py --base main --reps 5 --smollm2
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # (shape, r, method)
    ((192, 576), 8, "randomized"),  # SmolLM2-135M's k_proj / v_proj: the exact SVD by the cost model
    ((576, 576), 8, "exact"),
    ((1536, 576), 32, "randomized"),
    ((2048, 2048), 32, "exact"),
    ((4096, 4096), 32, "exact"),
]


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(names: list[str], reps: int, timed: Callable[[str], float]) -> dict[str, list[float]]:
    """``timed(name)``, in seconds, ``reps`` times per name in alternating order, so that the machine's load
    falls on every version alike."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        for name in names[:: 1 if i % 2 else -1]:
            times[name].append(timed(name))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="git revision whose src/osora/svd.py is compared")
    parser.add_argument(
        "--reps", type=int, default=20, help="timed calls per version (large shapes: a quarter)"
    )
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M's weights one by one")
    args = parser.parse_args(argv)
    shown = subprocess.run(
        ["git", "show", f"{args.base}:src/osora/svd.py"], cwd=ROOT, capture_output=True, text=True
    )
    if shown.returncode:
        parser.error(f"--base {args.base}: no src/osora/svd.py there ({shown.stderr.strip()})")
    source = shown.stdout
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "svd_base.py").write_text(source)
        versions = {
            "base": load(Path(tmp) / "svd_base.py", "svd_base"),
            "tree": load(ROOT / "src/osora/svd.py", "svd_tree"),
        }
    missing = [n for n in ("top_r_svd", "SVDSpec") if not hasattr(versions["base"], n)]
    if missing:
        parser.error(f"--base {args.base}: its osora.svd has no {' or '.join(missing)} (an earlier API)")
    print(f"base {args.base}, tree {ROOT}; torch threads {torch.get_num_threads()}")
    warnings.simplefilter("ignore")  # accuracy warnings of a Gaussian matrix are not what is timed here
    g = torch.Generator().manual_seed(0)
    for shape, r, method in CASES:
        W = torch.randn(*shape, generator=g)
        reps = args.reps if shape[0] * shape[1] < 2**22 else max(2, args.reps // 4)
        found = {name: v.top_r_svd(W, r, v.SVDSpec(method=method)) for name, v in versions.items()}  # warm-up
        times = interleaved(
            list(versions),
            reps,
            lambda name, W=W, r=r, method=method: seconds(
                lambda: versions[name].top_r_svd(W, r, versions[name].SVDSpec(method=method))
            ),
        )
        a, b = found["base"], found["tree"]
        same = all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("U", "sigma", "Vh"))
        cells = [
            f"{n} min {min(t) * 1e3:.1f} / median {statistics.median(t) * 1e3:.1f} ms"
            for n, t in times.items()
        ]
        print(
            f"{shape[0]}x{shape[1]} r={r} {method}: "
            + "; ".join(cells)
            + ("; identical" if same else "; differ")
        )
    if args.smollm2:
        one_by_one(versions, max(2, args.reps // 5))


def one_by_one(versions: dict[str, ModuleType], reps: int) -> None:
    from init_cost import TARGETS, smollm2

    model = smollm2()
    weights = [m.weight.detach() for n, m in model.named_modules() if n.rpartition(".")[2] in TARGETS]
    for r in (8, 32):
        times = interleaved(
            list(versions),
            reps,
            lambda name, r=r: seconds(lambda: [versions[name].top_r_svd(w, r) for w in weights]),
        )
        cells = [f"{n} min {min(t):.2f} / median {statistics.median(t):.2f} s" for n, t in times.items()]
        print(f"SmolLM2-135M, {len(weights)} weights one by one, r={r}: " + "; ".join(cells))
    four_bit(versions)


def four_bit(versions: dict[str, ModuleType]) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import osora.factors
    from init_cost import TARGETS
    from osora.app.models import resolve

    path = resolve("smollm2-135m-instruct").location  # the converted GGUF's folder
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    own = osora.factors.batched_top_r_svd

    def timed(name: str) -> float:  # the model's load is not timed
        osora.factors.batched_top_r_svd = versions[name].batched_top_r_svd  # type: ignore[attr-defined]
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantized, dtype=torch.float32)
        return seconds(lambda: get_peft_model(model, osora.OSoRAConfig(r=8, target_modules=TARGETS)))

    try:
        times = interleaved(list(versions), 2, timed)
    finally:
        osora.factors.batched_top_r_svd = own
    cells = [f"{n} {', '.join(f'{x:.2f}' for x in t)} s" for n, t in times.items()]
    print("SmolLM2-135M in 4-bit, get_peft_model OSoRA r=8: " + "; ".join(cells))


if __name__ == "__main__":
    main()
