"""``osora train --config CONFIG.yaml [--section.key VALUE ...]``: fine-tune a causal LM with OSoRA or a PEFT baseline.

Every method runs through the same data, schedule and transformers ``Trainer`` (mixed precision, gradient
accumulation and checkpointing, checkpoints and resume, TensorBoard, progress bars); several GPUs come from
launching the same command under ``torchrun`` or ``accelerate launch``. The baselines are PEFT's own
implementations: LoRA, VeRA, PiSSA (``init_lora_weights="pissa"``), DoRA (``use_dora=True``); ``full`` trains
every weight. The adapter (or the full model) and the tokenizer are saved to ``training.output_dir`` at the end.

Example:
    osora train --config configs/tiny/gsm8k-osora.yaml --training.max_steps=2
    accelerate launch -m osora.app.cli train --config configs/qwen2-7b-metamath-osora.yaml
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from osora.config import default_target_modules

from .checkpoints import (
    RUN_FILE,
    CrashSafeTrainer,
    StopOnSignal,
    atomic_write_text,
    prepare_output_dir,
    publish_folder,
)
from .config import ConfigError, MethodConfig, ModelConfig, RunConfig, config_from_argv, to_dict
from .data import build_train_dataset, load_split, texts_of, word_level_tokenizer
from .models import _DTYPES, config_from_dict, load_causal_lm, load_tokenizer
from .params import count_parameters

logger = logging.getLogger("osora.train")

#: Where a model built from model.from_config is saved, so adapters can be reloaded.
BASE_MODEL_DIR = "base_model"


def build_tokenizer(model_cfg: ModelConfig, records: Any = None):
    """The tokenizer of ``model_cfg``, or one trained on ``records`` when ``model.tokenizer_from_data``."""
    if model_cfg.tokenizer_from_data:
        if records is None or len(records) == 0:
            raise ValueError("model.tokenizer_from_data needs training records")
        return word_level_tokenizer(texts_of(records))  # its pad token is <pad>
    source = model_cfg.tokenizer or model_cfg.name_or_path
    if source is None:
        raise ValueError("set model.tokenizer or model.name_or_path (or --model.tokenizer_from_data=true)")
    return load_tokenizer(source, model_cfg.trust_remote_code)  # sets the pad token where there is none


def build_model(model_cfg: ModelConfig, tokenizer: Any, seed: int = 42):
    """The base causal LM: loaded from ``name_or_path``, or randomly initialised from ``from_config``."""
    from transformers import AutoModelForCausalLM

    if model_cfg.from_config is not None:
        config = config_from_dict(
            model_cfg.from_config,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        torch.manual_seed(seed)  # every rank builds the same weights
        model = AutoModelForCausalLM.from_config(config)
        if model_cfg.dtype in _DTYPES:
            model = model.to(_DTYPES[model_cfg.dtype])
        return model
    if model_cfg.name_or_path is None:
        raise ValueError("set model.name_or_path or model.from_config")
    model, _ = load_causal_lm(  # a short name, a folder, a .gguf file or a hub id
        model_cfg.name_or_path,
        model_cfg.dtype,
        model_cfg.trust_remote_code,
        model_cfg.attn_implementation,
        with_tokenizer=False,
    )
    return model


def apply_method(model: Any, method: MethodConfig):
    """``model`` wrapped by the method's PEFT adapter (or returned as is, all weights trainable, for ``full``)."""
    config = method.peft_config(default_target_modules(model.config.model_type))
    if config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, config)


def training_arguments(cfg: RunConfig):
    """transformers ``TrainingArguments`` of the ``training`` section (osora's defaults, then the config's keys).

    Raises:
        ConfigError: a value TrainingArguments refuses.
    """
    from transformers import TrainingArguments

    arguments = cfg.training.arguments()
    if arguments.get("activation_checkpointing") and not arguments.get("activation_checkpointing_kwargs"):
        arguments["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    try:
        return TrainingArguments(**arguments)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"training settings: {error}") from error


def validate(cfg: RunConfig, records: Any = None) -> None:
    """Check what can be checked before anything is built or written: the method's settings, the data and model.

    Raises:
        ConfigError: naming the key and the fix.
    """
    if cfg.data.path is None and records is None:
        raise ConfigError("data.path is required: set it to a local .json/.jsonl file or a hub dataset id")
    if cfg.model.from_config is None and cfg.model.name_or_path is None:
        raise ConfigError(
            "set model.name_or_path (a model folder, short name or hub id) or model.from_config"
        )
    if cfg.model.from_config is not None and "model_type" not in cfg.model.from_config:
        raise ConfigError("model.from_config needs a 'model_type' (e.g. llama)")
    cfg.method.peft_config("all-linear")


def run(cfg: RunConfig, callbacks: list[Any] | None = None, records: Any = None):
    """Train as ``cfg`` says and save the result; returns the ``Trainer`` (for tests and notebooks).

    ``records`` (a list of dicts or a ``datasets.Dataset``) are the training records in place of ``data.path``'s,
    e.g. the demo's generated task.

    Checkpoints and the final save are crash-safe and a resume is exact (:mod:`osora.app.checkpoints`); an
    output_dir that holds another run is refused before anything is built or written.
    """
    from accelerate import PartialState
    from transformers import DataCollatorForSeq2Seq, set_seed
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    validate(cfg, records)
    args = training_arguments(cfg)  # sets up torch.distributed under torchrun / accelerate
    out = Path(cfg.training.output_dir)
    resume_from = prepare_output_dir(
        out,
        cfg.training.overwrite_output_dir,
        cfg.training.resume_from_checkpoint,
        is_main=args.process_index == 0,
    )
    PartialState().wait_for_everyone()  # every rank has checked output_dir before rank 0 writes into it
    set_seed(cfg.training.seed)
    if records is None:
        assert cfg.data.path is not None  # validate() refused a config without one
        records = load_split(cfg.data.path, cfg.data.name, cfg.data.split, cfg.data.max_samples)
    tokenizer = build_tokenizer(cfg.model, records)
    tokenizer.padding_side = "right"
    train_dataset, report = build_train_dataset(records, tokenizer, cfg.data)
    if args.process_index == 0:
        report.log()

    model = build_model(cfg.model, tokenizer, cfg.training.seed)
    if cfg.model.from_config is not None:
        base_dir = out / BASE_MODEL_DIR
        if args.process_index == 0:
            staging = out / f".{BASE_MODEL_DIR}.tmp"
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            publish_folder(staging, base_dir)
        # peft records it as the adapter's base_model_name_or_path, so eval/merge/export find the base
        model.config.name_or_path = model.name_or_path = str(base_dir.resolve())
    model = apply_method(model, cfg.method)
    if args.activation_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    if args.process_index == 0:
        print(
            f"method {cfg.method.name}: trainable params {trainable:,} / total {total:,} "
            f"({100 * trainable / total:.4f}%)",
            flush=True,
        )

    stop = StopOnSignal()
    trainer = CrashSafeTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), stop],
    )
    stop.install()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stop.uninstall()
    stopped_early = (
        trainer.state.global_step < trainer.state.max_steps and trainer.control.should_training_stop
    )
    if stopped_early and stop.received is None:
        return trainer  # stopped early by a callback: leave the checkpoints, save nothing final
    trainer.save_final(out)
    if stop.received is not None and trainer.is_world_process_zero():
        print(
            f"interrupted by {signal.Signals(stop.received).name} at step {trainer.state.global_step}: saved "
            f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step} and the adapter to {out}; continue with "
            "--training.resume_from_checkpoint=true",
            flush=True,
        )
    if trainer.is_world_process_zero():
        run_info = {
            "config": to_dict(cfg),
            "trainable_params": trainable,
            "total_params": total,
            "data": {"total": report.total, "kept": report.kept, "skipped": dict(report.skipped)},
            "log_history": trainer.state.log_history,
        }
        atomic_write_text(out / RUN_FILE, json.dumps(run_info, indent=2, default=str))
        print(f"saved {'model' if cfg.method.name == 'full' else 'adapter'} to {out}", flush=True)
    trainer.accelerator.wait_for_everyone()  # no rank returns (or exits) while rank 0 is still writing
    return trainer


def main(argv: list[str]) -> int:
    cfg = config_from_argv("train", argv)
    if isinstance(cfg, int):
        return cfg
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # end_training destroys the process group: a gloo group left to interpreter exit can abort a rank
    trainer = run(cfg)
    trainer.accelerator.end_training()
    interrupted = received_signal(trainer)
    return 128 + interrupted if interrupted else 0


def received_signal(trainer: Any) -> int | None:
    """The SIGINT/SIGTERM that stopped :func:`run`'s training early (None: it ran to its end)."""
    stops = (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StopOnSignal))
    return next((cb.received for cb in stops), None)
