"""Adapter files: integrity checks, base-weight fingerprints and atomic writes."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

#: Fingerprint algorithm by digest length. XXH3-128 hashes at memory speed (SmolLM2-135M's 210 weights, 425 MB:
#: 0.017 s on one thread, against 0.245 s for SHA-256); adapter files saved before it carry SHA-256 and still verify.
FINGERPRINT_ALGORITHMS = {16: "xxh3_128", 32: "sha256"}
#: Key of the SHA-256 of an adapter file's other ``osora_*`` tensors, written at save and verified on load.
CHECKSUM_KEY = "osora_checksum"


class AdapterFileError(ValueError):
    """An adapter file is missing, truncated or corrupt, or does not fit the model it is loaded onto."""


def weight_fingerprint(weight: torch.Tensor, algorithm: str = "xxh3_128") -> torch.Tensor:
    """Hash of a weight's shape, dtype and bytes as a uint8 tensor (on the CPU): XXH3-128 (16 entries) by default,
    or ``"sha256"`` (32 entries), the fingerprint of files saved by earlier versions.

    Compact adapter files store one per adapted matrix: their factors are recomputed from the base weight on
    load, which is only exact if the base is bit-identical to the one the adapter was trained on. The hash guards
    against accidents (another checkpoint, revision, dtype, a merged or edited weight), not against forgery.
    """
    if algorithm not in FINGERPRINT_ALGORITHMS.values():
        raise ValueError(
            f"unknown fingerprint algorithm {algorithm!r}: one of {sorted(FINGERPRINT_ALGORITHMS.values())}"
        )
    h = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.sha256()
    h.update(f"{tuple(weight.shape)}|{weight.dtype}|".encode())
    data = weight.detach().contiguous().cpu()
    if data.numel():
        h.update(data.view(torch.uint8).flatten().numpy().data)  # the buffer itself, no copy
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def fingerprint_matches(saved: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``saved``, a fingerprint read from an adapter file (either algorithm), is that of ``weight``."""
    saved = saved.detach().cpu()
    algorithm = FINGERPRINT_ALGORITHMS.get(saved.numel())
    return algorithm is not None and torch.equal(weight_fingerprint(weight, algorithm), saved)


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """SHA-256 of the ``osora_*`` tensors of an adapter state dict (names, dtypes, shapes, bytes; in name order).

    It is stored in the file under :data:`CHECKSUM_KEY`, so flipped or overwritten bytes that keep the safetensors
    header valid are caught on load instead of loading silently.
    """
    h = hashlib.sha256()
    for key in sorted(k for k in tensors if "osora_" in k and k != CHECKSUM_KEY):
        data = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{tuple(data.shape)}|{data.dtype}|".encode())
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
    saved = tensors.get(CHECKSUM_KEY)
    if saved is not None and not torch.equal(saved, tensors_checksum(tensors)):
        raise AdapterFileError(
            f"adapter file {path} is corrupt: its tensors do not match the checksum written when it was saved "
            "(the bytes changed after saving); restore the file from a copy or use an earlier checkpoint"
        )
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"adapter file {path} is corrupt: tensor {key} holds non-finite values")
    return tensors


def _tmp_prefix(path: Path) -> str:
    """Prefix of the temporary siblings of ``path``; it carries the writer's pid so that a stale one is told apart."""
    return f".{path.name}.tmp-{os.getpid()}-"


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary siblings of ``path`` whose writer is gone (a killed save or export left them behind)."""
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = stale.name.removeprefix(f".{path.name}.tmp-").split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
            continue  # a write in progress
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a directory's files into a temporary sibling, then move each into place with ``os.replace``.

    A crash mid-write leaves the previous files untouched; every file that lands is complete. Temporary folders
    that killed writes left beside ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
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
    remove_stale_temporaries(path)
    # the mode of any file the user writes, 0666 less the umask (read without changing the process's umask); the
    # file safetensors writes, like mkstemp's, would be private (0600) unlike its neighbours
    while True:
        tmp = str(path.parent / f"{_tmp_prefix(path)}{secrets.token_hex(4)}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    mode = os.stat(tmp).st_mode & 0o777
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(
    model: torch.nn.Module,
    save_directory: str | os.PathLike[str],
    save_factors: bool | None = None,
    **kwargs: object,
) -> None:
    """``PeftModel.save_pretrained`` made atomic: files are written elsewhere, then moved into place.

    Args:
        save_factors: None: each OSoRA adapter as its config says. False: compact files (S, O, the base weights'
            fingerprints and σ as trained; the factors are recomputed on load) whatever the config says, so an
            adapter trained with its factors can ship in r + d_out numbers per matrix; True: with the factors.
            The model itself is left as it was.
        kwargs: passed to ``save_pretrained``.
    """
    with atomic_directory(save_directory) as tmp, _factors_saved(model, save_factors):
        model.save_pretrained(str(tmp), **kwargs)  # type: ignore[operator]


@contextlib.contextmanager
def _factors_saved(model: torch.nn.Module, save_factors: bool | None) -> Iterator[None]:
    """Every OSoRA adapter of ``model`` saves its factors (True) or is compact (False) inside the block: the
    factor buffers' persistence, σ as trained (what a compact file's load checks against) and the configs'
    ``save_factors``, all restored afterwards. (Duck-typed on the layers' factor dicts: this module sits below
    the layers.)"""
    if save_factors is None:
        yield
        return
    if not isinstance(save_factors, bool):
        raise TypeError(f"save_factors must be True, False or None, got {save_factors!r}")
    undo: list[Callable[[], None]] = []  # run in reverse order afterwards
    try:
        for module in model.modules():
            tables: list[Any] = [getattr(module, n, None) for n in ("osora_U", "osora_Vh", "osora_sigma")]
            if not all(hasattr(t, "set") for t in tables):
                continue
            trained_sigma: Any = module.osora_trained_sigma
            for name in list(tables[0].keys()):
                for table in tables:
                    was = name not in table._non_persistent_buffers_set
                    undo.append(functools.partial(table.set, name, table[name], persistent=was))
                    table.set(name, table[name], persistent=save_factors)
                if name in trained_sigma:  # stored in compact files only
                    was = name not in trained_sigma._non_persistent_buffers_set
                    undo.append(
                        functools.partial(trained_sigma.set, name, trained_sigma[name], persistent=was)
                    )
                    trained_sigma.set(name, trained_sigma[name], persistent=not save_factors)
                elif not save_factors:
                    trained_sigma.set(name, tables[2][name].clone(), persistent=True)
                    undo.append(functools.partial(trained_sigma.__delitem__, name))
        for config in getattr(model, "peft_config", {}).values():
            if hasattr(config, "save_factors"):
                undo.append(functools.partial(setattr, config, "save_factors", config.save_factors))
                config.save_factors = save_factors
        yield
    finally:
        for step in reversed(undo):
            step()
