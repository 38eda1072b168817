"""Identical factors on every rank of a torch.distributed job (torchrun, accelerate, DeepSpeed).

Each rank could compute every factor itself, but floating-point results may differ between devices, BLAS builds
and thread counts, and the ranks must train the same model. So each matrix has one owner rank that computes it
(through the factor cache, if any) and broadcasts it; :func:`osora.factors.compute_factors` deals the matrices
out round-robin, so a model's decomposition is split across the ranks instead of all falling on rank 0. Under
DeepSpeed ZeRO-3 a rank holds only a shard of each weight, so the weight is gathered for the decomposition.

Outside an initialised process group (or with one process) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .svd import SVDAccuracy, SVDFactors


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), (0, 1) when not distributed."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


@contextlib.contextmanager
def gathered_parameters(param: torch.nn.Parameter | torch.Tensor) -> Iterator[None]:
    """Gather a ZeRO-3 partitioned parameter in full for the block (read-only); a no-op for ordinary tensors.

    A collective under ZeRO-3: every rank must enter it, in the same order.
    """
    if not is_partitioned(param):
        yield
        return
    import deepspeed  # only reachable when DeepSpeed created the parameter

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        yield


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter (DeepSpeed marks them with ``ds_id``)."""
    return hasattr(param, "ds_id")


def _comm_device(like: torch.device) -> torch.device:
    if dist.get_backend() == "nccl":  # NCCL only moves CUDA tensors
        return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")  # gloo and mpi: CPU tensors


def broadcast_factors(
    factors: list[SVDFactors] | None,
    count: int,
    shape: tuple[int, int],
    r: int,
    device: torch.device,
    src: int,
) -> list[SVDFactors]:
    """Rank ``src``'s ``count`` factors of (d_out, d_in) weights, on every rank, in one broadcast.

    Args:
        factors: The factors on rank ``src`` (ignored elsewhere).
        count: How many; known to every rank.
        shape: (d_out, d_in), known to every rank.
        r: Number of triplets.
        device: Where the returned factors live.
        src: The computing rank.
    """
    d_out, d_in = shape
    sizes = [d_out * r, r, r * d_in, 3]  # U, sigma, Vh, accuracy (σ error, agreement, iterations; nan: none)
    comm = _comm_device(device)
    if dist.get_rank() == src:
        assert factors is not None and len(factors) == count
        rows = []
        for f in factors:
            acc = f.accuracy or SVDAccuracy(float("nan"), float("nan"), -1)
            stats = torch.tensor(
                [acc.sigma_rel_err, acc.subspace_agreement, acc.power_iters], device=f.U.device
            )
            rows.append(torch.cat([f.U.flatten(), f.sigma, f.Vh.flatten(), stats.float()]))
        packed = torch.stack(rows).to(comm, torch.float32).contiguous()  # (count, sum(sizes))
    else:
        packed = torch.empty(count, sum(sizes), device=comm)
    dist.broadcast(packed, src=src)
    out = []
    for row in packed.to(device):
        U, sigma, Vh, stats = row.split(sizes)
        err, agreement, iters = stats.tolist()
        accuracy = None if iters < 0 else SVDAccuracy(err, agreement, int(iters))
        out.append(SVDFactors(U.view(d_out, r).clone(), sigma.clone(), Vh.view(r, d_in).clone(), accuracy))
    return out
