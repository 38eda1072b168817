"""Top-r singular triplets of weight matrices, the factors OSoRA freezes, computed a batch of equal shapes at once.

Every method computes in float32 on the weights' device and returns factors with canonical signs. Each matrix's
result depends only on the matrix and the :class:`SVDSpec` (its random sketch is drawn from the spec's seed, not
from its position in a batch), so the same weight gives the same factors whether it is decomposed alone or
stacked with others (``tests/test_factors.py`` checks this), which compact adapter files rely on.

Two methods, chosen per shape:

- ``"exact"``: the full SVD (torch.linalg.svd, batched), truncated. O(m n min(m, n)).
- ``"randomized"``: block Krylov iteration on a seeded Gaussian sketch (Halko, Martinsson & Tropp 2011, §4.4;
  Musco & Musco 2015) with Rayleigh–Ritz extraction. With A = W oriented so that m ≤ n, Ω (n, k) Gaussian,
  k = r + oversample: Q₀ = orth(A Ω), Q_j = orth((I − P) A Aᵀ Q_{j−1}) against all earlier blocks, and the
  top-r triplets of A restricted to span(Q₀ … Q_q). A Krylov basis keeps every block, where plain subspace
  iteration keeps only the last: on the slowly decaying spectra of pretrained weights it reaches a given
  accuracy in far fewer products with W (SmolLM2-135M's matrices, r=32: 2–3 blocks instead of 16 iterations).
  O(m n k (2q + 2)) plus the QRs and a small (K × K, K = k(q + 1)) eigenproblem.

``"randomized"`` computes the exact SVD instead for the shapes where the cost model (:func:`prefers_exact`)
predicts it is cheaper: small matrices, or a sketch that is not much narrower than the matrix.

The randomized method checks its own result from the residuals of the Ritz triplets, rᵢ = W vᵢ − σ̃ᵢ uᵢ (Wᵀuᵢ
= σ̃ᵢ vᵢ holds exactly by construction), at the cost of one (m, n) × (n, r) product:

- singular values: |σᵢ − σ̃ᵢ| ≲ min(‖rᵢ‖, ‖rᵢ‖² / gapᵢ) (residual and quadratic residual bounds);
- subspace: sin θᵢ ≲ ‖rᵢ‖ / gapᵢ (Wedin's theorem per direction), reported as the estimated mean squared
  cosine of the principal angles, 1 − mean sin²θᵢ;

with gapᵢ = σ̃ᵢ − σ̃_K, the smallest Ritz value of the basis: Rayleigh–Ritz leaves the error of a Ritz vector,
to first order, outside the basis, among directions whose singular values are at most about σ̃_K.

The gaps are taken from the Ritz values themselves, so these are estimates rather than certificates; the
benchmark (benchmarks/svd_init.py) reports them next to the true errors. While a matrix's estimate misses its
tolerance, its basis grows by one block (up to ``max_power_iters`` blocks after the first); if it still misses,
an :class:`SVDAccuracyWarning` gives the figure.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, get_args

import torch

InitMethod = Literal["randomized", "exact"]

#: Time of the exact SVD of an (m, n) matrix divided by that of an (m, n) × (n, min(m, n)) matrix product, both
#: float32 on one CPU thread. Measured 7–9 for 192 × 576 … 4096² on the 2-core development machine with
#: ``python benchmarks/init_cost.py --calibrate`` (which prints the ratio per shape); the cost model needs its
#: order of magnitude only, as the two costs differ by a factor of min(m, n) / (k (2q + 2)).
EXACT_COST_RATIO = 8.0


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

    def __post_init__(self) -> None:
        if self.method not in get_args(InitMethod):
            raise SVDSpecError("method", f"must be one of {get_args(InitMethod)}, got {self.method!r}")
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


def subspace_agreement(A: torch.Tensor, B: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spans of orthonormal A and B (n, r)."""
    return float((A.double().T @ B.double()).square().sum() / A.shape[1])


def prefers_exact(shape: tuple[int, int], r: int, spec: SVDSpec) -> bool:
    """True when the exact SVD of a (m, n) weight is predicted to be cheaper than the randomized method.

    Both costs in units of one multiply-add of a float32 matrix product: the exact SVD costs
    ``EXACT_COST_RATIO`` · m n min(m, n); the randomized method m n k (2q + 3) for the sketch, the q Krylov
    steps, the Rayleigh–Ritz projection (K = k(q + 1) columns, counted as q + 1 blocks) and the residual, plus
    min(m, n) K² for the orthogonalisations. q is ``power_iters``; the adaptive extra blocks are not predicted.
    """
    m, n = sorted(shape)  # m ≤ n
    k = spec.block_width(r)
    width = k * (spec.power_iters + 1)  # K
    if width >= m:  # the Krylov basis would span everything: nothing left to save
        return True
    randomized = m * n * k * (2 * spec.power_iters + 3) + m * width * width
    return EXACT_COST_RATIO * m * n * m <= randomized


def exact_svd(W: torch.Tensor, r: int) -> list[SVDFactors]:
    """Full float32 SVD of each (m, n) matrix of W (B, m, n), truncated to the top r triplets."""
    U, sigma, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    U, Vh = canonicalize_signs(U[..., :r], Vh[..., :r, :])
    exact = SVDAccuracy(0.0, 1.0, 0)
    return [
        SVDFactors(U[b].contiguous(), sigma[b, :r].contiguous(), Vh[b].contiguous(), exact)
        for b in range(len(W))
    ]


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y).Q


def _ritz(
    A: torch.Tensor, basis: torch.Tensor, P: torch.Tensor, G: torch.Tensor, r: int
) -> tuple[torch.Tensor, ...]:
    """Rayleigh–Ritz on span(basis) (B, m, K), with P = basisᵀ A (B, K, n) and G = P Pᵀ: the top-r
    (U, sigma, Vh) of A (B, m, n), the estimated σ error and subspace agreement (B,)."""
    # the Ritz values are the singular values of P, the square roots of G's eigenvalues; squaring costs relative
    # accuracy eps (σ₁/σᵢ)² in σᵢ², far below the tolerances for the top r of a weight matrix
    evals, evecs = torch.linalg.eigh(G)  # ascending, (B, K), (B, K, K)
    s_all = evals.flip(-1).clamp_min(0).sqrt()  # (B, K) descending
    Ub = evecs.flip(-1)[..., :r]  # (B, K, r)
    s = s_all[..., :r]  # (B, r)
    U = basis @ Ub  # (B, m, r)
    Vh = (Ub.mT @ P) / s.clamp_min(torch.finfo(s.dtype).tiny).unsqueeze(-1)  # (B, r, n): Aᵀuᵢ = σ̃ᵢ vᵢ exactly
    res = torch.linalg.vector_norm(A @ Vh.mT - U * s.unsqueeze(-2), dim=-2)  # (B, r) ‖A vᵢ − σ̃ᵢ uᵢ‖
    # Rayleigh–Ritz leaves a Ritz vector's error, to first order, outside the basis, among directions of
    # singular value ≲ σ̃_K: that is the gap that matters.
    gap = (s - s_all[..., -1:]).clamp_min(torch.finfo(s.dtype).tiny)  # (B, r)
    sigma_err = (torch.minimum(res, res.square() / gap) / s).amax(-1)  # (B,)
    agreement = 1.0 - (res / gap).clamp_max(1.0).square().mean(-1)  # (B,)
    return U, s, Vh, sigma_err, agreement


def _extend(
    A: torch.Tensor, basis: torch.Tensor, P: torch.Tensor, G: torch.Tensor, block: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the orthonormal ``block`` (B, m, k) to the basis, to P = basisᵀ A and to its Gram G."""
    Pn = block.mT @ A  # (B, k, n)
    cross = Pn @ P.mT  # (B, k, K)
    G = torch.cat([torch.cat([G, cross.mT], -1), torch.cat([cross, Pn @ Pn.mT], -1)], -2)
    return torch.cat([basis, block], -1), torch.cat([P, Pn], -2), G


def randomized_svd(W: torch.Tensor, r: int, spec: SVDSpec | None = None) -> list[SVDFactors]:
    """Top-r SVD of each (m, n) matrix of W (B, m, n) by block Krylov iteration, with an accuracy estimate.

    Deterministic under ``spec.seed`` on a given device, and independent of the other matrices in the batch: a
    matrix whose estimate misses a tolerance grows its own basis. A matrix whose basis would span its whole
    column space gets the exact SVD instead. Warns (:class:`SVDAccuracyWarning`) with the estimated figures
    when ``max_power_iters`` blocks do not reach the tolerances.
    """
    spec = spec or SVDSpec()
    A = W.detach().float()
    transposed = A.shape[-2] > A.shape[-1]
    if transposed:  # work in the smaller dimension: the basis lives in R^m, m ≤ n
        A = A.mT
    B, m, n = A.shape
    k = spec.block_width(r)
    if k >= m:
        return exact_svd(W, r)
    generator = torch.Generator(device=A.device).manual_seed(spec.seed)
    omega = torch.randn(
        n, k, generator=generator, device=A.device, dtype=A.dtype
    )  # (n, k), same for every matrix
    block = _orth(A @ omega)  # (B, m, k)
    P = block.mT @ A  # (B, k, n): basisᵀ A, which also gives the next Krylov step's Aᵀ block
    basis, G = block, P @ P.mT  # (B, m, K), (B, K, K)
    out: list[SVDFactors | None] = [None] * B
    todo = torch.arange(B, device=A.device)  # matrices still iterating, their rows in A, basis, P and G
    q = 0
    while True:
        if q >= spec.power_iters:
            U, s, Vh, sigma_err, agreement = _ritz(A, basis, P, G, r)
            met = (sigma_err <= spec.sigma_tolerance) & (1.0 - agreement <= spec.subspace_tolerance)
            full = basis.shape[-1] + k >= m  # one more block would span the whole column space
            done = met | full if q < spec.max_power_iters else torch.ones_like(met)
            for i in done.nonzero().flatten().tolist():
                if full and not met[i] and q < spec.max_power_iters:  # the exact SVD costs about as much now
                    out[int(todo[i])] = exact_svd(A[i : i + 1].mT if transposed else A[i : i + 1], r)[0]
                    continue
                accuracy = SVDAccuracy(float(sigma_err[i]), float(agreement[i]), q)
                out[int(todo[i])] = _canonical(U[i], s[i], Vh[i], accuracy, transposed)
            keep = (~done).nonzero().flatten()
            if not len(keep):
                break
            todo, A, basis, P, G = todo[keep], A[keep], basis[keep], P[keep], G[keep]
        # next Krylov block: A Aᵀ times the last one, orthogonalised twice against the whole basis (fp32 CGS2)
        Z = A @ P[..., -k:, :].mT  # (B, m, k)
        for _ in range(2):
            Z = Z - basis @ (basis.mT @ Z)
        basis, P, G = _extend(A, basis, P, G, _orth(Z))
        q += 1
    factors = [f for f in out if f is not None]
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


def batched_top_r_svd(W: torch.Tensor, r: int, spec: SVDSpec | None = None) -> list[SVDFactors]:
    """Top-r SVD of each matrix of W (B, d_out, d_in), float32 on W's device, one factors object per matrix.

    Args:
        W: The weights, stacked, any floating dtype.
        r: Number of triplets, 1 ≤ r ≤ min(d_out, d_in).
        spec: Method and knobs; ``SVDSpec()`` when None. "randomized" takes the exact SVD for shapes where
            :func:`prefers_exact` says it is cheaper.
    """
    spec = spec or SVDSpec()
    if W.ndim != 3:
        raise ValueError(f"expected a stack of matrices (batch, d_out, d_in), got shape {tuple(W.shape)}")
    shape = (W.shape[1], W.shape[2])
    if not 1 <= r <= min(shape):
        raise ValueError(f"r must be in [1, {min(shape)}] for a weight of shape {shape}, got {r}")
    if spec.method == "exact" or prefers_exact(shape, r, spec):
        return exact_svd(W, r)
    return randomized_svd(W, r, spec)


def top_r_svd(W: torch.Tensor, r: int, spec: SVDSpec | None = None) -> SVDFactors:
    """Top-r SVD of one weight W (d_out, d_in); the same factors as :func:`batched_top_r_svd` gives for it."""
    return batched_top_r_svd(W.unsqueeze(0), r, spec)[0]
