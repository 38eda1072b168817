"""A directory of top-r factors, so that initialising the same base weights again is near-instant.

Read and written by :func:`osora.factors.compute_factors`, the one path to the factors.

One safetensors file per entry, named by a hash of its key: the fingerprint of the stored weight
(:func:`osora.checkpoint.weight_fingerprint`), its shape, r, the SVD spec (method and knobs), and the device type
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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import atomic_save_file
from .svd import SVDAccuracy, SVDFactors, SVDSpec

#: Bumped when the entry layout or the algorithm changes; older entries then count as stale. 4: the exact path
#: through ssyrk + ssyevr, the float32 continuation of the Krylov method; 5: the cost model refitted (the exact SVD
#: for more shapes at small r), small lone matrices on single-threaded kernels.
CACHE_FORMAT = "5"
_TENSORS = ("U", "sigma", "Vh")


def cache_key(
    fingerprint: torch.Tensor, shape: tuple[int, int], r: int, spec: SVDSpec, device_type: str
) -> dict[str, str]:
    """Everything the factors depend on, as the string metadata stored with an entry."""
    knobs = dataclasses.asdict(spec) if spec.method != "exact" else {"method": "exact"}
    return {
        "format": CACHE_FORMAT,
        "fingerprint": bytes(fingerprint.cpu().tolist()).hex(),
        "shape": f"{shape[0]}x{shape[1]}",
        "r": str(r),
        "spec": json.dumps(knobs, sort_keys=True),
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
        >>> key = cache_key(weight_fingerprint(W), tuple(W.shape), 32, SVDSpec(), "cpu")  # doctest: +SKIP
        >>> cache.load(key) or cache.save(key, top_r_svd(W, 32))  # doctest: +SKIP
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

    @staticmethod
    def _reject(path: Path, why: str) -> None:
        warnings.warn(f"OSoRA factor cache entry {path} is {why}; recomputing it", stacklevel=3)
        return None
