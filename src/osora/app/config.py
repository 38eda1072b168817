"""The application's one config schema, and the one command-line grammar that fills it (jsonargparse).

A run is described by :class:`RunConfig` with five sections (``model``, ``data``, ``method``, ``training``,
``eval``). ``model``, ``data`` and ``eval`` are osora's own dataclasses; the ``method`` section is a method name
plus the fields of that method's PEFT config class (OSoRAConfig, LoraConfig, VeraConfig), and the ``training``
section the fields of transformers' ``TrainingArguments``: jsonargparse builds every option from those classes'
own annotations and checks each value's type, and the classes validate the values themselves, so nothing is
copied here. ``osora train --config run.yaml --training.learning_rate 2e-4 --method.r 16``: a YAML file
(``--config``, repeatable) and ``--section.key value`` options, later ones winning; ``osora train --help`` lists
every key of the chosen method, ``--print_config`` shows the merged config. Unknown keys and values of the wrong
type are errors naming the key.

Example:
    >>> cfg = load_config(None, ["--method.name=lora", "--method.r=16"])
    >>> cfg.method.peft_config().r
    16
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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

    ``fields`` are the keys the config sets besides ``name``, passed as given to the method's config class, which
    validates them: ``--method.r 32``, ``--method.init_method exact``, ``--method.save_factors false``,
    ``--method.lora_alpha 64``. ``dropout`` is the adapter's input dropout under any method (``lora_dropout`` /
    ``vera_dropout`` for peft's); ``target_modules`` unset: the model's default targets.
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
            ConfigError: an unknown method, or settings its config class refuses.
        """
        from .methods import peft_config

        spec = _method(self.name)
        if spec.family is None:
            if self.fields:
                logging.getLogger("osora.config").warning(
                    "method %s attaches no adapter: ignoring method.%s",
                    self.name,
                    ", method.".join(self.fields),
                )
            return None
        fields = {"task_type": "CAUSAL_LM", **self.fields}
        if fields.get("target_modules") is None:
            fields["target_modules"] = default_targets
        try:
            return peft_config(self.name, **fields)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"method settings ({self.name}): {error}") from error


def _method(name: str) -> Any:
    from .methods import get_method

    try:
        spec = get_method(name)
    except ValueError as error:
        raise ConfigError(f"method.name: {error}") from None
    if spec.needs_head:
        raise ConfigError(f"method.name={name} trains a classifier head; a causal LM has none")
    return spec


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

#: ``training.learning_rate`` where the config sets none, per method family (the others: TRAINING_DEFAULTS'). OSoRA's
#: is its measured rule: 1e-2 scored within one point of the protocol's held-out pick on every SST-2 sweep (MiniLM-L6,
#: 2,000–8,000 sentences) and was the pick on GSM8K (SmolLM2-135M) at r = 32, 128 and 576; at r = 8 GSM8K picked
#: 3.16e-2 (1e-2: 0.015 nats worse). ``python benchmarks/lr_rule.py`` checks it against every committed sweep.
#: A third of it, 3.16e-3, lost 15.5 points on SST-2 (2,000 sentences) and 0.063 nats of reference NLL on GSM8K.
FAMILY_LEARNING_RATES: dict[str, float] = {"osora": 1e-2}

#: Training keys of osora's own (transformers' TrainingArguments has no such field, or a narrower type).
OSORA_TRAINING_FIELDS: dict[str, tuple[Any, Any, str]] = {
    "resume_from_checkpoint": (
        bool | str | None,
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
    "group_by_length": "training.train_sampling_strategy group_by_length (or random)",
}


@dataclass
class TrainingConfig:
    """The training section: every field of transformers' ``TrainingArguments`` (osora's defaults where they
    differ, :data:`TRAINING_DEFAULTS`) plus ``resume_from_checkpoint`` (also true) and ``overwrite_output_dir``;
    ``TrainingArguments`` validates them when a run builds it. ``cfg.training.<field>`` reads a value.
    """

    values: dict[str, Any] = _help(None, "Every key of the section.", factory=dict)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key == "values" or key not in self.values:
            raise AttributeError(key)
        return self.values[key]

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``TrainingArguments``."""
        return {k: v for k, v in self.values.items() if k not in OSORA_TRAINING_FIELDS}


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
    """A config file or option that does not fit the schema; the message names the key."""


#: peft's bookkeeping fields of every PEFT config: not the user's to set (task_type is always CAUSAL_LM).
PEFT_BOOKKEEPING = frozenset(
    {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "peft_version", "task_type"}
)
SECTIONS = ("model", "data", "method", "training", "eval")


def _add_section(
    parser: Any, cls: type, key: str, skip: frozenset[str] = frozenset(), **defaults: Any
) -> None:
    """``--key.field`` options for every field of dataclass ``cls``, its ``help`` metadata as their help."""
    parser.add_class_arguments(cls, key, skip=set(skip), default=defaults or None, instantiate=False)
    helps = {f.name: " ".join(str(f.metadata.get("help", "")).split()) for f in dataclasses.fields(cls)}
    for action in parser._actions:
        name = action.dest.removeprefix(f"{key}.")
        if action.dest.startswith(f"{key}.") and helps.get(name):
            action.help = helps[name]


@functools.cache
def parser(command: str = "train", family: str | None = "osora") -> Any:
    """The jsonargparse parser of ``osora COMMAND`` whose method section is the fields of ``family``'s config
    class (None: any keys, as a mapping; read to find the method's name, and for methods without an adapter)."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from transformers import TrainingArguments

    from .methods import config_class

    p = ArgumentParser(
        prog=f"osora {command}",
        description="A run from YAML files (--config, repeatable; later ones win) and --section.key VALUE options: "
        "model, data, method (its name and the fields of its PEFT config class: --method.name lora --help lists "
        "LoraConfig's), training (transformers' TrainingArguments, osora's defaults where they differ) and eval.",
        exit_on_error=False,
        allow_abbrev=False,
    )
    p.add_argument(
        "--config", action=ActionConfigFile, help="A YAML config file (repeatable; later ones win)."
    )
    for key, section in (("model", ModelConfig), ("data", DataConfig), ("eval", EvalConfig)):
        _add_section(p, section, key)
    if family is None:
        p.add_argument(
            "--method", type=dict[str, Any], default={}, help="The method's name and config fields."
        )
    else:
        help_ = MethodConfig.__dataclass_fields__["name"].metadata["help"]
        p.add_argument("--method.name", type=str, default=MethodConfig.name, help=help_)
        cls = config_class(family)  # type: ignore[arg-type]
        _add_section(p, cls, "method", PEFT_BOOKKEEPING)
        if "dropout" not in {f.name for f in dataclasses.fields(cls)}:
            p.add_argument(
                "--method.dropout", type=float | None, default=None, help="The adapter's input dropout."
            )
    rate = FAMILY_LEARNING_RATES.get(family or "", TRAINING_DEFAULTS["learning_rate"])
    training = {**TRAINING_DEFAULTS, "learning_rate": rate}
    _add_section(p, TrainingArguments, "training", frozenset(OSORA_TRAINING_FIELDS), **training)
    for name, (tp, default, text) in OSORA_TRAINING_FIELDS.items():
        p.add_argument(f"--training.{name}", type=tp, default=default, help=text)
    return p


def parse(command: str, argv: list[str]) -> RunConfig:
    """The :class:`RunConfig` of ``osora COMMAND ARGV`` (``--config`` files and ``--section.key value`` options).

    The method's name is read first (any method keys accepted), then the arguments are parsed again with the
    method section typed by that method's PEFT config class, so ``--help`` lists its fields.

    Raises:
        ConfigError: a missing or invalid config file, an unknown key or a value of the wrong type.
        SystemExit: ``--help`` or ``--print_config`` printed what they print.
    """
    from jsonargparse import ArgumentError

    family: str | None = "osora"
    try:
        for path in (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"):
            _require_file(Path(path))
        first = [a for a in argv if a not in {"-h", "--help"} and not a.startswith("--print_config")]
        family = _method(parser(command, None).parse_args(first).method.get("name", MethodConfig.name)).family
        p = parser(command, family)
        ns = p.parse_args(argv)
    except ArgumentError as error:
        raise ConfigError(_explain(str(error), argv, family)) from error
    sections = {key: ns[key].as_dict() if hasattr(ns[key], "as_dict") else ns[key] for key in SECTIONS}
    method = sections["method"]
    method.setdefault("name", MethodConfig.name)
    if family is None:
        fields = {k: v for k, v in method.items() if k != "name"}
    else:  # the keys the config sets (the class's own defaults are left to it)
        defaults = _method_defaults(command, family)
        fields = {k: v for k, v in method.items() if k != "name" and v != defaults.get(k)}
    cfg = RunConfig(
        model=ModelConfig(**sections["model"]),
        data=DataConfig(**sections["data"]),
        method=MethodConfig(name=method["name"], fields=fields),
        training=TrainingConfig(sections["training"]),
        eval=EvalConfig(**sections["eval"]),
    )
    cfg.method.peft_config()  # validated by the method's own config class
    return cfg


@functools.cache
def _method_defaults(command: str, family: str) -> dict[str, Any]:
    return parser(command, family).parse_args([])["method"].as_dict()


def _require_file(path: Path) -> None:
    if not path.is_file():
        what = "is a directory, not a YAML file" if path.is_dir() else "no such file"
        raise ConfigError(
            f"config file {path}: {what}; pass the path of a YAML config such as configs/tiny/gsm8k-osora.yaml"
        )


def _explain(message: str, argv: list[str], family: str | None) -> str:
    """jsonargparse's message for a user's mistake as one line naming the key, its file and the fix where known."""
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    yaml_at = re.search(
        r"Problems parsing config:\s*(.*?)\s+in \"<unicode string>\", line (\d+), column (\d+)", message, re.S
    )
    if yaml_at:
        return f"{configs[-1]}:{yaml_at.group(2)}:{yaml_at.group(3)}: invalid YAML: {yaml_at.group(1)}"
    unknown = re.search(
        r"Group '(\w+)' does not accept option '(\w+)'|unrecognized arguments: --(\w+)\.(\w+)", message
    )
    typed = re.match(r'Parser key "(\w+)\.([\w.]+)":\s*(.*)', message, re.S)
    if unknown:
        section, key = unknown.group(1) or unknown.group(3), unknown.group(2) or unknown.group(4)
        text = f"unknown config key '{section}.{key}'; osora train --help lists the keys"
        if section == "training" and key in RENAMED_TRAINING_KEYS:
            text = f"unknown config key 'training.{key}'; use {RENAMED_TRAINING_KEYS[key]}"
        if section == "method" and family is not None:
            from .methods import config_class

            cls = config_class(family).__name__  # type: ignore[arg-type]
            text = (
                f"unknown config key 'method.{key}': {cls} has no such field; osora train --help lists them"
            )
    elif typed:
        section, key = typed.group(1), typed.group(2)
        text = f"config key '{section}.{key}': {' '.join(typed.group(3).split())}"
    elif message.startswith("unrecognized arguments"):  # e.g. CONFIG.yaml or section.key=value without dashes
        return f"{' '.join(message.split())}; write --config CONFIG.yaml and --section.key VALUE options"
    else:
        return " ".join(message.split())
    from_file = configs and not any(a.startswith(f"--{section}.{key}") for a in argv)
    return f"{configs[-1]}: {text}" if from_file else text


def load_config(path: str | Path | None, args: list[str] | None = None) -> RunConfig:
    """A :class:`RunConfig` from a YAML file (or the defaults) and ``--section.key=value`` options."""
    return parse("train", [*(["--config", str(path)] if path is not None else []), *(args or [])])


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain data (saved next to every run and report)."""
    tree = dataclasses.asdict(cfg)
    tree["method"] = {"name": cfg.method.name, **cfg.method.fields}
    tree["training"] = dict(cfg.training.values)
    return tree


def config_from_argv(command: str, argv: list[str]) -> RunConfig | int:
    """The RunConfig of ``osora COMMAND [--config CONFIG.yaml] [--section.key value ...]``, or the exit code.

    ``-h``/``--help`` prints every key with its type, default and help (exit 0); no arguments print it too
    (exit 2). A config error raises :class:`ConfigError`, which the ``osora`` command prints (exit 2).
    """
    if not argv:
        parser(command).print_help()
        return 2
    try:
        return parse(command, argv)
    except SystemExit as done:  # --help, --print_config
        return int(done.code or 0)
