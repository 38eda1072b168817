"""The application's one config schema: typed sections that YAML files and ``key=value`` overrides fill.

A run is described by :class:`RunConfig` with five sections (``model``, ``data``, ``method``, ``training``,
``eval``). ``model``, ``data`` and ``eval`` are osora's own dataclasses; the ``method`` section is a method name
plus the fields of that method's PEFT config class (OSoRAConfig, LoraConfig, VeraConfig), and the ``training``
section the fields of transformers' ``TrainingArguments``: both are checked against those classes' own
annotations and validated by the classes themselves, so nothing is copied here. ``osora train --help`` prints
every key. ``section.field=value`` arguments override the YAML file (values are parsed as YAML, so
``training.learning_rate=2e-4`` and ``method.target_modules=[q_proj,v_proj]`` work). Unknown keys and values of
the wrong type are errors naming the key.

Example:
    >>> cfg = load_config(None, ["method.name=lora", "method.r=16"])
    >>> cfg.method.peft_config().r
    16
"""

from __future__ import annotations

import dataclasses
import logging
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

    path: str | list[str] | None = _help(
        None,
        "Local .json/.jsonl file or a hub dataset id; a list of them is concatenated (max_samples caps each).",
    )
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
    """The fine-tuning method and the fields of its PEFT config (OSoRAConfig, LoraConfig or VeraConfig).

    Every key of the section other than ``name`` is passed as given to the method's config class, which validates
    it: ``method.r=32``, ``method.init_method=exact``, ``method.save_factors=false``, ``method.lora_alpha=64``.
    ``dropout`` is the adapter's input dropout under any method (``lora_dropout`` / ``vera_dropout`` for peft's);
    ``target_modules`` unset: the model's default targets (osora.config.DEFAULT_TARGET_MODULES).
    """

    name: str = _help(
        "osora",
        "A method of osora.app.methods.METHODS: osora (S and O train), osora-S (S only), osora-O (O only), "
        "osora-scaled, lora, vera, pissa, dora, or full fine-tuning.",
    )
    fields: dict[str, Any] = _help(
        None, "Every other key: a field of the method's PEFT config class.", factory=dict
    )

    def peft_config(self, default_targets: Any = "all-linear") -> Any:
        """The method's PEFT config (None for full fine-tuning), built from :attr:`fields` as they are.

        Raises:
            ConfigError: an unknown method, a key its config class has no field for, or a value it refuses.
        """
        from .methods import config_class, get_method, peft_config

        try:
            spec = get_method(self.name)
        except ValueError as error:
            raise ConfigError(f"method.name: {error}") from None
        if spec.needs_head:
            raise ConfigError(f"method.name={self.name} trains a classifier head; a causal LM has none")
        if spec.family is None:
            if self.fields:
                logging.getLogger("osora.config").warning(
                    "method %s attaches no adapter: ignoring method.%s",
                    self.name,
                    ", method.".join(self.fields),
                )
            return None
        cls = config_class(spec.family)
        known = {f.name for f in dataclasses.fields(cls) if f.init} | {"dropout"}
        unknown = sorted(set(self.fields) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key 'method.{unknown[0]}': {cls.__name__} (method {self.name}) has no such field; "
                "osora train --help lists them"
            )
        hints = typing.get_type_hints(cls)
        fields = {"task_type": "CAUSAL_LM", "target_modules": default_targets}
        fields |= {
            k: v if k == "dropout" else _check(f"method.{k}", v, hints[k]) for k, v in self.fields.items()
        }
        dropout = fields.pop("dropout", None)
        try:
            return peft_config(self.name, dropout=dropout, **fields)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"method settings ({self.name}): {error}") from error


#: osora's defaults for the training section where they differ from transformers' TrainingArguments.
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/osora",
    "learning_rate": 1e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float below 1 is a fraction of the steps
    "train_sampling_strategy": "group_by_length",  # less padding; a resume stays exact (osora.app.checkpoints)
    "logging_steps": 10,
    "save_total_limit": 2,
    "report_to": ["tensorboard"],
    "ddp_find_unused_parameters": False,
}

#: Training keys of osora's own (transformers' TrainingArguments has no such field, or a narrower type).
OSORA_TRAINING_FIELDS: dict[str, tuple[Any, Any, str]] = {
    "resume_from_checkpoint": (
        str | bool | None,
        None,
        "A checkpoint directory, or true for the newest complete one in output_dir (none there: start from "
        "scratch, so a first run and a restart use the same command).",
    ),
    "overwrite_output_dir": (
        bool,
        False,
        "Replace the earlier run in a non-empty output_dir (its checkpoints, adapter, base_model/, osora_run.json "
        "and eval-*.json are removed first); false: such a folder is refused unless resuming.",
    ),
}

#: Names of transformers 4 that TrainingArguments 5 dropped, with the key to use instead.
RENAMED_TRAINING_KEYS = {
    "warmup_ratio": "training.warmup_steps (a float below 1 is a fraction of the steps)",
    "group_by_length": "training.train_sampling_strategy=group_by_length (or random)",
}


@dataclass
class TrainingConfig:
    """The training section: any field of transformers' ``TrainingArguments``, checked against its annotations
    here and validated by ``TrainingArguments`` itself when a run builds it; plus ``resume_from_checkpoint`` (also
    true) and ``overwrite_output_dir``. Unset fields take osora's defaults (:data:`TRAINING_DEFAULTS`), then
    transformers'.
    """

    values: dict[str, Any] = _help(None, "The keys the config sets.", factory=dict)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key == "values":
            raise AttributeError(key)
        if key in self.values:
            return self.values[key]
        if key in OSORA_TRAINING_FIELDS:
            return OSORA_TRAINING_FIELDS[key][1]
        if key in TRAINING_DEFAULTS:
            return TRAINING_DEFAULTS[key]
        fields = _training_arguments_fields()
        if key not in fields:
            raise AttributeError(key)
        f = fields[key]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc,operator]

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``TrainingArguments``: osora's defaults, then the keys the config sets."""
        values = {k: v for k, v in self.values.items() if k not in OSORA_TRAINING_FIELDS}
        return {**TRAINING_DEFAULTS, **values}


def _training_arguments_fields() -> dict[str, dataclasses.Field[Any]]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def _training_types() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    types_ = {name: hints[name] for name in _training_arguments_fields()}
    return types_ | {name: tp for name, (tp, _, _) in OSORA_TRAINING_FIELDS.items()}


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


def _check(key: str, value: Any, tp: Any) -> Any:
    ok, converted = _type_ok(value, tp)
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} does not match its type {_type_name(tp)}")
    return converted


def _fill(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    if cls is MethodConfig:  # every key but the name goes to the method's PEFT config class, which checks it
        fields = dict(values)
        name = fields.pop("name", MethodConfig.name)
        return MethodConfig(name=_check(f"{prefix}name", name, str), fields=fields)
    if cls is TrainingConfig:
        types_ = _training_types()
        for key in values:
            if key not in types_:
                hint = RENAMED_TRAINING_KEYS.get(key)
                raise ConfigError(
                    f"unknown config key '{prefix}{key}'"
                    + (f"; use {hint}" if hint else "; the training section takes TrainingArguments' fields")
                )
        return TrainingConfig({key: _check(f"{prefix}{key}", v, types_[key]) for key, v in values.items()})
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields_:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known keys: {', '.join(sorted(fields_))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _fill(tp, value or {}, f"{prefix}{key}.")  # type: ignore[arg-type]
            continue
        kwargs[key] = _check(f"{prefix}{key}", value, tp)
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
        cfg = _fill(RunConfig, tree, "")
        cfg.method.peft_config()  # validated by the method's own config class
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from error
    return cfg


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
    """The config as plain data (saved next to every run and report); training with its defaults filled in."""
    tree = dataclasses.asdict(cfg)
    tree["method"] = {"name": cfg.method.name, **cfg.method.fields}
    own = {name: getattr(cfg.training, name) for name in OSORA_TRAINING_FIELDS}
    tree["training"] = {**cfg.training.arguments(), **own}
    return tree


def _field_lines(prefix: str, cls: type, skip: frozenset[str] = frozenset()) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        lines.append(f"  {prefix}.{f.name} ({_type_name(hints[f.name])}, default {default!r})")
        lines.append(f"      {' '.join(str(f.metadata.get('help', '')).split())}")
    return lines


def help_text() -> str:
    """Every config key with its type, default and help, section by section."""
    from osora import OSoRAConfig

    lines: list[str] = []
    for section in ("model", "data", "eval"):
        cls = typing.get_type_hints(RunConfig)[section]
        lines += [f"{section}: {cls.__doc__}", *_field_lines(section, cls)]
    lines += [f"method: {' '.join(str(MethodConfig.__doc__).split())}"]
    lines += [
        f"  method.name (str, default {MethodConfig.name!r})",
        f"      {MethodConfig.__dataclass_fields__['name'].metadata['help']}",
    ]
    lines += ["  OSoRAConfig's fields (osora, osora-S, osora-O, osora-scaled):"]
    peft_own = frozenset({"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "peft_version"})
    lines += _field_lines("method", OSoRAConfig, peft_own | {"task_type", "inference_mode"})
    lines += [f"training: {' '.join(str(TrainingConfig.__doc__).split())}"]
    for name, (tp, default, text) in OSORA_TRAINING_FIELDS.items():
        lines += [f"  training.{name} ({_type_name(tp)}, default {default!r})", f"      {text}"]
    lines += ["  osora's defaults: " + ", ".join(f"{k}={v!r}" for k, v in TRAINING_DEFAULTS.items())]
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


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
