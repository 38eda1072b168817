"""A directory of top-r factors, so that initialising the same base weights again is near-instant.

One safetensors file per entry, named by a hash of its key: the fingerprint of the stored weight
(:func:`osora.checkpoint.weight_fingerprint`), its shape, r, the method and its knobs, and the device type
(factors are bit-reproducible per device type, not across them). The key and a SHA-256 of the factors are
stored in the file's metadata; an entry whose key or checksum does not match, or that cannot be read, is
reported, recomputed and overwritten. Files are written atomically, so concurrent writers cannot leave a
partial entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import atomic_save_file
from .svd import InitMethod, SVDAccuracy, SVDFactors, SVDOptions, top_r_svd

#: Bumped when the entry layout changes; older entries then count as stale.
CACHE_FORMAT = "1"
_TENSORS = ("U", "sigma", "Vh")


def cache_key(
    fingerprint: torch.Tensor,
    shape: tuple[int, int],
    r: int,
    method: InitMethod,
    options: SVDOptions,
    device_type: str,
) -> dict[str, str]:
    """Everything the factors depend on, as the string metadata stored with an entry."""
    knobs = dataclasses.asdict(options) if method != "exact" else {}
    return {
        "format": CACHE_FORMAT,
        "fingerprint": bytes(fingerprint.cpu().tolist()).hex(),
        "shape": f"{shape[0]}x{shape[1]}",
        "r": str(r),
        "method": method,
        "options": json.dumps(knobs, sort_keys=True),
        "device_type": device_type,
    }


def factors_checksum(factors: SVDFactors) -> str:
    """SHA-256 of the bytes of U, sigma and Vh (in that order)."""
    h = hashlib.sha256()
    for name in _TENSORS:
        h.update(getattr(factors, name).detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FactorCache:
    """Factors on disk, one file per key.

    Example:
        >>> cache = FactorCache("~/.cache/osora")  # doctest: +SKIP
        >>> factors = cache.get_or_compute(W, r=32, method="randomized", options=SVDOptions(), fingerprint=fp)
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, key: dict[str, str]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
        return self.directory / f"{digest}.safetensors"

    def load(self, key: dict[str, str], device: torch.device | str = "cpu") -> SVDFactors | None:
        """The entry for ``key``, or None when it is missing, unreadable, stale or fails its checksum (warned)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                factors = SVDFactors(f.get_tensor("U"), f.get_tensor("sigma"), f.get_tensor("Vh"))
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            return self._reject(path, f"unreadable ({err})")
        stale = {k: (meta.get(k), v) for k, v in key.items() if meta.get(k) != v}
        if stale:
            return self._reject(path, f"stale (key mismatch: {stale})")
        if meta.get("checksum") != factors_checksum(factors):
            return self._reject(path, "corrupt (checksum mismatch)")
        accuracy = None
        if "accuracy" in meta:
            accuracy = SVDAccuracy(**json.loads(meta["accuracy"]))
        return SVDFactors(factors.U.to(device), factors.sigma.to(device), factors.Vh.to(device), accuracy)

    def save(self, key: dict[str, str], factors: SVDFactors) -> None:
        meta = {**key, "checksum": factors_checksum(factors)}
        if factors.accuracy is not None:
            meta["accuracy"] = json.dumps(dataclasses.asdict(factors.accuracy))
        atomic_save_file({name: getattr(factors, name) for name in _TENSORS}, self.path(key), metadata=meta)

    def get_or_compute(
        self,
        W: torch.Tensor,
        r: int,
        method: InitMethod,
        options: SVDOptions,
        fingerprint: torch.Tensor,
        svd: Callable[..., SVDFactors] | None = None,
    ) -> SVDFactors:
        """The cached factors of W if a valid entry exists; otherwise compute them (``svd``, default
        :func:`osora.svd.top_r_svd`) and store them."""
        key = cache_key(fingerprint, (W.shape[0], W.shape[1]), r, method, options, W.device.type)
        factors = self.load(key, device=W.device)
        if factors is None:
            factors = (svd or top_r_svd)(W, r, method, options)
            self.save(key, factors)
        return factors

    @staticmethod
    def _reject(path: Path, why: str) -> None:
        warnings.warn(f"OSoRA factor cache entry {path} is {why}; recomputing it", stacklevel=3)
        return None


def cached_top_r_svd(
    W: torch.Tensor,
    r: int,
    method: InitMethod,
    options: SVDOptions,
    cache_dir: str | os.PathLike[str] | None,
    fingerprint: torch.Tensor,
    svd: Callable[..., SVDFactors] | None = None,
) -> SVDFactors:
    """``svd`` (default :func:`osora.svd.top_r_svd`) through the cache in ``cache_dir`` (none when None)."""
    if cache_dir is None:
        return (svd or top_r_svd)(W, r, method, options)
    return FactorCache(cache_dir).get_or_compute(W, r, method, options, fingerprint, svd)
