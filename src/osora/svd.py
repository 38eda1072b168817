"""Top-r singular triplets of weight matrices, the factors OSoRA freezes, computed a batch of equal shapes at once.

Every method computes in float32 on the weights' device and returns factors with canonical signs. Each matrix's
result depends only on the matrix and the :class:`SVDSpec` (its random sketch is drawn from the spec's seed, not
from its position in a batch), so the same weight gives the same factors whether it is decomposed alone or
stacked with others (``tests/test_factors.py`` checks this), which compact adapter files rely on.

Two methods, chosen per shape:

- ``"exact"``: the top r of the exact SVD, from the top r eigenpairs of the smaller Gram matrix W Wᵀ or WᵀW
  (LAPACK ssyevr on the CPU; the full torch.linalg.svd where the top r singular values span more than a factor
  10). O(m n min(m, n)).
- ``"randomized"``: block Krylov iteration on a seeded Gaussian sketch (Halko, Martinsson & Tropp 2011, §4.4;
  Musco & Musco 2015) with Rayleigh–Ritz extraction. With A = W oriented so that m ≤ n, Ω (n, k) Gaussian,
  k = r + oversample: Q₀ = orth(A Ω), Q_j = orth((I − P) A Aᵀ Q_{j−1}) against all earlier blocks, and the
  top-r triplets of A restricted to span(Q₀ … Q_q). A Krylov basis keeps every block, where plain subspace
  iteration keeps only the last: on the slowly decaying spectra of pretrained weights it reaches a given
  accuracy in far fewer products with W (SmolLM2-135M's matrices, r=32: 3–6 blocks instead of 16 iterations).
  O(m n k (2q + 3)) plus the QRs and a small (K × K, K = k(q + 1)) eigenproblem. The products with W, nearly
  all of the work, run in the spec's ``sketch_dtype``: in bfloat16 (the default where the hardware has it: CUDA,
  CPUs with AVX-512 BF16 or AMX, 3–5× the float32 throughput) the basis only has to span the top singular
  directions, which rounding errors of 2⁻⁹ do not disturb at the tolerances below; the answer is then the
  float32 Rayleigh–Ritz step on the top k Ritz vectors (two more products with W, k and r columns), and the
  accuracy estimate is that of the float32 triplets.

``"randomized"`` computes the exact SVD instead for the shapes where the cost model (:func:`prefers_exact`,
fitted to measured times of both methods) predicts it is cheaper: small matrices (SmolLM2-135M's 192 × 576,
576 × 1536 and 1536 × 576 weights at r ≥ 8, its 576 × 576 ones from r = 16), or a sketch that is not much
narrower than the matrix.

The randomized method checks its own result from the residuals of the Ritz triplets, rᵢ = W vᵢ − σ̃ᵢ uᵢ (Wᵀuᵢ
= σ̃ᵢ vᵢ holds exactly by construction); during the iteration they come from the stored W Wᵀ basis without
another product with W (rᵢ = W Wᵀ uᵢ / σ̃ᵢ − σ̃ᵢ uᵢ):

- singular values: |σᵢ − σ̃ᵢ| ≲ min(‖rᵢ‖, ‖rᵢ‖² / gapᵢ) (residual and quadratic residual bounds);
- subspace: sin θᵢ ≲ ‖rᵢ‖ / gapᵢ (Wedin's theorem per direction), reported as the estimated mean squared
  cosine of the principal angles, 1 − mean sin²θᵢ;

with gapᵢ = σ̃ᵢ − σ̃_K, the smallest Ritz value of the basis: Rayleigh–Ritz leaves the error of a Ritz vector,
to first order, outside the basis, among directions whose singular values are at most about σ̃_K. Where σ_{r+1}
nearly equals σ_r (weights of SmolLM2-135M at r = 8 have gaps below 0.1 %), a wanted vector also turns towards the
unwanted singular vectors the basis holds, by ‖rᵢ‖ times their distance from the basis over the much smaller gap
λᵢ − λⱼ between eigenvalues of W Wᵀ; the subspace estimate adds that term for the k leading unwanted triplets,
with each λⱼ at the top of its own error bar (Ritz values only underestimate, and an unconverged σ̃_{r+1} can sit
well below σ_{r+1}, which would overstate that gap).
The floor itself is raised to the largest Ritz value whose vector has not converged (there the true spectrum is
not captured), and a bfloat16 basis's float32 refinement counts each residual's components along the basis's
other Ritz vectors at their own values rather than at the floor.

The gaps are taken from the Ritz values themselves, so these are estimates rather than certificates; the
benchmark (benchmarks/svd_init.py) reports them next to the true errors. While a matrix's estimate misses its
tolerance, its basis grows by one block (up to ``max_power_iters`` blocks after the first); a bfloat16 basis
whose estimate stops improving (the precision's limit: σ_r too small next to σ₁'s rounding error) is refined in
float32 instead, and a matrix whose float32 estimate then misses goes on alone with float32 products from its Ritz
vectors. If the last block still misses, an :class:`SVDAccuracyWarning` gives the figure.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch

InitMethod = Literal["randomized", "exact"]
SketchDtype = Literal["auto", "bfloat16", "float32"]

#: Time of the top-r eigenpairs of an (m, m) Gram matrix (:func:`top_eigenpairs`: LAPACK ssyevr, one thread)
#: divided by that of an (m, m) × (m, m) float32 product: 2.9–3.1 at m = 576, 2.0 at 1024, 1.5 at 2048 on the
#: idle development machine (AMD EPYC; ``python benchmarks/init_cost.py --calibrate`` prints it per shape). With
#: ``RANDOMIZED_OVERHEAD`` and ``RITZ_EIGH_COST`` it reproduces the measured crossovers (below).
EIGH_COST_RATIO = 3.0

#: Time of an (m, n) × (n, k) matrix product in bfloat16 divided by the same in float32 (k = 24 … 192). Measured
#: 0.2–0.35 on the development machine's AMD EPYC (AVX-512 BF16, oneDNN) for 576 × 1536 … 4096 × 11008.
BFLOAT16_PASS_COST = 0.35

#: Measured time of the randomized method's products and orthogonalisations over their operation count below
#: (the copies of a growing basis and the per-call costs make up the difference).
RANDOMIZED_OVERHEAD = 3.0

#: Cost of the Ritz eigenproblems (two accuracy checks on a (K, K) matrix, torch.linalg.eigh) per K³: 3.3 ms
#: for K = 240 on one thread, about 12 K³ multiply-adds of a float32 product each. With the constants above it
#: reproduces, one thread, on this session's idle development machine: SmolLM2-135M's real weights (r = 32: exact
#: 13.6 ms vs randomized 16.4 ms at 576 × 576, 18 vs 43 ms at 1536 × 576; r = 8: randomized 10.9 vs 12.0 ms at
#: 576 × 576) and Llama-7B shapes (11008 × 4096 at r = 128: randomized 2.5 s vs exact 6.5 s; randomized from
#: 1024² at r = 32); ``benchmarks/init_cost.py --calibrate`` times both methods on power-law matrices.
RITZ_EIGH_COST = 24.0

#: The randomized method's cost per matrix beyond the terms above, in the same units: its many small operations
#: (accuracy checks, QRs, the growing basis's copies, the Python between kernels, which two threads share). Fitted
#: to SmolLM2-135M's real weights on 2 threads of two idle machines (``benchmarks/init_cost.py --calibrate``), so
#: that the cheaper method is picked by the geometric mean of the two machines' time ratios randomized / exact:
#: an Intel Xeon (AMX-BF16) at 576 × 576 0.80 (r = 8), 0.84 (r = 16), 1.01 (r = 24), at 1536 × 576 and 576 × 1536
#: 0.93–0.98 (r = 8), 1.19–1.23 (r = 16); an AMD EPYC (AVX-512 BF16) at 576 × 576 0.76–0.94 (r = 8), 1.22–1.33
#: (r = 16), 1.47 (r = 24), at 1536 × 576 1.10 and 576 × 1536 1.22–1.25 (r = 8), 1.56–1.71 (r = 16). The terms above
#: alone predicted 0.28–0.72 there. Any value in (4.3e8, 4.8e8) gives those picks: the exact SVD at r = 8 for the
#: MLP shapes, randomized for 576 × 576 up to r = 8. It is negligible from 1024 × 1024 on (under 10 % of the exact
#: SVD's cost there).
RANDOMIZED_FIXED_COST = 4.5e8

#: Largest stack of float32 weights decomposed as one batched computation (bytes). Stacking amortises the per-call
#: overhead of small matrices; large ones are faster one at a time (two 4096 × 4096 weights at r = 32, one thread:
#: 0.78 s stacked, 0.57 s one after the other).
MAX_BATCH_BYTES = 16 * 2**20

#: A weight with m · n · min(m, n) below this is decomposed with single-threaded kernels even alone (CPU): its
#: products are too small to split across threads, and the pools of torch (OpenMP) and of BLAS, which spin-wait
#: for work between calls, slowed one another (2 cores, median of 20: 192 × 576 15.8 ms against 4.4 ms, 576 × 576
#: 21.0 against 12.7, 1536 × 576 24.1 against 21.4; from 2048 × 2048, 8.6e9, two threads were faster).
SINGLE_THREAD_MAX_WORK = 2**30

#: The exact SVD goes through the Gram matrix while σ_r ≥ this · σ₁: its relative σ error, about
#: eps₃₂ (σ₁/σ_r)² ≈ 1.2e-5 here, stays two orders below the randomized method's tolerance.
GRAM_MIN_RATIO = 0.1


class SVDSpecError(ValueError):
    """An invalid :class:`SVDSpec` field; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


@dataclass(frozen=True)
class SVDSpec:
    """How the top-r SVD is computed: the method and the knobs of the randomized one (validated, hashable).

    Attributes:
        method: "randomized" (block Krylov with an accuracy estimate; the exact SVD where the cost model says it
            is cheaper) or "exact" (the full SVD).
        oversample: Sketch columns per Krylov block beyond r; None: max(16, r // 2).
        power_iters: Krylov blocks always added after the first (q), each two products with the weight.
        max_power_iters: Upper limit of q when a matrix's accuracy estimate asks for more.
        seed: Seed of the Gaussian sketch (a generator on the weight's device).
        sigma_tolerance: Target estimated max relative error of the r singular values.
        subspace_tolerance: Target estimated 1 − mean squared cosine of the principal angles.
        sketch_dtype: Precision of the Krylov products with the weight: "bfloat16" (the final Rayleigh–Ritz step
            and the accuracy estimate stay float32), "float32", or "auto": bfloat16 on CUDA and on CPUs with
            native bfloat16 matrix instructions, float32 elsewhere.

    Example:
        >>> spec = SVDSpec(power_iters=3, seed=1)
        >>> factors = top_r_svd(torch.randn(256, 512), 8, spec)
    """

    method: InitMethod = "randomized"
    oversample: int | None = None
    power_iters: int = 3
    max_power_iters: int = 12
    seed: int = 0
    sigma_tolerance: float = 1e-3
    subspace_tolerance: float = 1e-2
    sketch_dtype: SketchDtype = "auto"

    def __post_init__(self) -> None:
        if self.method not in get_args(InitMethod):
            raise SVDSpecError("method", f"must be one of {get_args(InitMethod)}, got {self.method!r}")
        if self.sketch_dtype not in get_args(SketchDtype):
            raise SVDSpecError(
                "sketch_dtype", f"must be one of {get_args(SketchDtype)}, got {self.sketch_dtype!r}"
            )
        for name in ("oversample", "power_iters", "max_power_iters", "seed"):
            value = getattr(self, name)
            if value is None and name == "oversample":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SVDSpecError(name, f"must be a non-negative integer, got {value!r}")
        if self.max_power_iters < self.power_iters:
            raise SVDSpecError(
                "max_power_iters", f"({self.max_power_iters}) must be ≥ power_iters ({self.power_iters})"
            )
        for name in ("sigma_tolerance", "subspace_tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise SVDSpecError(name, f"must be in (0, 1), got {value!r}")

    def block_width(self, r: int) -> int:
        """Columns per Krylov block, k = r + oversample."""
        return r + (max(16, r // 2) if self.oversample is None else self.oversample)


@dataclass(frozen=True)
class SVDAccuracy:
    """Accuracy of computed top-r factors relative to the exact SVD (estimated or measured).

    Attributes:
        sigma_rel_err: Max over the r singular values of |σ̃ᵢ − σᵢ| / σᵢ.
        subspace_agreement: Mean squared cosine of the principal angles between the computed and the exact
            top-r singular subspaces (1 = identical), ‖U_exactᵀ U‖_F² / r, the lower of the U and V sides.
        power_iters: Krylov blocks added after the first (0 for the exact SVD).
    """

    sigma_rel_err: float
    subspace_agreement: float
    power_iters: int = 0


@dataclass(frozen=True)
class SVDFactors:
    """The top-r SVD W ≈ U diag(sigma) Vh, float32.

    Attributes:
        U: (d_out, r) left singular vectors.
        sigma: (r,) singular values, descending.
        Vh: (r, d_in) right singular vectors, transposed.
        accuracy: The method's own estimate of its accuracy (None when not estimated; exact for "exact").
    """

    U: torch.Tensor
    sigma: torch.Tensor
    Vh: torch.Tensor
    accuracy: SVDAccuracy | None = None


class SVDAccuracyWarning(UserWarning):
    """The randomized SVD could not reach its configured tolerance; the message gives the estimated figures."""


def canonicalize_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair (u_k, v_k) so that the entry of u_k largest in magnitude is positive.

    Singular vectors are defined up to a joint sign; fixing it makes factors comparable across methods and
    reproducible across runs. Works on single (m, r), (r, n) and batched (..., m, r), (..., r, n) factors.
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)  # (..., 1, r)
    signs = torch.sign(U.gather(-2, idx))  # (..., 1, r)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.mT


def resolve_sketch_dtype(spec: SVDSpec, device: torch.device) -> torch.dtype:
    """The dtype of the Krylov products for ``spec`` on ``device`` ("auto" resolved)."""
    if spec.sketch_dtype != "auto":
        return getattr(torch, spec.sketch_dtype)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return torch.bfloat16 if device.type == "cpu" and native else torch.float32


def subspace_agreement(A: torch.Tensor, B: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spans of orthonormal A and B (n, r)."""
    return float((A.double().T @ B.double()).square().sum() / A.shape[1])


def prefers_exact(shape: tuple[int, int], r: int, spec: SVDSpec, device: torch.device | None = None) -> bool:
    """True when the exact SVD of a (m, n) weight is predicted to be cheaper than the randomized method.

    Both costs in units of one multiply-add of a float32 matrix product (m ≤ n). The exact SVD: m² n / 2 for the
    Gram matrix (a symmetric product, BLAS ssyrk) plus ``EIGH_COST_RATIO`` · m³ for its top-r eigenpairs. The
    randomized method, with q = ``power_iters`` + 1 Krylov steps (pretrained weights typically need one adaptive
    block beyond ``power_iters``; SmolLM2-135M's at r = 32: 4.6 on average for power_iters = 3): m n k (2q + 3) for
    the sketch and the steps (times ``BFLOAT16_PASS_COST`` with a bfloat16 sketch, plus m n (k + r) for the float32
    refinement) and m K² for the orthogonalisations (K = k(q + 1)), both times ``RANDOMIZED_OVERHEAD``, plus
    ``RITZ_EIGH_COST`` · K³ for the Ritz eigenproblems, plus ``RANDOMIZED_FIXED_COST`` per matrix.
    """
    m, n = sorted(shape)  # m ≤ n
    k = spec.block_width(r)
    q = spec.power_iters + 1
    width = k * (q + 1)  # K
    if width >= m:  # the Krylov basis would span everything: nothing left to save
        return True
    passes = m * n * k * (2 * q + 3)
    if resolve_sketch_dtype(spec, device or torch.device("cpu")) != torch.float32:
        passes = int(BFLOAT16_PASS_COST * passes) + m * n * (k + r)
    randomized = (
        RANDOMIZED_OVERHEAD * (passes + m * width * width) + RITZ_EIGH_COST * width**3 + RANDOMIZED_FIXED_COST
    )
    return m * m * n / 2 + EIGH_COST_RATIO * m**3 <= randomized


def top_eigenpairs(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The r largest eigenvalues (B, r), descending, and their eigenvectors (B, m, r) of each symmetric M (B, m, m).

    On the CPU, LAPACK's ``ssyevr`` (:func:`_lapack_top_eigenpairs`) computes only those r: the tridiagonal
    reduction plus r eigenvectors, 2–3× faster than the full eigendecomposition at m = 576. Elsewhere (CUDA) the
    batched full ``torch.linalg.eigh``. Each matrix's result depends only on that matrix.
    """
    if M.device.type != "cpu":
        evals, evecs = torch.linalg.eigh(M)  # ascending
        return evals.flip(-1)[..., :r], evecs.flip(-1)[..., :r]
    pairs = [_lapack_top_eigenpairs(x.copy(), r) for x in M.detach().float().numpy()]
    evals = torch.stack([torch.from_numpy(w) for w, _ in pairs]).to(M.dtype)  # (B, r) descending
    evecs = torch.stack([torch.from_numpy(v) for _, v in pairs]).to(M.dtype)  # (B, m, r)
    return evals, evecs


def _lapack_top_eigenpairs(G: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The top r eigenvalues (r,), descending, and eigenvectors (m, r) of a symmetric float32 G (m, m), which is
    overwritten.

    LAPACK ``ssyevr`` from scipy's table of LAPACK function pointers (``scipy.linalg.cython_lapack``), called
    through ctypes, which releases the GIL for the call: ``scipy.linalg.eigh`` holds it, which serialised the
    threads of :func:`batched_top_r_svd` (two threads took exactly as long as one for SmolLM2-135M's 576 × 576
    Gram matrices). Where scipy has no such table (another build), ``scipy.linalg.eigh`` with the same driver.
    """
    m = G.shape[0]
    if _ssyevr() is None:
        import scipy.linalg

        w, v = scipy.linalg.eigh(
            G, subset_by_index=[m - r, m - 1], driver="evr", overwrite_a=True, check_finite=False
        )
        return w[::-1].copy(), v[:, ::-1].copy()
    lwork, liwork = _ssyevr_workspace(m)
    w = np.empty(m, np.float32)
    z = np.empty((r, m), np.float32)  # column-major (m, r): row j is eigenvector j
    isuppz = np.empty(2 * r, np.int32)
    work, iwork = np.empty(lwork, np.float32), np.empty(liwork, np.int32)
    found, info = _ssyevr_call(G, m, r, w, z, isuppz, work, lwork, iwork, liwork)
    if info != 0 or found != r:
        raise np.linalg.LinAlgError(
            f"LAPACK ssyevr failed on a {m} × {m} Gram matrix (info={info}, {found} of {r})"
        )
    return w[:r][::-1].copy(), z[::-1].T.copy()


@functools.cache
def _ssyevr_workspace(m: int) -> tuple[int, int]:
    """ssyevr's optimal work sizes for order m (a workspace query; the blocked reduction needs the larger one)."""
    w, z = np.empty(m, np.float32), np.empty((1, m), np.float32)
    work, iwork = np.empty(1, np.float32), np.empty(1, np.int32)
    _ssyevr_call(np.eye(m, dtype=np.float32), m, 1, w, z, np.empty(2, np.int32), work, -1, iwork, -1)
    return max(int(work[0]), 26 * m), max(int(iwork[0]), 10 * m)


def _ssyevr_call(
    G: np.ndarray,
    m: int,
    r: int,
    w: np.ndarray,
    z: np.ndarray,
    isuppz: np.ndarray,
    work: np.ndarray,
    lwork: int,
    iwork: np.ndarray,
    liwork: int,
) -> tuple[int, int]:
    """ssyevr(jobz="V", range="I", uplo="U") for the eigenvalues m−r+1 … m; returns (number found, info). (G is
    symmetric and whole; "U" reads it 10–15 % faster than "L" at m = 576.)"""
    c = ctypes
    n, il, iu, lw, liw = (c.c_int(v) for v in (m, m - r + 1, m, lwork, liwork))
    found, info, zero = c.c_int(0), c.c_int(0), c.c_float(0.0)

    def ptr(a: np.ndarray) -> int:
        return a.ctypes.data  # type: ignore[no-any-return]

    _ssyevr()(
        c.byref(c.c_char(b"V")), c.byref(c.c_char(b"I")), c.byref(c.c_char(b"U")), c.byref(n), ptr(G), c.byref(n),
        c.byref(zero), c.byref(zero), c.byref(il), c.byref(iu), c.byref(zero), c.byref(found), ptr(w), ptr(z),
        c.byref(n), ptr(isuppz), ptr(work), c.byref(lw), ptr(iwork), c.byref(liw), c.byref(info),
    )  # fmt: skip
    return found.value, info.value


@functools.cache
def _ssyevr() -> Any:
    """LAPACK's ssyevr as a ctypes function (21 pointer arguments, Fortran convention); None where scipy's Cython
    LAPACK table is not there."""
    return _scipy_function("cython_lapack", "ssyevr", 21)


@functools.cache
def _ssyrk() -> Any:
    """BLAS ssyrk from scipy's table (10 pointer arguments), the same library as :func:`_ssyevr`; or None."""
    return _scipy_function("cython_blas", "ssyrk", 10)


def _scipy_function(table: str, name: str, args: int) -> Any:
    """A function of scipy.linalg's Cython BLAS/LAPACK table as a ctypes function of ``args`` pointers (ctypes
    releases the GIL during the call); None where the table or the function is not there."""
    try:
        import scipy.linalg

        capsule = getattr(scipy.linalg, table).__pyx_capi__[name]
    except (ImportError, AttributeError, KeyError):
        return None
    capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
        ("PyCapsule_GetName", ctypes.pythonapi)
    )
    address = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi)
    )(capsule, capsule_name(capsule))
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * args)(address)


def _gram(a: np.ndarray) -> np.ndarray:
    """a aᵀ (m, m) of a float32 (m, n), for :func:`_lapack_top_eigenpairs`: its upper triangle in column-major
    order is what ssyevr reads.

    BLAS ssyrk from the library of ssyevr itself, where scipy has that table: numpy's ``a @ a.T`` is ssyrk too,
    but from numpy's own OpenBLAS, and alternating two OpenBLAS thread pools (each spin-waits for work after a
    call) slowed a lone matrix's exact SVD on 2 cores (192 × 576: 6.3 ms at best, 31.9 ms median, against 1.0 and
    1.1 ms; 576 × 1536: 22.3 / 40.8 against 15.4 / 16.5 ms).
    """
    m, n = a.shape
    if _ssyrk() is None or _ssyevr() is None:
        return a @ a.T  # a full symmetric matrix (scipy.linalg.eigh reads the lower triangle)
    if a.flags.f_contiguous:  # column-major a itself: C = a aᵀ
        trans, lda = b"N", m
    else:  # row-major a is column-major aᵀ (n, m): C = (aᵀ)ᵀ aᵀ
        a, trans, lda = np.ascontiguousarray(a), b"T", n
    G = np.zeros((m, m), np.float32)  # only the upper triangle (column-major) is written
    c = ctypes
    one, zero = c.c_float(1.0), c.c_float(0.0)
    _ssyrk()(
        c.byref(c.c_char(b"U")), c.byref(c.c_char(trans)), c.byref(c.c_int(m)), c.byref(c.c_int(n)),
        c.byref(one), a.ctypes.data, c.byref(c.c_int(lda)), c.byref(zero), G.ctypes.data, c.byref(c.c_int(m)),
    )  # fmt: skip
    return G


def exact_svd(W: torch.Tensor, r: int) -> list[SVDFactors]:
    """Exact top-r float32 SVD of each (m, n) matrix of W (B, m, n).

    From the top r eigenpairs of the smaller Gram matrix A Aᵀ (A = W oriented so that m ≤ n,
    :func:`top_eigenpairs`): one product with W and a partial (m, m) eigenproblem instead of the full SVD.
    On the CPU the Gram matrix comes from BLAS ssyrk (:func:`_gram`; half the work of a general product: 6 ms
    instead of torch's 12 ms for 576 × 1536, one thread). Squaring costs relative accuracy eps (σ₁/σᵢ)² in σᵢ,
    so a matrix whose σ_r is below ``GRAM_MIN_RATIO`` σ₁ gets the full SVD (torch.linalg.svd) instead.
    """
    A = W.detach().float()
    transposed = A.shape[-2] > A.shape[-1]
    if transposed:
        A = A.mT
    if A.device.type == "cpu":
        evals, U = _cpu_gram_eigenpairs(A, r)
    else:
        evals, U = top_eigenpairs(A @ A.mT, r)  # (B, r) descending, (B, m, r)
    sigma = evals.clamp_min(0).sqrt()  # (B, r)
    Vh = (U.mT @ A) / sigma.clamp_min(torch.finfo(sigma.dtype).tiny).unsqueeze(-1)  # (B, r, n)
    if transposed:
        U, Vh = Vh.mT, U.mT
    squared_ok = sigma[..., -1] >= GRAM_MIN_RATIO * sigma[..., 0]  # (B,)
    if not bool(squared_ok.all()):
        bad = (~squared_ok).nonzero().flatten()
        Uf, sf, Vhf = torch.linalg.svd(W[bad].float(), full_matrices=False)
        U, sigma, Vh = U.clone(), sigma.clone(), Vh.clone()
        U[bad], sigma[bad], Vh[bad] = Uf[..., :r], sf[..., :r], Vhf[..., :r, :]
    U, Vh = canonicalize_signs(U, Vh)
    exact = SVDAccuracy(0.0, 1.0, 0)
    return [
        SVDFactors(U[b].contiguous(), sigma[b].contiguous(), Vh[b].contiguous(), exact) for b in range(len(W))
    ]


def _cpu_gram_eigenpairs(A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_eigenpairs` of A Aᵀ for each (m, n) matrix of a CPU float32 A (B, m, n), matrix by matrix."""
    pairs = []
    for a in A.numpy():
        w, v = _lapack_top_eigenpairs(_gram(a), r)
        pairs.append((torch.from_numpy(w), torch.from_numpy(v)))
    return torch.stack([w for w, _ in pairs]), torch.stack([v for _, v in pairs])


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y).Q


class _KrylovCopy:
    """The weights as the Krylov products use them: cast to the sketch dtype, in their own (d_out, d_in)
    orientation, row-major. For a tall weight that is Aᵀ, and the products are arranged so that no large operand
    is transposed (in bfloat16 that kernel is 14–20× slower, measured at 4096 × 11008); casting without
    transposing also takes a quarter of the time (73 ms instead of 280 ms for 11008 × 4096). The orientation
    depends only on the shape, so a matrix gets the same products alone or in a stack."""

    def __init__(self, W: torch.Tensor, dtype: torch.dtype, transposed: bool) -> None:
        self.holds_at = transposed  # T is Aᵀ (B, n, m), else A (B, m, n)
        self.T = W.to(dtype, memory_format=torch.contiguous_format)

    def times(self, X: torch.Tensor) -> torch.Tensor:
        """A X (B, m, k) in float32 for X (n, k) or (B, n, k)."""
        X = X.to(self.T.dtype)
        out = (X.mT.contiguous() @ self.T).mT if self.holds_at else self.T @ X
        return out.float()

    def aat(self, Q: torch.Tensor) -> torch.Tensor:
        """A Aᵀ Q (B, m, k) in float32, two products with the copy."""
        Q = Q.to(self.T.dtype)
        if self.holds_at:  # T = Aᵀ: A (Aᵀ Q) = ((T Q)ᵀ T)ᵀ
            return (((self.T @ Q).mT.contiguous()) @ self.T).mT.float()
        return (self.T @ (Q.mT @ self.T).mT).float()

    def select(self, rows: torch.Tensor) -> None:
        self.T = self.T[rows]


def _effective_floor(
    AAt: torch.Tensor, basis: torch.Tensor, Ub: torch.Tensor, s_all: torch.Tensor, k: int
) -> torch.Tensor:
    """(B, 1): the value below which the spectrum outside the Krylov basis is taken to lie. The basis's smallest
    Ritz value, unless Ritz vectors beyond the leading k have not converged (estimated angle ≥ 1 to the floor):
    then the true spectrum near their values is not captured, and the largest of them is taken instead. On the
    flat spectra of SmolLM2-135M's up_proj weights at r = 8, the smallest Ritz value put the floor at 0.23 σ₈ where
    true singular vectors near 0.95 σ₈ were still 0.2 away from the basis, and the estimate claimed 0.992 against
    a true 0.987."""
    floor = s_all[..., -1:]  # (B, 1)
    mu = s_all[..., k:].clamp_min(torch.finfo(s_all.dtype).tiny)  # (B, K − k)
    if not mu.shape[-1]:
        return floor
    Z = basis @ Ub[..., k:]  # (B, m, K − k)
    res = torch.linalg.vector_norm((AAt @ Ub[..., k:]) / mu.unsqueeze(-2) - Z * mu.unsqueeze(-2), dim=-2)
    loose = res >= (mu - floor)
    return torch.maximum(floor, torch.where(loose, mu, torch.zeros_like(mu)).amax(-1, keepdim=True))


def _estimates(
    res: torch.Tensor,
    s: torch.Tensor,
    r: int,
    floor: torch.Tensor,
    rest: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated max relative σ error and subspace agreement (B,) of the top r of k ≥ r Ritz triplets.

    Args:
        res: (B, k) residual norms ‖A vᵢ − σ̃ᵢ uᵢ‖ of the leading k triplets.
        s: (B, k) their values, descending.
        r: How many of them are wanted.
        floor: (B, 1) the singular value below which the rest of the spectrum is assumed to lie.
        rest: Where the triplets come from a k-column subspace of a larger basis: ``(c, mu)``, the residuals'
            components (B, K − k, k) along the basis's other Ritz vectors and those vectors' values (B, K − k).
    """
    tiny = torch.finfo(s.dtype).tiny
    # Rayleigh–Ritz leaves a Ritz vector's error, to first order, outside the subspace it was taken from: the
    # residual's component along a singular direction of value μ turns it by that component over σ̃ᵢ − μ. Those
    # directions lie below ``floor``, except the larger basis's other Ritz vectors (``rest``), whose values are known.
    # d (B, k): each triplet's estimated distance from the subspace.
    sq, gap = res.square(), (s - floor).clamp_min(tiny)  # (B, k)
    if rest is None:
        sigma_err = torch.minimum(res, sq / gap)
        d2 = sq / gap.square()
    else:
        c, mu = rest
        near = (s[..., None, :] - mu[..., :, None]).clamp_min(tiny)  # (B, K − k, k)
        outside = (sq - c.square().sum(-2)).clamp_min(0)  # (B, k): the rest of each residual, below the floor
        sigma_err = torch.minimum(res, (c.square() / near).sum(-2) + outside / gap)
        d2 = (c / near).square().sum(-2) + outside / gap.square()
    # Wanted vector i also turns towards each unwanted singular vector wⱼ (j > r) the subspace holds, by ⟨ρᵢ, wⱼ⟩ /
    # (λᵢ − λⱼ) (λ = σ² the eigenvalues of A Aᵀ, ρ = A Aᵀ u − λ u = σ̃ times the residual). ρᵢ is orthogonal to the
    # subspace, so ⟨ρᵢ, wⱼ⟩ ≤ ‖ρᵢ‖ dⱼ: second order, unless σ_{r+1} nearly equals σ_r. Some of SmolLM2-135M's weights
    # have (σ₈ − σ₉) / σ₈ below 0.1 %; there the first term alone said 0.9997 where the true top-8 agreement was
    # 0.967. The first term counted that share of ρᵢ at the gap to the floor; the excess is added. λⱼ is taken at
    # the top of its own error bar, σ̃ⱼ + its σ error (Ritz values only ever underestimate): at the Ritz value, a
    # 1536 × 576 up_proj at r = 8 and oversample 8, whose Ritz σ̃₉ / σ̃₈ = 0.9959 stood for a true 0.9990 (a quarter
    # of the gap) with σ̃₉'s error 0.0085 σ̃₈, was estimated at 0.994 against a true 0.963.
    lam, rho2, d2_rest = s.square(), sq * s.square(), d2[..., r:].clamp_max(1.0)  # (B, k), (B, k), (B, k − r)
    lam_up = (s[..., r:] + sigma_err[..., r:]).square()  # (B, k − r): the largest λⱼ within its error
    near_lam = (
        (lam[..., :r, None] - lam_up[..., None, :])
        .clamp_min(lam[..., :r, None] * torch.finfo(s.dtype).eps)
        .reciprocal()
        .square()
    )  # (B, r, k − r)
    far_lam = (lam[..., :r] - floor.square()).clamp_min(tiny).reciprocal().square()[..., None]  # (B, r, 1)
    sin2 = d2[..., :r] + rho2[..., :r] * (d2_rest[..., None, :] * (near_lam - far_lam).clamp_min(0)).sum(-1)
    agreement = 1.0 - sin2.clamp_max(1.0).mean(-1)  # (B,)
    return (sigma_err[..., :r] / s[..., :r]).amax(-1), agreement


def _rayleigh_ritz(
    A: torch.Tensor, Y: torch.Tensor, r: int, floor: torch.Tensor, Z: torch.Tensor, mu: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The top-r (U, sigma, Vh) of A (B, m, n) restricted to span(Y) (B, m, k), in float32, with the estimated
    σ error and subspace agreement (B,). Y and Z (B, m, K − k) are the leading and the other Ritz vectors of a
    larger basis, ``mu`` (B, K − k) the values of Z's and ``floor`` (B, 1) its smallest (:func:`_estimates`)."""
    P = Y.mT @ A  # (B, k, n)
    evals, evecs = torch.linalg.eigh(P @ P.mT)  # ascending, (B, k), (B, k, k)
    s = evals.flip(-1).clamp_min(0).sqrt()  # (B, k) descending
    Ub = evecs.flip(-1)  # (B, k, k)
    U = Y @ Ub  # (B, m, k)
    Vh = (Ub.mT @ P) / s.clamp_min(torch.finfo(s.dtype).tiny).unsqueeze(-1)  # (B, k, n): Aᵀuᵢ = σ̃ᵢ vᵢ exactly
    R = A @ Vh.mT - U * s.unsqueeze(-2)  # (B, m, k) the residuals A vᵢ − σ̃ᵢ uᵢ, orthogonal to span(Y)
    res = torch.linalg.vector_norm(R, dim=-2)  # (B, k)
    rest = (Z.mT @ R, mu)  # (B, K − k, k)
    return (U[..., :r], s[..., :r], Vh[..., :r, :], *_estimates(res, s, r, floor, rest))


def randomized_svd(W: torch.Tensor, r: int, spec: SVDSpec | None = None) -> list[SVDFactors]:
    """Top-r SVD of each (m, n) matrix of W (B, m, n) by block Krylov iteration, with an accuracy estimate.

    Deterministic under ``spec.seed`` on a given device, and independent of the other matrices in the batch: a
    matrix whose estimate misses a tolerance grows its own basis. A matrix whose basis would span its whole
    column space gets the exact SVD instead. Warns (:class:`SVDAccuracyWarning`) with the estimated figures
    when ``max_power_iters`` blocks do not reach the tolerances.
    """
    spec = spec or SVDSpec()
    factors = _krylov(W, r, spec)
    for f in factors:
        acc = f.accuracy
        if acc is not None and not _meets(acc, spec):
            warnings.warn(
                f"OSoRA randomized SVD of a {tuple(W.shape[-2:])} weight at r={r} after {acc.power_iters} Krylov "
                f"blocks: estimated max relative singular-value error {acc.sigma_rel_err:.2e} (tolerance "
                f"{spec.sigma_tolerance:.0e}), subspace agreement {acc.subspace_agreement:.4f} (tolerance "
                f"{1 - spec.subspace_tolerance:.4f}). Raise svd_oversample or svd_max_power_iters, or use "
                "init_method='exact'.",
                SVDAccuracyWarning,
                stacklevel=3,
            )
    return factors


def _krylov(
    W: torch.Tensor, r: int, spec: SVDSpec, start: torch.Tensor | None = None, q: int = 0
) -> list[SVDFactors]:
    """:func:`randomized_svd` without the warning. ``start`` (B, m, k): a float32 run from this basis instead of
    the sketch, its first block counted as block ``q``."""
    A = W.detach().float()
    transposed = A.shape[-2] > A.shape[-1]
    if transposed:  # work in the smaller dimension: the basis lives in R^m, m ≤ n
        A = A.mT
    B, m, n = A.shape
    k = spec.block_width(r)
    if k >= m:
        return exact_svd(W, r)
    dtype = torch.float32 if start is not None else resolve_sketch_dtype(spec, A.device)
    S = _KrylovCopy(W.detach(), dtype, transposed)
    generator = torch.Generator(device=A.device).manual_seed(spec.seed)
    omega = torch.randn(n, k, generator=generator, device=A.device)  # (n, k), same for every matrix
    basis = _orth(S.times(omega))  # (B, m, K), K grows by k per block
    if start is not None:
        # The sketch is kept in the start: the estimate (:func:`_estimates`) takes the spectrum outside the basis to
        # lie below its floor, which holds for a basis grown from a random block, whose every singular direction
        # has a share of it, but not from Ritz vectors alone, where a direction nearly absent from the start stays
        # absent. Started from the refined Ritz vectors only, SmolLM2-135M's layer-4 up_proj (1536 × 576, r = 8,
        # oversample 8) was estimated at 0.9968 against a true agreement of 0.9881; with the sketch added, 0.9974
        # against 0.9951.
        basis = _orth(_orth(start) + basis)
    AAt = S.aat(basis)  # (B, m, K): A Aᵀ basis, the next Krylov block and the Ritz residuals
    out: list[SVDFactors | None] = [None] * B
    # the matrices still iterating (rows of A; their rows of S, basis and AAt follow them), and each one's σ error
    # estimate at the last check
    todo = torch.arange(B, device=A.device)
    previous = torch.full((B,), torch.inf, device=A.device)
    while True:
        if q >= spec.power_iters:
            # Rayleigh–Ritz on the Krylov basis: G = basisᵀ A Aᵀ basis, Ritz vectors u = basis y, and the residual
            # of the triplet (u, σ̃, Aᵀu / σ̃) is A Aᵀ u / σ̃ − σ̃ u, from AAt without another product with A
            G = basis.mT @ AAt  # (B, K, K)
            evals, evecs = torch.linalg.eigh((G + G.mT) / 2)  # ascending
            s_all = evals.flip(-1).clamp_min(0).sqrt()  # (B, K) descending
            Ub = evecs.flip(-1)  # (B, K, K)
            # the leading k triplets: the top r and the unwanted ones nearest them (:func:`_estimates`)
            s = s_all[..., :k].clamp_min(torch.finfo(s_all.dtype).tiny)  # (B, k)
            U = basis @ Ub[..., :k]  # (B, m, k)
            res = torch.linalg.vector_norm(
                (AAt @ Ub[..., :k]) / s.unsqueeze(-2) - U * s.unsqueeze(-2), dim=-2
            )
            floor = s_all[..., -1:]  # (B, 1)
            sigma_err, agreement = _estimates(res, s, r, floor)
            met = _met(sigma_err, agreement, spec)
            full = basis.shape[-1] + k >= m  # one more block would span the whole column space
            last = q >= spec.max_power_iters
            # a low-precision basis whose estimate stopped improving (less than halved by the last block) is at the
            # precision's limit: refine it in float32 now rather than add blocks
            stalled = (sigma_err > previous / 2) if dtype != torch.float32 else torch.zeros_like(met)
            previous = sigma_err
            # the matrices about to finish: their estimates again, with the floor that the basis's unconverged Ritz
            # vectors allow (:func:`_effective_floor`; computed only here, where it decides)
            check = (met | full | last | stalled).nonzero().flatten()
            if len(check):
                floor = floor.clone()
                floor[check] = _effective_floor(AAt[check], basis[check], Ub[check], s_all[check], k)
                sigma_err[check], agreement[check] = _estimates(res[check], s[check], r, floor[check])
                met = _met(sigma_err, agreement, spec)
            U, s = U[..., :r], s[..., :r]
            ready = (met | full | last | stalled).nonzero().flatten()
            if len(ready):
                # the finishing products read A's rows in place, one batched call per run of consecutive rows
                # (gathering them was a tenth of the time at 1536 × 576, r = 8)
                parts = []
                for a, b, A_run in _runs(A, todo[ready].tolist()):
                    at = ready[a:b]
                    if dtype == torch.float32:  # the Ritz triplets are the answer: Vh = Uᵀ A / σ̃
                        Vh = (U[at].mT @ A_run) / s[at].unsqueeze(-1)
                        # (the last entry stands in for Y, which only the low-precision path goes on from)
                        parts.append((U[at], s[at], Vh, sigma_err[at], agreement[at], U[at]))
                    else:  # refine in float32 on the top-k Ritz vectors of the low-precision basis (B', m, k)
                        Y_Z = basis[at] @ Ub[at]  # (B', m, K): the leading k Ritz vectors and the others
                        Y, Z, mu = Y_Z[..., :k], Y_Z[..., k:], s_all[at][..., k:]
                        parts.append((*_rayleigh_ritz(A_run, Y, r, floor[at], Z, mu), Y))
                U, s, Vh, sigma_err, agreement, Y = (
                    torch.cat(t) if len(t) > 1 else t[0] for t in zip(*parts)
                )
                good = _met(sigma_err, agreement, spec)
            finished = torch.zeros(len(todo), dtype=torch.bool, device=A.device)
            for j, i in enumerate(ready.tolist()):
                if not bool(good[j]) and not last and not full:
                    if dtype == torch.float32:
                        continue  # the float32 estimate asks for another block
                    # The low-precision estimate was met (or stalled) but the float32 one misses: the bfloat16
                    # products cannot resolve this matrix's top r (a steep spectrum at large r: σ_r near σ₁'s
                    # rounding error, where more blocks barely help: a 4096² weight with σᵢ ∝ i^-0.7 at r = 128 took
                    # 12 blocks, 14.7 s). It goes on alone in float32 from its refined Ritz vectors.
                    row = int(todo[i])
                    finished[i] = True
                    (out[row],) = _krylov(W[row : row + 1], r, spec, start=Y[j : j + 1], q=q + 1)
                    continue
                finished[i] = True
                if not bool(good[j]) and not last:  # the exact SVD costs about as much now
                    row = int(todo[i])
                    out[row] = exact_svd(A[row : row + 1].mT if transposed else A[row : row + 1], r)[0]
                    continue
                accuracy = SVDAccuracy(float(sigma_err[j]), float(agreement[j]), q)
                out[int(todo[i])] = _canonical(U[j], s[j], Vh[j], accuracy, transposed)
            keep = (~finished).nonzero().flatten()
            if not len(keep):
                break
            if len(keep) < len(todo):
                todo, basis, AAt, previous = todo[keep], basis[keep], AAt[keep], previous[keep]
                S.select(keep)
        # next Krylov block: A Aᵀ times the last one, orthogonalised twice against the whole basis (fp32 CGS2)
        Z = AAt[..., -k:]  # (B, m, k)
        for _ in range(2):
            Z = Z - basis @ (basis.mT @ Z)
        block = _orth(Z)
        basis, AAt = torch.cat([basis, block], -1), torch.cat([AAt, S.aat(block)], -1)
        q += 1
    return [f for f in out if f is not None]


def _runs(A: torch.Tensor, rows: list[int]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """For ascending ``rows`` of A: each run of consecutive ones as (start, end) positions in ``rows`` and the view
    of A's matrices it covers."""
    start = 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or rows[end] != rows[end - 1] + 1:
            yield start, end, A[rows[start] : rows[end - 1] + 1]
            start = end


def _met(sigma_err: torch.Tensor, agreement: torch.Tensor, spec: SVDSpec) -> torch.Tensor:
    return (sigma_err <= spec.sigma_tolerance) & (1.0 - agreement <= spec.subspace_tolerance)


def _canonical(
    U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, accuracy: SVDAccuracy, transposed: bool
) -> SVDFactors:
    if transposed:  # the SVD of Aᵀ: swap the sides back
        U, Vh = Vh.T, U.T
    U, Vh = canonicalize_signs(U, Vh)
    return SVDFactors(U.contiguous(), s.contiguous(), Vh.contiguous(), accuracy)


def _meets(acc: SVDAccuracy, spec: SVDSpec) -> bool:
    return (
        acc.sigma_rel_err <= spec.sigma_tolerance and 1.0 - acc.subspace_agreement <= spec.subspace_tolerance
    )


def batched_top_r_svd(
    W: torch.Tensor | Sequence[torch.Tensor], r: int, spec: SVDSpec | None = None
) -> list[SVDFactors]:
    """Top-r SVD of each (d_out, d_in) matrix of W, float32 on W's device, one factors object per matrix.

    The matrices are decomposed in stacks of at most ``MAX_BATCH_BYTES`` (one batched computation each; a single
    float32 matrix is used in place, not copied). On the CPU, at least ``torch.get_num_threads()`` matrices are
    split into that many parts decomposed in parallel threads, each with single-threaded kernels
    (:func:`single_threaded_kernels`): the matrices here are small enough that splitting the batch uses the cores
    better than splitting each product, and a busy machine does not stall the many small multi-threaded kernels
    (SmolLM2-135M's init: 51 s instead of 67–164 s at a load average of 6 on 2 cores). Fewer matrices than
    threads run with multi-threaded kernels, unless they are small (``SINGLE_THREAD_MAX_WORK``). Each matrix's
    result depends only on the matrix (not on the split or the stack it is in).

    Args:
        W: The weights, all of one shape and device, any floating dtype: a stack (batch, d_out, d_in) or a
            sequence of matrices.
        r: Number of triplets, 1 ≤ r ≤ min(d_out, d_in).
        spec: Method and knobs; ``SVDSpec()`` when None. "randomized" takes the exact SVD for shapes where
            :func:`prefers_exact` says it is cheaper.
    """
    spec = spec or SVDSpec()
    if isinstance(W, torch.Tensor) and W.ndim != 3:
        raise ValueError(f"expected a stack of matrices (batch, d_out, d_in), got shape {tuple(W.shape)}")
    matrices = list(W)
    if not matrices:
        return []
    shape = (matrices[0].shape[0], matrices[0].shape[1])
    if any(m.shape != matrices[0].shape or m.device != matrices[0].device for m in matrices):
        raise ValueError("the matrices of one batched SVD must share one 2-D shape and one device")
    if not 1 <= r <= min(shape):
        raise ValueError(f"r must be in [1, {min(shape)}] for a weight of shape {shape}, got {r}")
    device = matrices[0].device
    exact = spec.method == "exact" or prefers_exact(shape, r, spec, device)
    per_stack = max(1, MAX_BATCH_BYTES // (4 * shape[0] * shape[1]))

    def decompose(part: list[torch.Tensor]) -> list[SVDFactors]:
        out: list[SVDFactors] = []
        for start in range(0, len(part), per_stack):
            chunk = part[start : start + per_stack]
            stack = (
                chunk[0].detach().float()[None] if len(chunk) == 1 else torch.stack(chunk).detach().float()
            )
            out += exact_svd(stack, r) if exact else randomized_svd(stack, r, spec)
        return out

    workers = torch.get_num_threads()
    small = shape[0] * shape[1] * min(shape) < SINGLE_THREAD_MAX_WORK
    if device.type != "cpu" or (len(matrices) < workers and not small):
        return decompose(matrices)  # too few matrices for every thread: split each product
    with single_threaded_kernels():
        if workers == 1 or len(matrices) < workers:
            return decompose(matrices)
        from concurrent.futures import ThreadPoolExecutor

        bounds = [len(matrices) * i // workers for i in range(workers + 1)]
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(decompose, [matrices[i:j] for i, j in zip(bounds, bounds[1:])]))
    return [f for part in parts for f in part]


@contextmanager
def single_threaded_kernels() -> Iterator[None]:
    """torch's intra-op threads and the BLAS under scipy's LAPACK set to one thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas_pools().limit(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _blas_pools() -> Any:
    """threadpoolctl's controller of the loaded BLAS libraries, listed once: ``threadpool_limits`` lists them on
    every call (about 2 ms, once per matrix where layers decompose their weights one by one). scipy.linalg is
    imported first, so that its OpenBLAS, the one LAPACK runs on here, is among them."""
    import scipy.linalg  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def top_r_svd(W: torch.Tensor, r: int, spec: SVDSpec | None = None) -> SVDFactors:
    """Top-r SVD of one weight W (d_out, d_in); the same factors as :func:`batched_top_r_svd` gives for it."""
    return batched_top_r_svd(W.unsqueeze(0), r, spec)[0]
