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

The user's W is never modified: the layer adds ΔW x to W x, with ΔW = W' − W = B A of rank ≤ r
(:func:`low_rank_factors`, the one definition of ΔW: forward, merge and export all use it). For the output variant

    B = diag(O) U diag(S) − U diag(σ) = U ⊙ ((S − σ)ᵀ + (O − 1) Sᵀ)   (d_out, r),   A = Vᵀ   (r, d_in)

B is built from *differences* that are exactly zero at initialisation, so the branch is exactly zero there in any
precision, and small updates do not suffer cancellation against the large W x. The forward B (A x) is two
products, like LoRA's, and A = Vᵀ is frozen, so autograd keeps z = A x (r numbers per token) for backward.
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
    """ΔW x = B (A x) for a batch x (..., d_in), with (B, A) = :func:`low_rank_factors`; (..., d_out).

    ΔW is never formed. Both products run in the factors' dtype (the base model's); B and A are built from S, O,
    σ in the dtype of S (float32 by default), then cast. Plain autograd keeps what a LoRA branch keeps, less:

    - output: A = Vᵀ is frozen, so the first product saves nothing per token; the second saves z = A x, r numbers
      per token (∂L/∂B = gᵀz). Neither x nor any d_out-wide per-token tensor is kept.
    - input: A holds O, so ∂L/∂A = (g B)ᵀ x needs x itself (the layer's input, not a copy), plus nothing else
      per token (B = U is frozen).

    Double backward, forward-mode AD and ``torch.func`` work as for any autograd function.
    """
    cdtype = Vh.dtype
    B, A = low_rank_factors(U, Vh, sigma, S, O, o_dim)  # (d_out, r), (r, d_in)
    z = F.linear(x.to(cdtype), A.to(cdtype))  # (..., r)
    return F.linear(z, B.to(cdtype))  # (..., d_out)


def residual_weight(W: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The paper's residual base W − U diag(σ) Vᵀ (float32), for the residual export."""
    return W.float() - (U.float() * sigma.float()) @ Vh.float()
