# ruff: noqa: E741  (O, S, U are the paper's symbols)
"""A memory-lean, LoRA-shaped autograd path for the OSoRA branch ΔW x (output variant).

With O on the output side, ΔW has rank r and factors like a LoRA update whose down-projection is the frozen Vᵀ:

    ΔW = diag(O) U diag(S) Vᵀ − U diag(σ) Vᵀ = B Vᵀ,   B = U ⊙ ((S − σ)ᵀ + (O − 1) Sᵀ)   (d_out × r)

B is formed from differences, as in :func:`osora.functional.delta_forward`, so it is exactly zero at S = σ, O = 1
and small updates do not cancel. The forward is z = Vᵀx (r numbers per token), then B z. U, Vᵀ, σ are frozen, so
the backward needs only z, never the d_in-wide input x nor any d_out-wide per-token tensor. With
g = ∂L/∂(ΔW x) (tokens × d_out) and M = ∂L/∂B = gᵀz (d_out × r):

    ∂L/∂x = (g B) Vᵀ                  (g B = (S − σ) ⊙ Uᵀg + S ⊙ Uᵀ((O − 1) ⊙ g) = S ⊙ Uᵀ(O ⊙ g) − σ ⊙ Uᵀg)
    ∂L/∂S_k = Σ_j O_j U_jk M_jk       (= Σ_tokens z ⊙ Uᵀ(O ⊙ g))
    ∂L/∂O_j = Σ_k U_jk S_k M_jk       (= Σ_tokens g ⊙ U(S ⊙ z))

That is two products with per-token operands forward and three backward, one fewer than LoRA's backward (Vᵀ
needs no gradient), and no per-token elementwise pass. Autograd on :func:`osora.functional.delta_forward` instead
keeps x (tokens × d_in) for Vᵀx and U(S ⊙ z) (tokens × d_out) for ∂L/∂O.

Dtypes follow :func:`osora.functional.delta_forward`: the projections run in the factors' dtype (the base model's),
the vector arithmetic forming B from S, O, σ in the dtype of S (float32 by default), then B is cast.

``S`` is the *effective* S (:func:`osora.functional.effective_S`): when it is σ ⊙ s, autograd above this function
carries ∂L/∂S on to s. The plain path is used where this one does not apply: the input-side O (its gradient needs x
itself), forward-mode AD, and inside :func:`plain_path` (double backward, ``torch.func`` transforms).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from . import functional as OF

_enabled = True


@contextmanager
def plain_path() -> Iterator[None]:
    """Run the OSoRA branch through plain autograd inside the block.

    Needed for double backward (``create_graph=True`` through ∂L/∂S, ∂L/∂O) and ``torch.func`` transforms, which the
    memory-lean backward does not support.

    Example:
        >>> with osora.autograd.plain_path():  # doctest: +SKIP
        ...     loss = model(**batch).loss
    """
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


class OSoRABranch(torch.autograd.Function):
    """ΔW x (output variant) that saves z = Vᵀx (tokens × r) for backward, plus U, Vᵀ, B, S and O (no per-token)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        U: torch.Tensor,
        Vh: torch.Tensor,
        sigma: torch.Tensor,
        S: torch.Tensor,
        O: torch.Tensor,
    ) -> torch.Tensor:
        z = F.linear(x.to(Vh.dtype), Vh)  # (..., r)
        B = OF.low_rank_factors(U, Vh, sigma, S, O)[0].to(Vh.dtype)  # (d_out, r): ΔW = B Vᵀ
        ctx.save_for_backward(z, U, Vh, B, S, O)
        ctx.x_dtype = x.dtype
        return F.linear(z, B)  # (..., d_out)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True: ∂L/∂S and ∂L/∂O depend on x through z, which is saved without its graph, so a
            # second derivative would silently miss terms (``once_differentiable`` would drop them unnoticed).
            raise RuntimeError(
                "OSoRA's memory-lean backward is not twice differentiable; run the forward pass inside "
                "osora.autograd.plain_path() for double backward"
            )
        z, U, Vh, B, S, O = ctx.saved_tensors
        need_x, need_S, need_O = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        r = z.shape[-1]
        g2 = g.reshape(-1, g.shape[-1])  # (tokens, d_out)
        dx = dS = dO = None
        if need_x:
            dz = g2 @ B.to(g2.dtype)  # (tokens, r)
            dx = (dz.to(Vh.dtype) @ Vh).view(*g.shape[:-1], Vh.shape[1]).to(ctx.x_dtype)  # (..., d_in)
        if need_S or need_O:
            # z is narrower than g under autocast, which is off in backward
            M = (g2.T @ z.reshape(-1, r).to(g2.dtype)).to(S.dtype)  # (d_out, r): ∂L/∂B = Σ_tokens g zᵀ
            UM = U.to(S.dtype) * M  # (d_out, r)
            dS = O.to(S.dtype) @ UM if need_S else None  # (r,)
            dO = (UM @ S).to(O.dtype) if need_O else None  # (d_out,)
        return dx, None, None, None, dS, dO


def delta_forward(
    x: torch.Tensor,
    U: torch.Tensor,
    Vh: torch.Tensor,
    sigma: torch.Tensor,
    S: torch.Tensor,
    O: torch.Tensor,
    o_dim: OF.ODim = "output",
) -> torch.Tensor:
    """ΔW x like :func:`osora.functional.delta_forward`, trained through :class:`OSoRABranch` where it applies.

    Args:
        x: The branch input (..., d_in), after dropout.
        U: Left singular vectors (d_out, r).
        Vh: Right singular vectors, transposed (r, d_in).
        sigma: Frozen singular values (r,).
        S: Effective trained singular values (r,).
        O: Trained scale (d_out,) for ``o_dim="output"``, (d_in,) for "input".
        o_dim: Which side O scales.

    Returns:
        ΔW x, (..., d_out), in the factors' dtype.
    """
    if o_dim != "output" or not _enabled or getattr(forward_ad, "_current_level", -1) >= 0:
        return OF.delta_forward(x, U, Vh, sigma, S, O, o_dim)
    return OSoRABranch.apply(x, U, Vh, sigma, S, O)
