"""Benchmark: what ``get_peft_model`` costs — OSoRA (default and exact) vs PEFT LoRA vs PEFT PiSSA, side by side.

Two models, every linear layer of every decoder block targeted (q, k, v, o, gate, up, down):

- SmolLM2-135M-Instruct, its real weights (``osora.app.models``, short name ``smollm2-135m-instruct``);
- a Llama-7B-shaped stack: ``--layers`` decoder blocks of the real 7B dimensions (hidden 4096, MLP 11008), each
  weight W = U diag(σ) Vᵀ with random orthonormal U, V and a power law σᵢ ∝ i^-α, α per projection type the median
  of the exponents fitted to SmolLM2's weights of that type (least squares in log-log over i ∈ [2, 0.8 n]).

For r ∈ ``--ranks`` and ``--reps`` repetitions, the four methods run one after another on fresh copies of the
same base (the order rotates per repetition), so their ratios come from the same minutes of the machine's load.
Agreement: the mean squared cosine of the principal angles between each method's top-r subspaces and the exact
ones (the lower of the U and V sides), worst over matrices, and the max relative σ error; the reference is the
known construction for the 7B stack and the exact (float32 LAPACK) factors for SmolLM2. PiSSA's subspaces are
read from its lora_B / lora_A (``init_lora_weights="pissa_niter_4"``: ``torch.svd_lowrank`` with r columns, 4
subspace iterations).

Results are written after every measurement (a partial run leaves a valid JSON) to
benchmarks/results/init_cost.json; the table goes to benchmarks/README_init_cost.md.

    nice -n 19 python benchmarks/init_cost.py                    # full run (tens of minutes on 2 loaded cores)
    python benchmarks/init_cost.py --quick                       # SmolLM2 at r=8, 1 rep, to $TMPDIR
    python benchmarks/init_cost.py --report-only                 # table from the JSON
    python benchmarks/init_cost.py --calibrate                   # the cost-model constants of osora.svd
    python benchmarks/init_cost.py --models smollm2 --layers 0 --background-load 2   # beside 2 busy processes
    python benchmarks/init_cost.py --device cuda --dtype bfloat16   # on a GPU: results/init_cost_cuda_bfloat16.json
    python benchmarks/init_cost.py --models llama7b --dtype bfloat16   # the 7B stack alone (spectra: --alphas-from)

``--dtype bfloat16``: the base weights in bfloat16, as 7B checkpoints ship; agreement is then measured against the
exact SVD of the bfloat16 weights (upcast), the matrices the methods decompose.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

import osora
from osora.app.provenance import BenchmarkRecord, shown_path, write_result
from osora.svd import SVDAccuracyWarning, SVDSpec, batched_top_r_svd
from svd_init import power_law_alpha, stats

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RANKS = [8, 32, 128]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["lora", "pissa", "osora", "osora_exact"]
LABELS = {"lora": "LoRA", "pissa": "PiSSA", "osora": "OSoRA", "osora_exact": "OSoRA exact"}


# -- models -----------------------------------------------------------------------------------------------------


def smollm2() -> torch.nn.Module:
    from osora.app.models import load_causal_lm

    model, _ = load_causal_lm("smollm2-135m-instruct", dtype="float32", with_tokenizer=False)
    return model.eval()


def fitted_alphas(model: torch.nn.Module) -> dict[str, float]:
    """Median power-law exponent of the model's weights per projection type."""
    by_type: dict[str, list[float]] = {}
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in TARGETS and isinstance(module, torch.nn.Linear):
            s = torch.linalg.svdvals(module.weight.detach().double()).numpy()
            by_type.setdefault(kind, []).append(power_law_alpha(s))
    return {kind: float(np.median(a)) for kind, a in by_type.items()}


def llama7b_stack(layers: int, alphas: dict[str, float], seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """``layers`` Llama-7B decoder blocks with power-law weights; returns the model and each weight's exact
    top factors {module name: (U (d_out, 128), sigma (128,), V (d_in, 128))}."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").float().eval()
    g = torch.Generator().manual_seed(seed)
    # one random orthonormal basis per dimension (QR of a Gaussian); each weight gets its own rows permuted and
    # columns sign-flipped: still exactly orthonormal, and the methods' Gaussian sketches cannot tell the difference
    bases = {d: torch.linalg.qr(torch.randn(d, 4096, generator=g)).Q for d in (4096, 11008)}  # (d, 4096)
    refs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            kind = name.rsplit(".", 1)[-1]
            if kind not in TARGETS:
                continue
            d_out, d_in = module.weight.shape
            U = bases[d_out][torch.randperm(d_out, generator=g)] * _signs(4096, g)  # (d_out, 4096)
            V = bases[d_in][torch.randperm(d_in, generator=g)] * _signs(4096, g)  # (d_in, 4096)
            sigma = torch.arange(1, 4097, dtype=torch.float32) ** -alphas[kind]
            sigma *= 0.02 * (d_out * d_in) ** 0.5 / sigma.norm()  # entries of rms 0.02, like a trained weight
            module.weight.copy_((U * sigma) @ V.T)
            refs[name] = (U[:, :128].clone(), sigma[:128].clone(), V[:, :128].clone())
        model.model.embed_tokens.weight.normal_(0, 0.02, generator=g)
        model.lm_head.weight.normal_(0, 0.02, generator=g)
    return model, refs


def _signs(k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (k,), generator=g).float() * 2 - 1


def exact_refs(model: torch.nn.Module) -> dict:
    """Top-128 exact factors of every targeted weight (float32 LAPACK), as {name: (U, sigma, V)}."""
    refs = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            U, s, Vh = torch.linalg.svd(module.weight.detach().float(), full_matrices=False)
            refs[name] = (U[:, :128].cpu().clone(), s[:128].cpu().clone(), Vh[:128].T.cpu().clone())
    return refs


# -- methods ----------------------------------------------------------------------------------------------------


def peft_config(method: str, r: int) -> Any:
    from peft import LoraConfig

    if method == "lora":
        return LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS)
    if method == "pissa":
        return LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights="pissa_niter_4")
    init = "exact" if method == "osora_exact" else "randomized"
    return osora.OSoRAConfig(r=r, target_modules=TARGETS, init_method=init)


def factors_of(
    model: torch.nn.Module, method: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(U (d_out, r), sigma (r,), V (d_in, r)) of every adapted weight, read from the adapter's tensors."""
    out = {}
    for name, module in model.named_modules():
        key = name.removeprefix("base_model.model.")
        if method.startswith("osora") and isinstance(module, osora.OSoRALayer):
            out[key] = (
                module.osora_U["default"].cpu(),
                module.osora_sigma["default"].cpu(),
                module.osora_Vh["default"].T.cpu(),
            )
        elif method == "pissa" and hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            # PiSSA: lora_B = U_r diag(√(σ/s)), lora_A = diag(√(σ/s)) V_rᵀ, s = lora_alpha / r = 1 here
            B = module.lora_B["default"].weight.detach().float().cpu()  # (d_out, r)
            A = module.lora_A["default"].weight.detach().float().cpu()  # (r, d_in)
            norms = B.norm(dim=0)  # (r,)
            out[key] = (B / norms, norms * A.norm(dim=1), (A / A.norm(dim=1, keepdim=True)).T)
    return out


def accuracy(found: dict, refs: dict, r: int) -> dict[str, float]:
    """Worst agreement and max relative σ error over the matrices (σ compared in descending order)."""
    worst_sub, worst_sigma = 1.0, 0.0
    for name, (U, sigma, V) in found.items():
        Ur, sr, Vr = (t[:, :r] if t.ndim == 2 else t[:r] for t in refs[name])
        Uq, Vq = (
            torch.linalg.qr(U.double()).Q,
            torch.linalg.qr(V.double()).Q,
        )  # PiSSA's columns: not normalised
        sub = min(
            float((Ur.double().T @ Uq).square().sum() / r),
            float((Vr.double().T @ Vq).square().sum() / r),
        )
        s = sigma.double().sort(descending=True).values
        err = float(((s - sr.double()).abs() / sr.double()).max())
        worst_sub, worst_sigma = min(worst_sub, sub), max(worst_sigma, err)
    return {"subspace_agreement_min": worst_sub, "sigma_rel_err_max": worst_sigma}


def measure(
    base: torch.nn.Module, method: str, r: int, config: Any = None
) -> tuple[float, torch.nn.Module, int, float]:
    """Wall time of get_peft_model on a fresh copy of ``base`` (with ``config``, else ``method``'s at r), the adapted
    model, the number of SVDAccuracyWarnings and the 1-minute load average just before."""
    from peft import get_peft_model

    model = copy.deepcopy(base)
    gc.collect()
    load = os.getloadavg()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SVDAccuracyWarning)
        cuda = next(model.parameters()).is_cuda
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        peft_model = get_peft_model(model, peft_config(method, r) if config is None else config)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    warned = sum(issubclass(w.category, SVDAccuracyWarning) for w in caught)
    return elapsed, peft_model, warned, load


def bench_model(
    label: str,
    base: torch.nn.Module,
    refs: dict,
    ranks: list[int],
    reps: int,
    methods: list[str],
    record: Callable[[], None],
    into: dict,
) -> None:
    """Fill ``into[str(r)][method]`` with times, loads, warnings and accuracy, calling ``record`` after each."""
    for r in ranks:
        row = into.setdefault(str(r), {})
        for rep in range(reps):
            for method in methods[rep % len(methods) :] + methods[: rep % len(methods)]:
                entry = row.setdefault(method, {"times_s": [], "load_1min": [], "warnings": 0})
                elapsed, model, warned, load = measure(base, method, r)
                entry["times_s"].append(elapsed)
                entry["load_1min"].append(load)
                entry["warnings"] += warned
                if "accuracy" not in entry and method != "lora":
                    entry["accuracy"] = accuracy(factors_of(model, method), refs, r)
                entry["time_s"] = stats(entry["times_s"])
                del model
                gc.collect()
                print(f"[{label}] r={r} rep {rep} {method}: {elapsed:.2f} s (load {load:.1f})", flush=True)
                record()


# -- cost-model calibration -------------------------------------------------------------------------------------


def _best(fn: Callable[[], object], n: int) -> float:
    """Fastest of ``n`` timed calls, after one warm-up call."""
    return min(_timed(fn, n))


def calibrate() -> None:
    """Print, on this machine and one thread (as each part of a split batch runs), the ratios behind osora.svd's
    cost model, EIGH_COST_RATIO (top-r eigenpairs of the Gram matrix over an (m, m) product) and
    BFLOAT16_PASS_COST, and the times of both methods next to prefers_exact's choice, on power-law matrices; then,
    for RANDOMIZED_FIXED_COST, both methods on SmolLM2-135M's real weights per shape at r = 8 … 32."""
    from osora.svd import exact_svd, randomized_svd, single_threaded_kernels, top_eigenpairs

    spec = osora.SVDSpec()
    with single_threaded_kernels():
        for m, n in [(192, 576), (576, 576), (576, 1536), (1024, 1024), (2048, 2048)]:
            g = torch.Generator().manual_seed(0)
            U, V = (
                torch.linalg.qr(torch.randn(m, m, generator=g)).Q,
                torch.linalg.qr(torch.randn(n, m, generator=g)).Q,
            )
            W = ((U * torch.arange(1, m + 1) ** -0.35) @ V.T).unsqueeze(0)
            Xk = torch.randn(n, 48)
            G, Wb, Xb = W[0] @ W[0].T, W[0].bfloat16(), Xk.bfloat16()
            product = _best(lambda G=G: G @ G, 3)
            eigh = _best(lambda G=G: top_eigenpairs(G.unsqueeze(0), 32), 3)
            fp32 = _best(lambda W=W, Xk=Xk: W[0] @ Xk, 3)
            bf16 = _best(lambda Wb=Wb, Xb=Xb: Wb @ Xb, 3)
            rand = _best(lambda W=W: randomized_svd(W, 32, spec), 2)
            exact = _best(lambda W=W: exact_svd(W, 32), 2)
            print(
                f"{m}×{n}, r=32: top-32 eigenpairs / (m, m) product {eigh / product:.1f}; bf16 / fp32 product with 48 "
                f"columns {bf16 / fp32:.2f}; randomized {rand * 1e3:.0f} ms, exact {exact * 1e3:.0f} ms "
                f"(prefers_exact: {osora.svd.prefers_exact((m, n), 32, spec)})",
                flush=True,
            )
    # RANDOMIZED_FIXED_COST: the real weights, each shape's matrices batched as in get_peft_model (torch's threads)
    groups: dict[tuple[int, int], list[torch.Tensor]] = collections.defaultdict(list)
    for name, module in smollm2().named_modules():
        if name.split(".")[-1] in TARGETS:
            groups[tuple(module.weight.shape)].append(module.weight.detach())
    for r in (8, 16, 24, 32):
        for shape, weights in groups.items():
            exact = statistics.median(
                _timed(lambda w=weights, r=r: batched_top_r_svd(w, r, osora.SVDSpec(method="exact")), 5)
            )
            with mock.patch(
                "osora.svd.prefers_exact", return_value=False
            ):  # randomized even where it would not be
                randomized = statistics.median(
                    _timed(lambda w=weights, r=r: batched_top_r_svd(w, r, osora.SVDSpec()), 5)
                )
            print(
                f"SmolLM2-135M {shape[0]}×{shape[1]} ×{len(weights)}, r={r}, {torch.get_num_threads()} threads: "
                f"randomized {randomized * 1e3:.0f} ms, exact {exact * 1e3:.0f} ms (ratio {randomized / exact:.2f}; "
                f"prefers_exact: {osora.svd.prefers_exact(shape, r, spec)})",
                flush=True,
            )


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen]]:
    """``n`` other processes, each keeping a core busy with a pure-Python loop, while the block runs: the machine
    shared with other jobs, as on a node where data loading or other runs compete for the cores. Killed (and
    reaped) when the block ends, however it ends; a loop whose parent is gone (a benchmark killed with SIGKILL)
    stops by itself."""
    loop = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
    procs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    """Times of ``n`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# -- report -----------------------------------------------------------------------------------------------------


def markdown(result: dict, source: Path) -> str:
    hw, git = result["provenance"]["hardware"], result["provenance"]["git"]
    cfg = result["config"]
    loads = [
        x
        for model in result["models"].values()
        for row in model["by_r"].values()
        for entry in row.values()
        for x in entry["load_1min"]
    ]
    device, dtype = cfg.get("device", "cpu"), cfg.get("dtype", "float32")
    where = hw.get("gpu") if device == "cuda" else f"{hw['cpu']}, {hw['torch_threads']} torch thread(s)"
    batch = cfg.get("max_batch_bytes")  # absent from files written before it was recorded
    stacks = f"; stacks of up to {batch // 2**20} MiB per batched SVD" if batch else ""
    busy = cfg.get("background_load", 0)
    stacks += (
        f"; **beside {busy} busy process{'es' if busy > 1 else ''}** (`--background-load {busy}`: pure-Python loops)"
        if busy
        else ""
    )
    lines = [
        f"{where}, {dtype} weights; commit {git['commit'][:8]}"
        f"{' dirty' if git['dirty'] else ''}{stacks}; `get_peft_model` wall time, median (min) of {cfg['reps']} "
        f"repetitions (OSoRA exact: {cfg.get('exact_reps_smollm2', 1)}), methods interleaved; 1-minute load average during the run {min(loads):.1f}–{max(loads):.1f} "
        f"(median {statistics.median(loads):.1f}) on {hw['cores']} cores. Generated by "
        f"`benchmarks/init_cost.py` from `{shown_path(source)}`.",
        "",
        "| model | r | LoRA (s) | PiSSA (s) | OSoRA (s) | OSoRA exact (s) | OSoRA / LoRA | OSoRA / PiSSA | "
        "exact / OSoRA | OSoRA agreement (min) | OSoRA σ error (max) | PiSSA agreement (min) | PiSSA σ error (max) "
        "| OSoRA warnings |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in result["models"].values():
        for r, row in model["by_r"].items():

            def t(method: str, row: dict = row) -> str:
                e = row.get(method)
                if not e:
                    return "—"
                return f"{e['time_s']['median']:.2f} ({e['time_s']['min']:.2f})"

            def ratio(a: str, b: str, row: dict = row) -> str:
                if a not in row or b not in row:
                    return "—"
                return f"{row[a]['time_s']['median'] / row[b]['time_s']['median']:.2f}×"

            def acc(method: str, key: str, fmt: str, row: dict = row) -> str:
                e = row.get(method, {}).get("accuracy")
                return format(e[key], fmt) if e else "—"

            warned = row["osora"]["warnings"] if "osora" in row else "—"
            lines.append(
                f"| {model['label']} | {r} | {t('lora')} | {t('pissa')} | {t('osora')} | {t('osora_exact')} | "
                f"{ratio('osora', 'lora')} | {ratio('osora', 'pissa')} | {ratio('osora_exact', 'osora')} | "
                f"{acc('osora', 'subspace_agreement_min', '.5f')} | {acc('osora', 'sigma_rel_err_max', '.1e')} | "
                f"{acc('pissa', 'subspace_agreement_min', '.5f')} | {acc('pissa', 'sigma_rel_err_max', '.1e')} | "
                f"{warned} |"
            )
    stack, layers = result["models"].get("llama7b"), cfg.get("layers_7b", 0)
    if stack and layers:
        lines += [
            "",
            f"Whole Llama-7B (32 decoder blocks, 224 matrices), estimated as 32 / {layers} × the {layers}-block "
            "stack's median:",
            "",
            "| r | LoRA (s) | PiSSA (s) | OSoRA (s) |",
            "|---:|---:|---:|---:|",
        ]
        for r, row in stack["by_r"].items():
            cells = [
                f"{row[m]['time_s']['median'] * 32 / layers:.1f}" if m in row else "—"
                for m in ("lora", "pissa", "osora")
            ]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
    alphas = result.get("alphas")
    spectra = (  # only where the 7B stack was measured
        "7B stack spectra: σᵢ ∝ i^-α with α per projection the median fitted to SmolLM2-135M's weights ("
        + ", ".join(f"{k} {v:.2f}" for k, v in alphas.items())
        + "). "
        if stack and alphas
        else ""
    )
    lines += [
        "",
        spectra
        + "Agreement: mean squared cosine of the principal angles to the exact top-r subspaces, the lower "
        "of U and V, worst over all adapted matrices; reference: the exact SVD of the weights as adapted "
        + (
            (
                "(the construction for the float32 7B stack, LAPACK's SVD otherwise)"
                if stack
                else "(LAPACK's SVD)"
            )
            if cfg.get("dtype", "float32") == "float32"
            else f"({cfg['dtype']}, upcast; LAPACK's SVD)"
        )
        + ". LoRA computes no SVD.",
    ]
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------------------------


def result_name(device: str, dtype: str) -> str:
    """The result's name (benchmarks/results/NAME.json, benchmarks/README_NAME.md): ``init_cost`` for float32 on
    the CPU, else ``init_cost_<device>_<dtype>``."""
    return "init_cost" if (device, dtype) == ("cpu", "float32") else f"init_cost_{device}_{dtype}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="SmolLM2 at r=8, 1 rep (a smoke run)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    parser.add_argument(
        "--layers", type=int, default=2, help="decoder blocks of the 7B-shaped stack (0: none)"
    )
    parser.add_argument(
        "--exact-7b-ranks",
        type=int,
        nargs="*",
        default=[32],
        help="ranks at which OSoRA exact is timed on the 7B stack (its full SVDs take minutes; it does not "
        "depend on r), one repetition",
    )
    parser.add_argument(
        "--exact-reps",
        type=int,
        default=1,
        help="repetitions of OSoRA exact on SmolLM2 (it does not depend on r)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--max-batch-mib",
        type=int,
        default=None,
        help="osora.svd.MAX_BATCH_BYTES in MiB, the largest stack of one shape decomposed at once (default: the "
        "library's; on a GPU, where every 7B matrix otherwise runs alone, larger stacks share the per-call costs)",
    )
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="run N busy processes (one core each) beside the measurements, as when other jobs share the machine",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the weights are")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the base weights' dtype (7B checkpoints ship in bfloat16)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=("smollm2", "llama7b"),
        default=["smollm2", "llama7b"],
        help="without smollm2 the 7B stack's spectra come from --alphas-from",
    )
    parser.add_argument(
        "--alphas-from",
        type=Path,
        default=RESULTS / "init_cost.json",
        help="a result JSON whose fitted SmolLM2 exponents shape the 7B stack when smollm2 is not measured",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="result JSON (default: results/init_cost.json)"
    )
    parser.add_argument("--readme", type=Path, default=None)
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from --out")
    parser.add_argument("--calibrate", action="store_true", help="print the cost-model ratios and exit")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.background_load < 0:
        parser.error(f"--background-load must be 0 or more, got {args.background_load}")
    if args.max_batch_mib is not None:
        if args.max_batch_mib < 1:
            parser.error(f"--max-batch-mib must be at least 1, got {args.max_batch_mib}")
        osora.svd.MAX_BATCH_BYTES = args.max_batch_mib * 2**20
    if args.calibrate:
        calibrate()
        return
    name = result_name(args.device, args.dtype)
    if args.out is None:
        quick_dir = Path(tempfile.gettempdir()) / "osora-bench-quick"
        args.out = (quick_dir if args.quick else RESULTS) / f"{name}.json"
    if args.readme is None:
        committed = args.out.resolve() == (RESULTS / f"{name}.json").resolve()
        args.readme = HERE / f"README_{name}.md" if committed else args.out.with_name(f"README_{name}.md")
    if args.report_only:
        result = json.loads(args.out.read_text())
    else:
        ranks, reps, layers = ([8], 1, 0) if args.quick else (args.ranks, args.reps, args.layers)
        argv_used = sys.argv[1:] if argv is None else argv
        record = BenchmarkRecord(
            "init_cost",
            {
                "ranks": ranks,
                "reps": reps,
                "layers_7b": layers,
                "exact_7b_ranks": args.exact_7b_ranks,
                "exact_reps_smollm2": args.exact_reps,
                "targets": TARGETS,
                "osora_svd_spec": dataclasses.asdict(SVDSpec()),
                "max_batch_bytes": osora.svd.MAX_BATCH_BYTES,
                "background_load": args.background_load,
                "device": args.device,
                "dtype": args.dtype,
                "models": args.models,
                "pissa": "init_lora_weights='pissa_niter_4'",
                "argv": argv_used,
            },
            command=" ".join(["python", "benchmarks/init_cost.py", *argv_used]),
        )
        results: dict[str, Any] = {"alphas": {}, "models": {}}

        def record_results() -> None:  # after every measurement: a partial run still leaves a complete file
            write_result(args.out, record.finish(**results))

        with busy_processes(args.background_load):
            placed = {"device": args.device, "dtype": getattr(torch, args.dtype)}
            fast = [m for m in METHODS if m != "osora_exact"]
            if "smollm2" in args.models or args.quick:
                smol = smollm2()
                results["alphas"] = fitted_alphas(smol)
                smol = smol.to(**placed)
                # of the weights as the methods see them (bfloat16: the copy's own SVD)
                refs = exact_refs(smol)
                entry = results["models"].setdefault(
                    "smollm2", {"label": "SmolLM2-135M (210 matrices)", "by_r": {}}
                )
                bench_model("smollm2", smol, refs, ranks, reps, fast, record_results, entry["by_r"])
                exact = ["osora_exact"]
                bench_model(
                    "smollm2", smol, refs, ranks, args.exact_reps, exact, record_results, entry["by_r"]
                )
                del smol
                gc.collect()
            else:
                results["alphas"] = json.loads(args.alphas_from.read_text())["alphas"]
            if layers and "llama7b" in args.models:
                stack, refs = llama7b_stack(layers, results["alphas"])
                stack = stack.to(**placed)
                if args.dtype != "float32":
                    refs = exact_refs(stack)  # rounding moved the constructed factors: the copy's exact SVD
                label = f"Llama-7B-shaped, {layers} blocks ({7 * layers} matrices)"
                entry = results["models"].setdefault("llama7b", {"label": label, "by_r": {}})
                bench_model("llama7b", stack, refs, ranks, reps, fast, record_results, entry["by_r"])
                exact_ranks = [r for r in args.exact_7b_ranks if r in ranks]
                bench_model(
                    "llama7b", stack, refs, exact_ranks, 1, ["osora_exact"], record_results, entry["by_r"]
                )
        record_results()
        result = json.loads(args.out.read_text())
    table = markdown(result, args.out)
    args.readme.write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.readme}", flush=True)


if __name__ == "__main__":
    main()
