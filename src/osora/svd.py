"""Top-r singular triplets of a weight matrix, the factors OSoRA freezes.

Every method computes in float32 on the weight's own device and returns factors with canonical signs, so the
same weight always gives the same factors on a given device (which compact adapter files rely on).

Two methods:

- ``"exact"``: the full SVD (torch.linalg.svd), truncated. O(m n min(m, n)); ~15 s for 4096² on 2 CPU cores.
- ``"randomized"``: subspace iteration on a random sketch (Halko, Martinsson & Tropp 2011, Alg. 4.4) with
  Rayleigh–Ritz extraction: a Gaussian test matrix Ω (d_in, k), k = r + oversample, drawn from a seeded
  generator on the weight's device; Q = orth(W Ω); ``power_iters`` times Q = orth(W orth(Wᵀ Q)); then the
  SVD of the small k × d_in matrix Qᵀ W. O(m n k (2q + 1)). The i-th direction converges like
  (σ_{k+1} / σ_i)^(2q+1), so oversampling and iterations trade time for accuracy.

The randomized method checks its own result from the residuals of the Ritz triplets, rᵢ = W vᵢ − σ̃ᵢ uᵢ (Wᵀuᵢ
= σ̃ᵢ vᵢ holds exactly by construction), at the cost of one (d_out, d_in) × (d_in, r) product:

- singular values: |σᵢ − σ̃ᵢ| ≲ min(‖rᵢ‖, ‖rᵢ‖² / gapᵢ) (residual and quadratic residual bounds);
- subspace: sin θᵢ ≲ ‖rᵢ‖ / gapᵢ (Wedin's theorem per direction), reported as the estimated mean squared
  cosine of the principal angles, 1 − mean sin²θᵢ;

with gapᵢ = σ̃ᵢ − σ̃_k: Rayleigh–Ritz leaves the error of a Ritz vector, to first order, outside the sketch,
among directions whose singular values are at most about σ̃_k.

The gaps are taken from the Ritz values themselves, so these are estimates rather than certificates; the
benchmark (benchmarks/svd_init.py) reports them next to the true errors. While an estimate misses its
tolerance, more iterations run (up to ``max_power_iters``); if it still misses, a warning gives the figure.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

InitMethod = Literal["randomized", "exact"]

#: Below this ratio of sketch width to min(d_out, d_in) the randomized method pays off; above it the full SVD
#: is about as cheap (and exact), so "randomized" computes it instead.
DENSE_FALLBACK_RATIO = 0.25


@dataclass(frozen=True)
class SVDAccuracy:
    """Accuracy of computed top-r factors relative to the exact SVD (estimated or measured).

    Attributes:
        sigma_rel_err: Max over the r singular values of |σ̃ᵢ − σᵢ| / σᵢ.
        subspace_agreement: Mean squared cosine of the principal angles between the computed and the exact
            top-r singular subspaces (1 = identical), ‖U_exactᵀ U‖_F² / r, the lower of the U and V sides.
        power_iters: Power iterations run (0 for the exact SVD).
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


@dataclass(frozen=True)
class SVDOptions:
    """Knobs of the randomized method (ignored by "exact"); see :class:`osora.OSoRAConfig` for their help.

    Attributes:
        oversample: Extra sketch columns beyond r; None: max(32, r // 2).
        power_iters: Power iterations always run.
        max_power_iters: Upper limit when the accuracy estimate asks for more.
        seed: Seed of the Gaussian test matrix (a generator on the weight's device).
        sigma_tolerance: Target max relative error of the singular values.
        subspace_tolerance: Target 1 − mean squared cosine of the principal angles.
    """

    oversample: int | None = None
    power_iters: int = 4
    max_power_iters: int = 16
    seed: int = 0
    sigma_tolerance: float = 1e-3
    subspace_tolerance: float = 1e-2

    @classmethod
    def from_config(cls, config: Any) -> SVDOptions:
        """The knobs of an :class:`osora.OSoRAConfig` (its ``svd_*`` fields)."""
        return cls(
            oversample=config.svd_oversample,
            power_iters=config.svd_power_iters,
            max_power_iters=config.svd_max_power_iters,
            seed=config.svd_seed,
            sigma_tolerance=config.svd_sigma_tolerance,
            subspace_tolerance=config.svd_subspace_tolerance,
        )


def canonicalize_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair (u_k, v_k) so that the entry of u_k largest in magnitude is positive.

    Singular vectors are defined up to a joint sign; fixing it makes factors comparable across methods and
    reproducible across runs.
    """
    idx = U.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.unsqueeze(1)


def subspace_agreement(A: torch.Tensor, B: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spans of orthonormal A and B (n, r)."""
    return float((A.double().T @ B.double()).square().sum() / A.shape[1])


def exact_svd(W: torch.Tensor, r: int, options: SVDOptions | None = None) -> SVDFactors:
    """Full float32 SVD (torch.linalg.svd), truncated to the top r triplets. ``options`` are ignored."""
    U, sigma, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    U, Vh = canonicalize_signs(U[:, :r], Vh[:r])
    return SVDFactors(U.contiguous(), sigma[:r].contiguous(), Vh.contiguous(), SVDAccuracy(0.0, 1.0, 0))


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y).Q


def _ritz(A: torch.Tensor, Q: torch.Tensor, r: int, iters: int) -> SVDFactors:
    """Rayleigh–Ritz on span(Q) (d_out, k): the top-r triplets of A with their accuracy estimate."""
    Ub, s, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)  # (k, k), (k,), (k, d_in)
    U = Q @ Ub[:, :r]  # (d_out, r)
    Vh = Vh[:r]  # (r, d_in)
    res = torch.linalg.vector_norm(A @ Vh.T - U * s[:r], dim=0)  # (r,) ‖W vᵢ − σ̃ᵢ uᵢ‖
    sr = s[:r]
    # Rayleigh–Ritz makes uᵢ orthogonal to the other k − 1 Ritz vectors, so its error lies (to first order)
    # outside span(Q), along directions of singular value ≲ σ̃_k: that is the gap that matters.
    gap = (sr - s[-1]).clamp_min(torch.finfo(s.dtype).tiny)  # (r,)
    sigma_err = torch.minimum(res, res.square() / gap) / sr
    sin2 = (res / gap).clamp_max(1.0).square()
    accuracy = SVDAccuracy(float(sigma_err.max()), float(1.0 - sin2.mean()), iters)
    return SVDFactors(U, sr, Vh, accuracy)


def randomized_svd(W: torch.Tensor, r: int, options: SVDOptions | None = None) -> SVDFactors:
    """Top-r SVD by randomized subspace iteration, with a residual-based accuracy estimate.

    Deterministic under ``options.seed`` on a given device. Falls back to :func:`exact_svd` when the sketch
    would be at least ``DENSE_FALLBACK_RATIO`` of min(d_out, d_in) wide. Warns (:class:`SVDAccuracyWarning`)
    with the estimated figures when ``max_power_iters`` iterations do not reach the tolerances.
    """
    opts = options or SVDOptions()
    A = W.detach().float()  # (d_out, d_in)
    k = r + (max(32, r // 2) if opts.oversample is None else opts.oversample)
    if k >= DENSE_FALLBACK_RATIO * min(A.shape):
        return exact_svd(A, r)
    generator = torch.Generator(device=A.device).manual_seed(opts.seed)
    omega = torch.randn(A.shape[1], k, generator=generator, device=A.device, dtype=A.dtype)  # (d_in, k)
    Q = _orth(A @ omega)  # (d_out, k)
    for _ in range(opts.power_iters):
        Q = _orth(A @ _orth(A.T @ Q))  # re-orthonormalised each half step: fp32 keeps the small directions
    iters = opts.power_iters
    factors = _ritz(A, Q, r, iters)
    while not _meets(factors.accuracy, opts) and iters < opts.max_power_iters:
        Q = _orth(A @ _orth(A.T @ Q))
        iters += 1
        factors = _ritz(A, Q, r, iters)
    acc = factors.accuracy
    assert acc is not None
    if not _meets(acc, opts):
        warnings.warn(
            f"OSoRA randomized SVD of a {tuple(A.shape)} weight at r={r} after {iters} power iterations: "
            f"estimated max relative singular-value error {acc.sigma_rel_err:.2e} (tolerance "
            f"{opts.sigma_tolerance:.0e}), subspace agreement {acc.subspace_agreement:.4f} (tolerance "
            f"{1 - opts.subspace_tolerance:.4f}). Raise svd_oversample or svd_max_power_iters, or use "
            "init_method='exact'.",
            SVDAccuracyWarning,
            stacklevel=3,
        )
    U, Vh = canonicalize_signs(factors.U, factors.Vh)
    return SVDFactors(U.contiguous(), factors.sigma.contiguous(), Vh.contiguous(), acc)


def _meets(acc: SVDAccuracy | None, opts: SVDOptions) -> bool:
    return acc is not None and (
        acc.sigma_rel_err <= opts.sigma_tolerance and 1.0 - acc.subspace_agreement <= opts.subspace_tolerance
    )


class SVDAccuracyWarning(UserWarning):
    """The randomized SVD could not reach its configured tolerance; the message gives the estimated figures."""


_METHODS = {"exact": exact_svd, "randomized": randomized_svd}


def top_r_svd(
    W: torch.Tensor, r: int, method: InitMethod = "randomized", options: SVDOptions | None = None
) -> SVDFactors:
    """Top-r SVD of W (d_out, d_in) in float32 on W's device.

    Args:
        W: The weight, any floating dtype.
        r: Number of triplets, 1 ≤ r ≤ min(W.shape).
        method: "randomized" (subspace iteration with an accuracy estimate) or "exact" (full SVD).
        options: Knobs of the randomized method; defaults of :class:`SVDOptions` when None.
    """
    if not 1 <= r <= min(W.shape):
        raise ValueError(f"r must be in [1, {min(W.shape)}] for a weight of shape {tuple(W.shape)}, got {r}")
    if method not in _METHODS:
        raise ValueError(f"unknown SVD method {method!r}; choose one of {sorted(_METHODS)}")
    return _METHODS[method](W, r, options)
