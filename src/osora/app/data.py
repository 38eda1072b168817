"""Fine-tuning and evaluation data: records -> (prompt, response) -> token ids with the loss on the response only.

Supported record layouts (``data.format``):

- metamath: ``{query, response}`` (MetaMathQA)
- gsm8k: ``{question, answer}`` with the answer ending ``#### n``
- commonsense: ``{instruction, input, output, answer}`` (LLM-Adapters' commonsense_170k and test sets)
- alpaca: ``{instruction, input, output}``
- math: ``{problem, solution}`` (Hendrycks MATH)

Records with missing fields, an empty response, or more than ``data.max_length`` tokens are counted per reason
in a :class:`DataReport` that the trainer logs; none is dropped silently.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataFormat, PromptStyle

logger = logging.getLogger(__name__)

PAPER_TEMPLATE = "Question: {question}\nLet's think step by step\nAnswer:"
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{question}\n\n### Response:\n"
)
ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{question}\n\n### Input:\n{input}\n\n### Response:\n"
)

#: format -> (question field, response field); ``input`` is appended by the prompt where the format has one.
FIELDS: dict[str, tuple[str, str]] = {
    "metamath": ("query", "response"),
    "gsm8k": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "commonsense": ("instruction", "output"),  # alpaca plus an "answer" field (told apart in detect_format)
    "math": ("problem", "solution"),
}


def detect_format(record: Mapping[str, Any]) -> str:
    """The layout of ``record`` from its keys (the first format whose fields are all present)."""
    if "answer" in record and "instruction" in record:
        return "commonsense"
    for name, keys in FIELDS.items():
        if all(k in record for k in keys):
            return name
    raise ValueError(f"cannot detect the data format from the keys {sorted(record)}; set data.format")


class DataError(ValueError):
    """A data file that is missing, malformed (the message names the file and line) or holds no records."""


_JSON_TYPES = {
    str: "a string",
    dict: "an object",
    list: "a list",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file, or of one JSON list, as parsed by ``json`` (strings stay strings: pyarrow's
    JSON reader, behind ``datasets.load_dataset("json")``, turns ISO-date strings such as "1938-11-06" into
    timestamps, and a model would then train on "1938-11-06 00:00:00").

    Raises:
        DataError: "FILE:LINE: problem" for a line that is not JSON, not an object, or whose field changes type from
            the earlier lines (a column needs one type); an empty file.
    """
    text = path.read_text(errors="replace")
    if not text.strip():
        raise DataError(f"{path}: the file is empty; point data.path/eval.path at a file with records")
    if text.lstrip().startswith("["):  # one JSON document holding a list of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg}); fix the file") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a JSON file must hold a list of records, got {type(records).__name__}")
        lines: list[tuple[str, Any]] = [(f"{path} (record {i})", r) for i, r in enumerate(records, start=1)]
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno}); fix or remove that line"
                ) from None
    types: dict[str, tuple[str, str]] = {}
    for where, record in lines:
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: a record must be a JSON object, got {type(record).__name__}; fix or remove it"
            )
        for key, value in record.items():
            if value is None:
                continue
            kind = _JSON_TYPES.get(type(value), type(value).__name__)
            seen = types.setdefault(key, (kind, where))
            if seen[0] != kind:
                raise DataError(
                    f"{where}: field {key!r} is {kind}, but {seen[0]} at {seen[1]}; make them agree"
                )
    return [record for _, record in lines]


def load_split(
    path: str | Sequence[str], name: str | None = None, split: str = "train", max_samples: int | None = None
):
    """A ``datasets.Dataset`` from a local .json/.jsonl file or a hub dataset id (a list of them: concatenated).

    With a list, ``max_samples`` caps each part (the first N records of every file), so a mixture stays balanced.

    Raises:
        DataError: a missing local file, a malformed one (naming the file and line) or one without records.
    """
    import datasets

    if not isinstance(path, str):
        if not path:
            raise DataError("data.path is an empty list; give one or more files or dataset ids")
        parts = [load_split(p, name, split, max_samples) for p in path]
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]

    local = Path(path).expanduser()
    if local.is_file():
        records = read_json_records(local)
        if not records:
            raise DataError(
                f"{path}: the file holds no records; point data.path/eval.path at a non-empty file"
            )
        ds = datasets.Dataset.from_list(records)
    elif local.exists() or path.startswith((".", "/", "~")) or local.suffix in {".json", ".jsonl"}:
        what = "is a directory, not a .json/.jsonl file" if local.exists() else "no such file or directory"
        raise DataError(f"{path}: {what}")
    else:
        ds = datasets.load_dataset(path, name, split=split)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def load_records(
    path: str | Sequence[str],
    name: str | None = None,
    split: str = "train",
    max_samples: int | None = None,
) -> list[dict[str, Any]]:
    """Records (plain dicts) from a local .json/.jsonl file or a hub dataset (through ``datasets``)."""
    return [dict(r) for r in load_split(path, name, split, max_samples)]


def question_of(record: Mapping[str, Any], fmt: str) -> str:
    return str(record[FIELDS[fmt][0]])


def response_of(record: Mapping[str, Any], fmt: str) -> str:
    return str(record[FIELDS[fmt][1]])


def _input_of(record: Mapping[str, Any], fmt: str) -> str:
    return str(record.get("input") or "").strip() if fmt in {"commonsense", "alpaca"} else ""


def user_message(record: Mapping[str, Any], fmt: str) -> str:
    """The question of ``record`` with its ``input`` on the next line: the user turn of the chat prompt."""
    question, extra = question_of(record, fmt), _input_of(record, fmt)
    return f"{question}\n{extra}" if extra else question


def make_prompt(record: Mapping[str, Any], fmt: str, style: PromptStyle, tokenizer: Any = None) -> str:
    """The prompt of ``record`` in ``style`` (the response follows it directly)."""
    if style == "alpaca":
        question, extra = question_of(record, fmt), _input_of(record, fmt)
        if extra:
            return ALPACA_INPUT_TEMPLATE.format(question=question, input=extra)
        return ALPACA_TEMPLATE.format(question=question)
    question = user_message(record, fmt)
    if style == "chat":
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PAPER_TEMPLATE.format(question=question)


@dataclass
class DataReport:
    """How many records were kept and why the others were not."""

    total: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def log(self, what: str = "training data") -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        message = f"{what}: {self.kept}/{self.total} records kept; skipped: {reasons}"
        (logger.warning if self.skipped else logger.info)(message)
        return message


def encode(
    record: Mapping[str, Any], tokenizer: Any, fmt: DataFormat, style: PromptStyle, max_length: int
) -> dict:
    """One record as input_ids / attention_mask / labels (-100 on the prompt), or ``skip`` naming why not."""
    record_fmt = detect_format(record) if fmt == "auto" else fmt
    empty: dict[str, Any] = {"input_ids": [], "attention_mask": [], "labels": []}
    missing = [k for k in FIELDS[record_fmt] if record.get(k) is None]
    if missing:
        return {**empty, "skip": f"missing {'/'.join(missing)}"}
    response = response_of(record, record_fmt).strip()
    if not response:
        return {**empty, "skip": "empty response"}
    prompt = make_prompt(record, record_fmt, style, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=style != "chat")["input_ids"]
    separator = " " if style == "paper" else ""
    response_ids = tokenizer(separator + response + (tokenizer.eos_token or ""), add_special_tokens=False)[
        "input_ids"
    ]
    if len(prompt_ids) + len(response_ids) > max_length:
        return {**empty, "skip": f"longer than {max_length} tokens"}
    return {
        "input_ids": prompt_ids + response_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(response_ids)),
        "labels": [-100] * len(prompt_ids) + response_ids,
        "skip": "",
    }


def build_train_dataset(records: Any, tokenizer: Any, data_cfg: Any):  # -> (datasets.Dataset, DataReport)
    """Tokenize ``records`` (a list or a ``datasets.Dataset``) with ``datasets.map`` (``data.num_proc``
    workers); returns the dataset of input_ids / attention_mask / labels / length and its :class:`DataReport`."""
    import datasets

    if not isinstance(records, datasets.Dataset):
        records = datasets.Dataset.from_list(list(records))
    encoded = records.map(
        encode,
        fn_kwargs={
            "tokenizer": tokenizer,
            "fmt": data_cfg.format,
            "style": data_cfg.prompt,
            "max_length": data_cfg.max_length,
        },
        remove_columns=records.column_names,
        num_proc=data_cfg.num_proc,
        desc="tokenizing",
    )
    skips = Counter(encoded["skip"])
    report = DataReport(total=len(encoded), kept=skips.pop("", 0), skipped=skips)
    if not report.kept:
        raise ValueError(f"no usable training records: {report.log()}")
    kept = encoded.filter(lambda skip: skip == "", input_columns="skip").remove_columns("skip")
    kept = kept.map(lambda ids: {"length": len(ids)}, input_columns="input_ids")  # for length-grouped batches
    return kept, report


def word_level_tokenizer(texts: Iterable[str]):  # -> PreTrainedTokenizerFast
    """A word-level tokenizer trained on ``texts`` in-process (for offline smoke tests; no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def texts_of(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every string field of ``records`` plus the prompt templates (the corpus of :func:`word_level_tokenizer`)."""
    texts = [PAPER_TEMPLATE, ALPACA_INPUT_TEMPLATE]
    for record in records:
        texts += [str(v) for v in record.values() if isinstance(v, str)]
    return texts


def few_shot_prefix(
    shots: Sequence[Mapping[str, Any]], fmt: str, style: PromptStyle, tokenizer: Any = None
) -> Callable[[str], str]:
    """A function that prepends ``shots`` (prompt + response each) to a prompt."""
    prefix = "".join(
        make_prompt(s, detect_format(s) if fmt == "auto" else fmt, style, tokenizer)
        + (" " if style == "paper" else "")
        + response_of(s, detect_format(s) if fmt == "auto" else fmt).strip()
        + "\n\n"
        for s in shots
    )
    return lambda prompt: prefix + prompt
