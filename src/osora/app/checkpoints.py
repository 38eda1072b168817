"""Crash-safe runs: atomic checkpoints and final saves, resume from the newest complete checkpoint, exact resume.

Every checkpoint is written into a hidden staging folder (``.checkpoint-N.tmp``) and renamed into place, so a
``checkpoint-N`` folder is complete or absent; the final adapter's files are moved into ``output_dir`` with its
``adapter_config.json`` (``config.json`` for full fine-tuning) last, so a folder that has one holds the rest.
Staging folders a crash left behind are removed on the next write. A resume picks the newest complete checkpoint
(and says which); on a folder without one it starts from scratch, so first runs and restarts use one command.
SIGINT/SIGTERM finish the current optimizer step, then save a checkpoint and the final adapter.

Exact resume: transformers' length-grouped sampler draws its permutation from the global RNG when each epoch's
iterator starts, so an epoch that begins after a resume is shuffled differently from the uninterrupted run.
:class:`SeededLengthGroupedSampler` seeds every epoch's permutation from (seed, epoch) instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .config import ConfigError

logger = logging.getLogger("osora.train")

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
#: Files whose presence marks a saved model folder as loadable; moved into place after every other file.
MARKER_FILES = ("adapter_config.json", "config.json")
#: Weight files of which a complete checkpoint holds at least one.
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
)
FINAL_STAGING = ".final.tmp"
#: Written by ``osora train`` when a run has finished.
RUN_FILE = "osora_run.json"
#: Entries an osora run writes into its output_dir (removed by ``--training.overwrite_output_dir=true``).
RUN_ENTRY_PATTERNS = (
    f"{PREFIX_CHECKPOINT_DIR}-*",
    ".*.tmp*",
    "base_model",
    "runs",
    "osora_run.json",
    "eval-*.json",
    "adapter_model.*",
    "adapter_config.json",
    "model.safetensors*",
    "model-*.safetensors",
    "pytorch_model*.bin",
    "config.json",
    "generation_config.json",
    "training_args.bin",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.*",
    "vocab.*",
    "merges.txt",
    "README.md",
)


class OutputDirError(ConfigError):
    """``training.output_dir`` holds another run, or the checkpoint to resume from is missing or incomplete."""


def checkpoint_step(path: Path) -> int | None:
    """N of a ``checkpoint-N`` folder name, else None."""
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (None: it is complete).

    Folders written by osora are complete by construction (staged, then renamed); these checks also catch the
    partial folders that a killed plain-transformers save leaves.
    """
    state_file = checkpoint / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return "no readable trainer_state.json"
    if state.get("global_step") != checkpoint_step(checkpoint):
        return f"trainer_state.json says step {state.get('global_step')}"
    if not any((checkpoint / name).is_file() and (checkpoint / name).stat().st_size for name in WEIGHT_FILES):
        return "no weights file"
    optimizer = checkpoint / "optimizer.pt"
    if optimizer.exists() and optimizer.stat().st_size == 0:
        return "an empty optimizer.pt"
    return None


def newest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The complete ``checkpoint-N`` of ``output_dir`` with the largest N; incomplete ones are named in a warning."""
    if not output_dir.is_dir():
        return None
    found = sorted(
        (p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
        key=lambda p: checkpoint_step(p) or 0,
        reverse=True,
    )
    for checkpoint in found:
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return checkpoint
        logger.warning("skipping incomplete checkpoint %s (%s)", checkpoint, reason)
    return None


def remove_stale_staging(output_dir: Path) -> None:
    """Remove the staging folders and files (``.checkpoint-N.tmp``, ``.final.tmp``, ``.NAME.tmp-*``) of killed writes."""
    if not output_dir.is_dir():
        return
    for stale in output_dir.glob(".*.tmp*"):
        logger.info("removing %s, left by an interrupted save", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def prepare_output_dir(
    output_dir: Path, overwrite: bool, resume: str | bool | None, is_main: bool = True
) -> Path | None:
    """Check ``output_dir`` before anything is written; returns the checkpoint to resume from, if any.

    * ``resume`` a path: that checkpoint, which must be complete;
    * ``resume`` true: the newest complete checkpoint, or None (start from scratch) when there is none, unless
      the folder holds a finished run (its ``osora_run.json``), which only ``overwrite`` replaces;
    * otherwise a folder holding anything is refused unless ``overwrite``, which removes the earlier run's files
      (checkpoints, adapter, ``base_model/``, ``osora_run.json``, ``eval-*.json``, logs) so none stays beside the
      new model; files osora does not write are kept.

    Raises:
        OutputDirError: the folder holds another run, or the named checkpoint is missing or incomplete.
    """
    if isinstance(resume, str) and resume:
        checkpoint = Path(resume).expanduser()
        if not checkpoint.is_dir():
            raise OutputDirError(
                f"training.resume_from_checkpoint: no such checkpoint folder: {resume}; "
                "use --training.resume_from_checkpoint=true for the newest complete one in output_dir"
            )
        reason = incomplete_reason(checkpoint)
        if reason is not None:
            raise OutputDirError(
                f"checkpoint {checkpoint} is incomplete ({reason}); use --training.resume_from_checkpoint=true to "
                "resume from the newest complete one"
            )
        if is_main:
            remove_stale_staging(output_dir)
        return checkpoint
    if resume is True:
        newest = newest_complete_checkpoint(output_dir)
        if newest is None and (output_dir / RUN_FILE).exists() and not overwrite:
            raise OutputDirError(
                f"training.output_dir {output_dir} holds a finished run without checkpoints, so there is nothing "
                "to resume; choose a new training.output_dir, or replace it with --training.overwrite_output_dir=true"
            )
        if newest is None and overwrite and is_main:
            _remove_run_entries(output_dir)
        if is_main:
            remove_stale_staging(output_dir)
            if newest is None:
                print(f"no complete checkpoint in {output_dir}: starting from scratch", flush=True)
            else:
                print(f"resuming from {newest} (the newest complete checkpoint)", flush=True)
        return newest
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise OutputDirError(
                f"training.output_dir {output_dir} is not empty (it holds another run); choose a new "
                "training.output_dir, continue it with --training.resume_from_checkpoint=true, or replace it "
                "with --training.overwrite_output_dir=true"
            )
        if is_main:
            _remove_run_entries(output_dir)
    return None


def _remove_run_entries(output_dir: Path) -> None:
    for entry in sorted({p for pattern in RUN_ENTRY_PATTERNS for p in output_dir.glob(pattern)}):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the folders themselves to disk (a rename is only as durable as they)."""
    for folder, _, files in os.walk(root):
        for path in [*(os.path.join(folder, name) for name in files), folder]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def publish_folder(staging: Path, target: Path) -> None:
    """Replace ``target`` with the complete folder ``staging`` by renames (never a half-written ``target``)."""
    _fsync_tree(staging)
    if target.exists():
        old = target.with_name(f".{target.name}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def publish_files(staging: Path, target: Path) -> None:
    """Move every file of ``staging`` into ``target``, marker files (adapter_config.json, config.json) last.

    The markers already in ``target`` are removed first, so a crash in between leaves a folder that does not
    claim to hold a model rather than new weights beside an old config.
    """
    _fsync_tree(staging)
    target.mkdir(parents=True, exist_ok=True)
    for marker in MARKER_FILES:
        if (staging / marker).exists():
            (target / marker).unlink(missing_ok=True)
    entries = sorted(staging.iterdir(), key=lambda p: p.name in MARKER_FILES)
    for entry in entries:
        destination = target / entry.name
        if entry.is_dir():
            publish_folder(entry, destination)
        else:
            os.replace(entry, destination)
    shutil.rmtree(staging, ignore_errors=True)


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler whose permutation depends only on (seed, epoch), not on global RNG."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int = 0) -> None:
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        assert self.generator is not None
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class CrashSafeTrainer(Trainer):
    """``Trainer`` whose checkpoints appear complete or not at all, with a reproducible length-grouped order."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return SeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=seed)
        return sampler

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f".{name}.tmp"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        # the parent writes into <output dir>/checkpoint-N: point it at the staging folder for this one call
        self._get_output_dir = lambda trial=None: str(staging)  # type: ignore[method-assign,misc]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_folder(staging / name, run_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()

    def save_final(self, output_dir: Path) -> None:
        """``save_model(output_dir)`` through a staging folder; the marker file lands last."""
        staging = output_dir / FINAL_STAGING
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.save_model(str(staging))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_files(staging, output_dir)
        self.accelerator.wait_for_everyone()


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM: finish the current optimizer step, then stop with a checkpoint (a second signal aborts)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        for sig, handler in self._previous.items():  # a second Ctrl-C is not swallowed
            signal.signal(sig, handler)
        print(
            f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint and the "
            "adapter (send it again to abort at once)",
            flush=True,
        )

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _stop_requested(self, args: Any) -> bool:
        flag = self.received is not None
        if args.world_size > 1 and torch.distributed.is_initialized():  # every rank stops at the same step
            tensor = torch.tensor([int(flag)], device=args.device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._stop_requested(args):
            if self.received is None:
                self.received = int(signal.SIGTERM)
            control.should_training_stop = True
            control.should_save = True
        return control


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (its folder created if missing) through a hidden temporary sibling and
    ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_not_partial_adapter(folder: Path) -> None:
    """Refuse a folder holding adapter weights without their adapter_config.json (an interrupted save)."""
    from osora.checkpoint import AdapterFileError

    weights = any((folder / name).exists() for name in ("adapter_model.safetensors", "adapter_model.bin"))
    if folder.is_dir() and weights and not (folder / "adapter_config.json").exists():
        raise AdapterFileError(
            f"{folder} holds adapter weights but no adapter_config.json: an incomplete adapter (its save was "
            "interrupted); finish the run with --training.resume_from_checkpoint=true, or use a checkpoint-N "
            "folder inside it"
        )


def require_osora_adapter(folder: Path, command: str) -> None:
    """Refuse anything but a complete OSoRA adapter folder, before any model is loaded."""
    from osora.checkpoint import AdapterFileError

    from .models import ModelNotFoundError

    if not folder.exists():
        raise ModelNotFoundError(f"no such file or directory: {folder}")
    check_not_partial_adapter(folder)
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise AdapterFileError(
            f"{folder} is not an adapter folder (no adapter_config.json); osora {command} takes the output_dir of "
            "an osora train run or a save_pretrained folder"
        )
    try:
        peft_type = json.loads(config.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError) as error:
        raise AdapterFileError(f"{config} is not a readable adapter config ({error})") from error
    if str(peft_type).upper() != "OSORA":
        raise AdapterFileError(
            f"{folder} holds a {peft_type} adapter, not an OSoRA one; osora {command} needs an OSoRA adapter "
            "(merge other PEFT adapters with peft's merge_and_unload)"
        )
