"""Adapter files: integrity checks, base-weight fingerprints and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FINGERPRINT_BYTES = 32


class AdapterFileError(ValueError):
    """An adapter file is missing, truncated or corrupt, or does not fit the model it is loaded onto."""


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """SHA-256 of a weight's shape, dtype and bytes, as a uint8 tensor of 32 entries (on the CPU).

    Compact adapter files store one per adapted matrix: their factors are recomputed from the base weight on
    load, which is only exact if the base is bit-identical to the one the adapter was trained on.
    """
    h = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}|".encode())
    data = weight.detach().contiguous().cpu()
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def read_adapter_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors adapter file whole, or raise :class:`AdapterFileError` naming the file and the fault."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterFileError(
            f"adapter file {path} ({path.stat().st_size} bytes) is truncated or corrupt: {err}"
        ) from err
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"adapter file {path} is corrupt: tensor {key} holds non-finite values")
    return tensors


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a directory's files into a temporary sibling, then move each into place with ``os.replace``.

    A crash mid-write leaves the previous files untouched; every file that lands is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        path.mkdir(exist_ok=True)
        for root, _, files in os.walk(tmp):
            rel = Path(root).relative_to(tmp)
            (path / rel).mkdir(parents=True, exist_ok=True)
            for name in files:
                os.replace(Path(root) / name, path / rel / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model: torch.nn.Module, save_directory: str | os.PathLike[str], **kwargs: object) -> None:
    """``PeftModel.save_pretrained`` made atomic: files are written elsewhere, then moved into place."""
    with atomic_directory(save_directory) as tmp:
        model.save_pretrained(str(tmp), **kwargs)  # type: ignore[operator]
