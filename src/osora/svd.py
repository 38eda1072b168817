"""Top-r singular triplets of a weight matrix, the factors OSoRA freezes.

Every method computes in float32 on the weight's own device and returns factors with canonical signs, so the
same weight always gives the same factors on a given device (which compact adapter files rely on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

InitMethod = Literal["exact"]


@dataclass(frozen=True)
class SVDFactors:
    """The top-r SVD W ≈ U diag(sigma) Vh, float32.

    Attributes:
        U: (d_out, r) left singular vectors.
        sigma: (r,) singular values, descending.
        Vh: (r, d_in) right singular vectors, transposed.
    """

    U: torch.Tensor
    sigma: torch.Tensor
    Vh: torch.Tensor


def canonicalize_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair (u_k, v_k) so that the entry of u_k largest in magnitude is positive.

    Singular vectors are defined up to a joint sign; fixing it makes factors comparable across methods and
    reproducible across runs.
    """
    idx = U.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.unsqueeze(1)


def exact_svd(W: torch.Tensor, r: int) -> SVDFactors:
    """Full float32 SVD (torch.linalg.svd), truncated to the top r triplets."""
    U, sigma, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    U, Vh = canonicalize_signs(U[:, :r], Vh[:r])
    return SVDFactors(U.contiguous(), sigma[:r].contiguous(), Vh.contiguous())


_METHODS = {"exact": exact_svd}


def top_r_svd(W: torch.Tensor, r: int, method: InitMethod = "exact") -> SVDFactors:
    """Top-r SVD of W (d_out, d_in) in float32 on W's device.

    Args:
        W: The weight, any floating dtype.
        r: Number of triplets, 1 ≤ r ≤ min(W.shape).
        method: "exact" (full SVD).
    """
    if not 1 <= r <= min(W.shape):
        raise ValueError(f"r must be in [1, {min(W.shape)}] for a weight of shape {tuple(W.shape)}, got {r}")
    if method not in _METHODS:
        raise ValueError(f"unknown SVD method {method!r}; choose one of {sorted(_METHODS)}")
    return _METHODS[method](W, r)
