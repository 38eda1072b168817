"""The one path to the frozen factors: cache, batched SVD per shape, and the split across torch.distributed ranks.

:func:`compute_factors` takes the weights to decompose, the rank r and an :class:`osora.svd.SVDSpec`. Each
weight's factors come from the factor cache when it holds them; the rest are grouped by shape and decomposed by
:func:`osora.svd.batched_top_r_svd` (batched computations of equal shapes, split across the CPU's threads).
Under torch.distributed the weights of each shape are dealt out round-robin: every rank decomposes its share and
broadcasts it (:mod:`osora.distributed`), so every rank ends with bit-identical factors.

:class:`osora.OSoRAModel` calls it once per injected adapter with every targeted weight; a layer that was not
covered (an adapter added to one layer, a ZeRO-3 partitioned weight) calls it with its own weight alone. Both give
the same factors (a matrix's result does not depend on the batch it is in).
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Sequence

import torch

from .checkpoint import weight_fingerprint
from .distributed import broadcast_factors, rank_and_world
from .factor_cache import FactorCache, cache_key
from .svd import SVDFactors, SVDSpec, batched_top_r_svd, single_threaded_kernels


def compute_factors(
    weights: Sequence[torch.Tensor],
    r: int,
    spec: SVDSpec,
    cache_dir: str | os.PathLike[str] | None = None,
    fingerprints: Sequence[torch.Tensor] | None = None,
    names: Sequence[str] | None = None,
) -> list[SVDFactors]:
    """Top-r float32 factors of each (d_out, d_in) weight, on the weight's device, in the order given.

    Under torch.distributed every rank must call this with the same weights (a collective).

    Args:
        weights: The dense weights, any floating dtype, any mix of shapes and devices.
        r: Number of triplets, 1 ≤ r ≤ min(d_out, d_in) for every weight.
        spec: How the SVD is computed.
        cache_dir: Factor cache directory (:mod:`osora.factor_cache`); None: no cache.
        fingerprints: :func:`osora.checkpoint.weight_fingerprint` of each weight as stored, for the cache keys;
            computed from ``weights`` when None.
        names: The weights' module names, for the error about a non-finite weight.

    Raises:
        ValueError: A weight has NaN or infinite entries (its SVD is undefined); the message names it.
    """
    # the sum is NaN or infinite when an entry is (one pass, 25× faster than isfinite().all()); on one thread: the
    # first multi-threaded kernel after the SVD's threads waited 0.1–0.2 s for OpenMP's workers (SmolLM2-135M)
    with (
        single_threaded_kernels() if weights and weights[0].device.type == "cpu" else contextlib.nullcontext()
    ):
        finite = [bool(torch.isfinite(w.detach().sum())) for w in weights]
    for i, w in enumerate(weights):
        if not finite[i] and not bool(torch.isfinite(w.detach()).all()):
            bad = int((~torch.isfinite(w.detach())).sum())
            name = f"the weight of {names[i]}" if names is not None else "a targeted weight"
            raise ValueError(
                f"OSoRA cannot decompose {name} {tuple(w.shape)}: it has {bad} NaN or infinite entries, and the "
                "SVD of a non-finite matrix is undefined. Check the base checkpoint (a failed load or an "
                "overflowed merge)."
            )
    cache = None if cache_dir is None else FactorCache(cache_dir)
    rank, world = rank_and_world()
    groups: dict[tuple[tuple[int, int], torch.device], list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        groups[((w.shape[0], w.shape[1]), w.device)].append(i)
    out: list[SVDFactors | None] = [None] * len(weights)
    for (shape, device), members in groups.items():
        mine = members[rank::world]  # round-robin: the ranks' shares of one shape cost about the same
        got = _cached_or_computed(
            [weights[i] for i in mine], r, spec, cache, shape, device, fingerprints, mine
        )
        if world == 1:
            for i, f in zip(mine, got):
                out[i] = f
            continue
        for src in range(world):
            share = members[src::world]
            if share:
                received = broadcast_factors(got if src == rank else None, len(share), shape, r, device, src)
                for i, f in zip(share, received):
                    out[i] = f
    return [f for f in out if f is not None]


def _cached_or_computed(
    weights: list[torch.Tensor],
    r: int,
    spec: SVDSpec,
    cache: FactorCache | None,
    shape: tuple[int, int],
    device: torch.device,
    fingerprints: Sequence[torch.Tensor] | None,
    indices: list[int],
) -> list[SVDFactors]:
    """The factors of equal-shape ``weights`` (positions ``indices`` in the caller's list): cached, else batched."""
    keys: list[dict[str, str] | None] = [None] * len(weights)
    out: list[SVDFactors | None] = [None] * len(weights)
    if cache is not None:
        for j, (i, w) in enumerate(zip(indices, weights)):
            fingerprint = weight_fingerprint(w) if fingerprints is None else fingerprints[i]
            keys[j] = cache_key(fingerprint, shape, r, spec, device.type)
            out[j] = cache.load(keys[j], device=device)  # type: ignore[arg-type]
    todo = [j for j, f in enumerate(out) if f is None]
    computed = batched_top_r_svd([weights[j] for j in todo], r, spec) if todo else []
    for j, f in zip(todo, computed):
        out[j] = f
        if cache is not None:
            cache.save(keys[j], f)  # type: ignore[arg-type]
    return [f for f in out if f is not None]
