"""The OSoRA update, as pure functions.

OSoRA (Output-dimension and Singular-value initialized Low-Rank Adaptation, https://arxiv.org/abs/2505.14350)
adapts a pretrained weight W (d_out × d_in) through its own top-r SVD, W ≈ U_r diag(σ_r) V_rᵀ:

    W' = W − U_r diag(σ_r) V_rᵀ + diag(O) U_r diag(S) V_rᵀ

Symbols and shapes (the tensor names used throughout the package):

    osora_U      U_r   (d_out, r)   frozen buffer, left singular vectors
    osora_Vh     V_rᵀ  (r, d_in)    frozen buffer, right singular vectors (transposed)
    osora_sigma  σ_r   (r,)         frozen buffer, singular values
    osora_S      S     (r,)         trainable, initialised to σ_r
    osora_O      O     (d_out,)     trainable, initialised to ones

At initialisation (S = σ, O = 1) W' = W exactly. The ablation ``o_dim="input"`` puts O on the input side,
W' = W − U diag(σ) Vᵀ + U diag(S) Vᵀ diag(O) with O ∈ R^d_in. The ``"scaled"`` parametrisation trains s with
S = σ ⊙ s (s initialised to ones): the same model family with scale-free optimisation geometry.

The user's W is never modified: the layer adds ΔW x to W x, with ΔW = W' − W. For the output variant, with
z = Vᵀx,

    ΔW x = U((S − σ) ⊙ z) + (O − 1) ⊙ U(S ⊙ z)

Both terms are products of *differences* that are exactly zero at initialisation, so the branch is exactly zero
there in any precision, and small updates do not suffer cancellation against the large W x.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ODim = Literal["output", "input"]
SParametrization = Literal["raw", "scaled"]


def effective_S(S: torch.Tensor, sigma: torch.Tensor, parametrization: SParametrization) -> torch.Tensor:
    """The singular values S that enter the equation, from the trained tensor ``osora_S``.

    Args:
        S: The trained vector (r,): S itself ("raw") or the relative scale s ("scaled").
        sigma: The frozen singular values σ (r,).
        parametrization: "raw" (S trained directly, the paper's choice) or "scaled" (S = σ ⊙ s).
    """
    return S if parametrization == "raw" else sigma.to(S.dtype) * S


def delta_weight(
    U: torch.Tensor,
    Vh: torch.Tensor,
    sigma: torch.Tensor,
    S: torch.Tensor,
    O: torch.Tensor,
    o_dim: ODim = "output",
) -> torch.Tensor:
    """ΔW = W' − W, shape (d_out, d_in), computed in float32.

    output: ΔW = diag(O) U diag(S) Vᵀ − U diag(σ) Vᵀ = U diag(S − σ) Vᵀ + diag(O − 1) U diag(S) Vᵀ
    input:  ΔW = U diag(S) Vᵀ diag(O) − U diag(σ) Vᵀ = U diag(S − σ) Vᵀ + U diag(S) Vᵀ diag(O − 1)

    ``S`` is the effective S (see :func:`effective_S`). Written in the difference form so that ΔW is exactly
    zero at initialisation.
    """
    B, A = low_rank_factors(U.float(), Vh.float(), sigma.float(), S.float(), O.float(), o_dim)
    return B @ A


def low_rank_factors(
    U: torch.Tensor,
    Vh: torch.Tensor,
    sigma: torch.Tensor,
    S: torch.Tensor,
    O: torch.Tensor,
    o_dim: ODim = "output",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with ΔW = B A, rank ≤ r, in the dtype of S (the one definition of ΔW in the package).

    output: B = diag(O) U diag(S) − U diag(σ) = U ⊙ ((S − σ)ᵀ + (O − 1) Sᵀ)    (d_out, r),  A = Vᵀ
    input:  B = U,  A = diag(S) Vᵀ diag(O) − diag(σ) Vᵀ = diag(S − σ) Vᵀ + diag(S) Vᵀ diag(O − 1)    (r, d_in)

    Both are built from differences, so they are exactly zero at initialisation.
    """
    dtype = S.dtype
    U, Vh, sigma, O = U.to(dtype), Vh.to(dtype), sigma.to(dtype), O.to(dtype)
    if o_dim == "output":
        return U * ((S - sigma) + (O - 1.0).unsqueeze(1) * S), Vh
    return U, (S - sigma).unsqueeze(1) * Vh + S.unsqueeze(1) * Vh * (O - 1.0)


def delta_forward(
    x: torch.Tensor,
    U: torch.Tensor,
    Vh: torch.Tensor,
    sigma: torch.Tensor,
    S: torch.Tensor,
    O: torch.Tensor,
    o_dim: ODim = "output",
) -> torch.Tensor:
    """ΔW x for a batch x (..., d_in) without forming ΔW; returns (..., d_out) in the factors' dtype.

    The two frozen projections run in the factors' dtype (the base model's); the vector arithmetic runs in the
    dtype of S and O (float32 by default). U is applied once, to the two r-wide columns stacked.
    """
    cdtype = Vh.dtype
    sigma = sigma.to(S.dtype)
    if o_dim == "output":
        z = F.linear(x.to(cdtype), Vh).to(S.dtype)  # (..., r)
        ab = torch.stack(((S - sigma) * z, S * z), dim=-2)  # (..., 2, r)
        ua, ub = F.linear(ab.to(cdtype), U).unbind(-2)  # 2 × (..., d_out)
        return ua + ((O - 1.0) * ub.to(O.dtype)).to(cdtype)
    # input side: ΔW x = U((S − σ) ⊙ Vᵀx + S ⊙ Vᵀ((O − 1) ⊙ x))
    xs = torch.stack((x.to(O.dtype), (O - 1.0) * x.to(O.dtype)), dim=-2)  # (..., 2, d_in)
    z, zo = F.linear(xs.to(cdtype), Vh).to(S.dtype).unbind(-2)  # 2 × (..., r)
    return F.linear(((S - sigma) * z + S * zo).to(cdtype), U)


def residual_weight(W: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The paper's residual base W − U diag(σ) Vᵀ (float32), for the residual export."""
    return W.float() - (U.float() * sigma.float()) @ Vh.float()
