"""Identical factors on every rank of a torch.distributed job (torchrun, accelerate, DeepSpeed).

Each rank could compute the factors itself, but floating-point results may differ between devices, BLAS
builds and thread counts, and the ranks must train the same model. So rank 0 computes (through the factor
cache, if any) and broadcasts; the other ranks allocate buffers of the known shapes and receive. Under
DeepSpeed ZeRO-3 a rank holds only a shard of each weight, so the weight is gathered for the decomposition.

Outside an initialised process group (or with one process) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from .svd import SVDAccuracy, SVDFactors


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def gathered_parameters(param: torch.nn.Parameter | torch.Tensor) -> Iterator[None]:
    """Gather a ZeRO-3 partitioned parameter in full for the block (read-only); a no-op for ordinary tensors.

    A collective under ZeRO-3: every rank must enter it, in the same order.
    """
    if not hasattr(param, "ds_id"):  # DeepSpeed marks its partitioned parameters with ds_id
        yield
        return
    import deepspeed  # only reachable when DeepSpeed created the parameter

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        yield


def _comm_device(like: torch.device) -> torch.device:
    if dist.get_backend() == "nccl":  # NCCL only moves CUDA tensors
        return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")  # gloo and mpi: CPU tensors


def broadcast_factors(
    compute: Callable[[], SVDFactors], shape: tuple[int, int], r: int, device: torch.device, src: int = 0
) -> SVDFactors:
    """``compute()`` on rank ``src``, its factors broadcast to every rank; just ``compute()`` when not distributed.

    Args:
        compute: Returns the factors of the (d_out, d_in) weight; called on rank ``src`` only.
        shape: (d_out, d_in), known to every rank.
        r: Number of triplets.
        device: Where the returned factors live.
        src: The computing rank.
    """
    if not is_distributed():
        return compute()
    comm = _comm_device(device)
    d_out, d_in = shape
    if dist.get_rank() == src:
        factors = compute()
        acc = factors.accuracy or SVDAccuracy(float("nan"), float("nan"), -1)
        tensors = [t.to(comm, torch.float32).contiguous() for t in (factors.U, factors.sigma, factors.Vh)]
        stats = torch.tensor([acc.sigma_rel_err, acc.subspace_agreement, acc.power_iters], device=comm)
    else:
        tensors = [torch.empty(s, device=comm) for s in ((d_out, r), (r,), (r, d_in))]
        stats = torch.empty(3, device=comm)
    for t in (*tensors, stats):
        dist.broadcast(t, src=src)
    sigma_err, agreement, iters = stats.tolist()
    accuracy = None if iters < 0 else SVDAccuracy(sigma_err, agreement, int(iters))
    U, sigma, Vh = (t.to(device) for t in tensors)
    return SVDFactors(U, sigma, Vh, accuracy)
