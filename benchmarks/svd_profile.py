"""Profile: where ``osora.svd``'s time goes for one weight shape, by torch operation (torch.profiler).

A stack of ``--batch`` matrices with a power-law spectrum (σᵢ = i^-α, random orthonormal factors: the synthetic
weights of ``svd_init.py``; α = 0.3 by default, about SmolLM2-135M's flattest projections) is decomposed by
``batched_top_r_svd``, the library's own dispatch (the cost model picks exact or randomized unless ``--method
exact``), ``--reps`` times after a warm-up call, under torch.profiler. The operations are printed by self time
(CPU; on a GPU, CUDA time too) with the wall time per call and the method's accuracy estimate, and written to
``--out`` with a header naming the commit, the machine and the case (on the CPU, a stack of at least as many
matrices as threads runs in parallel threads, whose operations' times add up). It answers what a timing cannot: whether a
shape's time is in the products with the weight or in the small eigenproblems, QRs and per-call costs (the question
the H200's 7B-stack init left open: 68 ms per 4096-wide matrix against PiSSA's 9 ms).

    python benchmarks/svd_profile.py --shape 1536x576 --r 32
    python benchmarks/svd_profile.py --device cuda --dtype bfloat16 --shape 4096x4096 --r 32 --out prof.txt
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from osora.app.provenance import git_state, hardware
from osora.svd import SVDAccuracyWarning, SVDSpec, batched_top_r_svd
from svd_init import shape_arg, synthetic


def profile_case(
    shape: tuple[int, int],
    r: int,
    batch: int,
    alpha: float,
    spec: SVDSpec,
    device: str,
    dtype: str,
    reps: int,
) -> tuple[str, float, float, str]:
    """(the profiler's table, wall seconds per call, seconds per call inside torch operations (CPU self time), the
    accuracy of the first matrix's factors)."""
    stack = torch.stack([synthetic(shape, alpha, seed)[0] for seed in range(batch)])
    stack = stack.to(device=device, dtype=getattr(torch, dtype))
    cuda = stack.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SVDAccuracyWarning)  # the estimate is printed below
        factors = batched_top_r_svd(stack, r, spec)  # warm-up: library start-up, workspace queries
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(reps):
                batched_top_r_svd(stack, r, spec)
            if cuda:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / reps
    events = prof.key_averages()
    in_torch = sum(e.self_cpu_time_total for e in events) / 1e6 / reps  # seconds per call
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return events.table(sort_by=key, row_limit=25), wall, in_torch, repr(factors[0].accuracy)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", type=shape_arg, default=(4096, 4096), help="d_out x d_in (default 4096x4096)"
    )
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="matrices of the shape decomposed as one stack")
    parser.add_argument("--alpha", type=float, default=0.3, help="spectrum exponent, σᵢ = i^-α")
    parser.add_argument("--method", choices=("randomized", "exact"), default="randomized")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="the weights' dtype"
    )
    parser.add_argument("--reps", type=int, default=3, help="profiled calls, after one warm-up call")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if not 1 <= args.r <= min(args.shape):
        parser.error(f"--r must be in [1, {min(args.shape)}] for a {args.shape[0]}x{args.shape[1]} weight")
    if args.batch < 1 or args.reps < 1:
        parser.error("--batch and --reps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    table, wall, in_torch, accuracy = profile_case(
        args.shape,
        args.r,
        args.batch,
        args.alpha,
        SVDSpec(method=args.method),
        args.device,
        args.dtype,
        args.reps,
    )
    hw, git = hardware(), git_state()
    where = (
        hw.get("gpu") if args.device == "cuda" else f"{hw['cpu']}, {torch.get_num_threads()} torch thread(s)"
    )
    header = (
        f"osora.svd profile: {args.batch} x {args.shape[0]}x{args.shape[1]} {args.dtype}, r={args.r}, "
        f"method={args.method}, σᵢ = i^-{args.alpha}; {where}; torch {torch.__version__}; commit "
        f"{(git.get('commit') or 'unknown')[:8]}{' dirty' if git.get('dirty') else ''}\n"
        f"wall time per call {wall * 1e3:.1f} ms (mean of {args.reps}), of which torch operations' CPU self time "
        f"{in_torch * 1e3:.1f} ms (the rest: LAPACK through ctypes on the CPU path, Python, waiting); first "
        f"matrix's accuracy {accuracy}\n"
        f"command: python benchmarks/svd_profile.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
    )
    report = header + table + "\n"
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
