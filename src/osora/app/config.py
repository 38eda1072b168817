"""The application's one config schema: typed dataclasses that YAML files and ``key=value`` overrides fill.

A run is described by :class:`RunConfig` with five sections (``model``, ``data``, ``method``, ``training``,
``eval``). Each field's ``help`` metadata is its documentation (``osora train --help`` prints them all). A YAML
file gives any subset of the fields; ``section.field=value`` arguments on the command line override it (values
are parsed as YAML, so ``training.learning_rate=2e-4`` and ``method.target_modules=[q_proj,v_proj]`` work).
Unknown keys and values of the wrong type are errors naming the key.

Example:
    >>> cfg = load_config(None, ["method.name=lora", "method.r=16"])
    >>> cfg.method.r
    16
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

DataFormat = Literal["auto", "metamath", "gsm8k", "commonsense", "alpaca", "math"]
PromptStyle = Literal["paper", "alpaca", "chat"]
EvalTask = Literal[
    "gsm8k",
    "math",
    "boolq",
    "piqa",
    "siqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "arc_e",
    "arc_c",
    "obqa",
]


def _help(default: Any, text: str, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose ``help`` metadata documents it (``default`` is ignored when ``factory`` is given)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    """Which causal LM to fine-tune or evaluate."""

    name_or_path: str | None = _help(
        None, "Hub id or local path of an AutoModelForCausalLM (its weights are loaded)."
    )
    from_config: dict[str, Any] | None = _help(
        None,
        "Build a randomly initialised model from this config dict instead (needs 'model_type'; no weights are "
        "downloaded). vocab_size defaults to the tokenizer's. For smoke tests and the tiny CPU configs.",
    )
    tokenizer: str | None = _help(None, "Hub id or path of the tokenizer; defaults to name_or_path.")
    tokenizer_from_data: bool = _help(
        False, "Train a word-level tokenizer on the training texts in-process (offline smoke tests only)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "auto", "Dtype the base weights are loaded in; 'auto' uses the checkpoint's."
    )
    attn_implementation: str | None = _help(
        None, "transformers attn_implementation, e.g. 'sdpa' or 'flash_attention_2'."
    )
    trust_remote_code: bool = _help(False, "Allow model code from the hub (transformers trust_remote_code).")


@dataclass
class DataConfig:
    """The fine-tuning data and how each record becomes a prompt and a response."""

    path: str | None = _help(None, "Local .json/.jsonl file or a hub dataset id.")
    name: str | None = _help(None, "Dataset config name for hub datasets (e.g. 'main' for gsm8k).")
    split: str = _help("train", "Split to load from a hub dataset (local files are one 'train' split).")
    format: DataFormat = _help(
        "auto",
        "Record layout: metamath {query, response}, gsm8k {question, answer}, commonsense {instruction, input, "
        "output, answer}, alpaca {instruction, input, output}, math {problem, solution}; 'auto' detects it.",
    )
    prompt: PromptStyle = _help(
        "paper",
        "'paper': \"Question: {q}\\nLet's think step by step\\nAnswer:\" (the authors' harness); 'alpaca': the "
        "LLM-Adapters instruction template; 'chat': the tokenizer's chat template.",
    )
    max_length: int = _help(
        512, "Records whose prompt + response exceed this many tokens are counted and skipped."
    )
    max_samples: int | None = _help(None, "Use only the first N records (after loading, before filtering).")
    num_proc: int | None = _help(None, "Worker processes that tokenize the data (datasets.map); None: one.")


@dataclass
class MethodConfig:
    """The fine-tuning method and its hyper-parameters; baselines run through PEFT's own implementations."""

    name: str = _help(
        "osora",
        "A method of osora.app.methods.METHODS: osora (S and O train), osora-S (S only), osora-O (O only), "
        "osora-scaled, lora, vera, pissa, dora, or full fine-tuning.",
    )
    r: int = _help(8, "Rank (OSoRA, LoRA, PiSSA, DoRA, VeRA).")
    target_modules: list[str] | str | None = _help(
        None, "Module names (suffix match) or a regex to adapt; None: every linear layer of the blocks."
    )
    dropout: float = _help(0.0, "Dropout on the adapter branch's input.")
    lora_alpha: float | None = _help(None, "LoRA/PiSSA/DoRA scaling alpha; None: equal to r (scale 1).")
    s_parametrization: Literal["raw", "scaled"] = _help(
        "raw", "OSoRA: train S itself ('raw') or σ ⊙ s ('scaled')."
    )
    o_dim: Literal["output", "input"] = _help("output", "OSoRA: the dimension O scales.")
    vera_d_initial: float = _help(0.1, "VeRA: initial value of the d vector.")

    def __post_init__(self) -> None:
        from .methods import get_method

        try:
            get_method(self.name)
        except ValueError as error:
            raise ConfigError(f"method.name: {error}") from None


@dataclass
class TrainingConfig:
    """The schedule and the engine settings, passed to transformers' TrainingArguments."""

    output_dir: str = _help(
        "runs/osora", "Where checkpoints, TensorBoard logs and the final adapter are written."
    )
    num_train_epochs: float = _help(3.0, "Epochs over the training data.")
    max_steps: int = _help(-1, "Stop after this many optimizer steps (overrides epochs when > 0).")
    learning_rate: float = _help(1e-4, "Peak learning rate.")
    lr_scheduler_type: str = _help("cosine", "transformers scheduler name: cosine, linear, constant, ...")
    warmup_ratio: float = _help(0.03, "Fraction of the steps spent warming up the learning rate.")
    weight_decay: float = _help(0.0, "AdamW weight decay.")
    per_device_train_batch_size: int = _help(4, "Micro-batch size per device.")
    gradient_accumulation_steps: int = _help(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = _help(1.0, "Gradient clipping norm.")
    bf16: bool = _help(False, "bfloat16 mixed precision.")
    fp16: bool = _help(False, "float16 mixed precision.")
    gradient_checkpointing: bool = _help(False, "Recompute activations in the backward pass to save memory.")
    group_by_length: bool = _help(True, "Batch records of similar length together (less padding).")
    logging_steps: int = _help(10, "Log loss and learning rate every N steps.")
    save_steps: int = _help(500, "Save a checkpoint every N steps.")
    save_total_limit: int | None = _help(2, "Keep at most this many checkpoints.")
    resume_from_checkpoint: str | bool | None = _help(
        None,
        "A checkpoint directory, or true for the newest complete one in output_dir (none there: start from "
        "scratch, so a first run and a restart use the same command).",
    )
    overwrite_output_dir: bool = _help(
        False,
        "Replace the earlier run in a non-empty output_dir (its checkpoints, adapter, base_model/, osora_run.json "
        "and eval-*.json are removed first); false: such a folder is refused unless resuming.",
    )
    report_to: list[str] = _help(
        None, "Loggers, e.g. [tensorboard]; [] for none.", factory=lambda: ["tensorboard"]
    )
    seed: int = _help(42, "Seed of the model init (from_config), the data order and dropout.")
    use_cpu: bool = _help(False, "Train on the CPU even when a GPU is present.")
    ddp_backend: str | None = _help(
        None, "torch.distributed backend under torchrun ('nccl', 'gloo'); None: auto."
    )
    deepspeed: str | None = _help(None, "Path of a DeepSpeed JSON config (launch with deepspeed/accelerate).")
    fsdp: str | None = _help(
        None, "FSDP mode for TrainingArguments, e.g. 'full_shard auto_wrap' (under torchrun)."
    )
    dataloader_num_workers: int = _help(0, "Data loader worker processes.")
    disable_tqdm: bool = _help(False, "Hide progress bars.")


@dataclass
class EvalConfig:
    """What ``osora eval`` scores and how it generates."""

    task: EvalTask = _help("gsm8k", "Benchmark whose scorer is used (see osora.app.scoring.TASKS).")
    path: str | None = _help(None, "Local .json/.jsonl file or hub dataset id of the test set.")
    name: str | None = _help(None, "Dataset config name for hub datasets.")
    split: str = _help("test", "Split to load from a hub dataset.")
    model: str | None = _help(
        None,
        "A merged/base model dir or hub id, or an adapter dir (its base is read from adapter_config.json); "
        "None: training.output_dir.",
    )
    base: str | None = _help(None, "Base model of an adapter dir, overriding adapter_config.json.")
    max_samples: int | None = _help(None, "Score only the first N examples.")
    batch_size: int = _help(8, "Prompts generated together (left-padded).")
    max_new_tokens: int = _help(512, "Generation length limit.")
    k_shot: int = _help(0, "Prepend this many solved examples to every prompt.")
    shots_path: str | None = _help(
        None, "Where the k-shot examples come from (local file); None: the first k test examples, not scored."
    )
    prompt: PromptStyle | None = _help(None, "Prompt style; None: data.prompt.")
    comparison: str | None = _help(
        None,
        "How predictions meet references for the headline accuracy: one of the task's comparisons (math: "
        "'math-verify', or 'string', the paper's); None: the task's first. Every comparison is reported.",
    )
    output: str | None = _help(None, "JSON report path; None: <model>/eval-<task>.json.")


@dataclass
class RunConfig:
    """A whole experiment: ``osora train`` and ``osora eval`` read the same file."""

    model: ModelConfig = _help(None, "The model.", factory=ModelConfig)
    data: DataConfig = _help(None, "The training data.", factory=DataConfig)
    method: MethodConfig = _help(None, "The fine-tuning method.", factory=MethodConfig)
    training: TrainingConfig = _help(None, "The training schedule.", factory=TrainingConfig)
    eval: EvalConfig = _help(None, "The evaluation.", factory=EvalConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the annotation ``tp``, and the value converted (int -> float, '1e-4' -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            ok, converted = _type_ok(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return value in get_args(tp), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item,) = get_args(tp)
        results = [_type_ok(v, item) for v in value]
        return all(ok for ok, _ in results), [v for _, v in results]
    if origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def _fill(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known keys: {', '.join(sorted(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _fill(tp, value or {}, f"{prefix}{key}.")  # type: ignore[arg-type]
            continue
        ok, converted = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key '{prefix}{key}' = {value!r} does not match its type {tp}")
        kwargs[key] = converted
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A :class:`RunConfig` from a YAML file (or the defaults) and ``section.key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as error:
            raise ConfigError(
                f"override {item!r}: its value is not valid YAML ({_yaml_problem(error)})"
            ) from error
        _set_dotted(tree, key.strip(), value)
    try:
        return _fill(RunConfig, tree, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from error


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return str(problem)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping of a YAML config file, or a :class:`ConfigError` naming the file (and line) at fault."""
    if not path.is_file():
        what = "is a directory, not a YAML file" if path.is_dir() else "no such file"
        raise ConfigError(
            f"config file {path}: {what}; pass the path of a YAML config such as configs/tiny/gsm8k-osora.yaml"
        )
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {_yaml_problem(error)}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file ({error.reason})") from error
    tree = tree or {}
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (model, data, method, training, eval)"
        )
    return tree


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain data (saved next to every run and report)."""
    return dataclasses.asdict(cfg)


def help_text() -> str:
    """Every config key with its type, default and help, section by section."""
    lines: list[str] = []
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        lines.append(f"{section.name}: {cls.__doc__}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            lines.append(f"  {section.name}.{f.name} ({_type_name(hints[f.name])}, default {default!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def config_from_argv(command: str, usage: str, argv: list[str]) -> RunConfig | int:
    """The RunConfig of ``osora COMMAND [CONFIG.yaml] [section.key=value ...]``, or the exit code to return.

    ``-h``/``--help`` prints the usage and every field's help (exit 0); no arguments print it too (exit 2). A
    config error raises :class:`ConfigError`, which the ``osora`` command prints without a traceback (exit 2).
    """
    if not argv or argv[0] in {"-h", "--help"}:
        print(f"usage: osora {command} {usage}\n\n" + help_text())
        return 0 if argv else 2
    config_path, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    return load_config(config_path, overrides)  # a ConfigError is printed by osora.app.cli (exit 2)
