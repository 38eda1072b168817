"""Sequence classification, small and plain: read a labelled file, build a head-only / full / LoRA / VeRA / OSoRA
model, train it with transformers' Trainer, score it, measure its adapter file.

Shared by ``osora demo --encoder`` and ``benchmarks/glue.py`` so that both compare methods under exactly the same
training: one ``TrainingArguments`` schema (:data:`TRAINING_ARGUMENTS`), as in ``osora train``.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .methods import get_method, peft_config

#: Column names tried, in order, for (first text, second text): the GLUE sentence-pair layouts (RTE/WNLI/MNLI
#: ``sentence1/2``, MRPC ``#1 String``/``#2 String``, QQP ``question1/2``, QNLI ``question``/``sentence``, the hub's
#: MNLI ``premise``/``hypothesis``), then single texts (SST-2/CoLA ``sentence``, the usual ``text``).
TEXT_COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("sentence1", "sentence2"),
    ("#1 String", "#2 String"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("text", "text_pair"),
    ("sentence", None),
    ("text", None),
)
#: Column names tried, in order, for the label (MRPC's TSV calls it ``Quality``, MNLI's ``gold_label``).
LABEL_COLUMNS = ("label", "Quality", "gold_label", "labels")


@dataclass
class Example:
    """One labelled example: a text, an optional second text (sentence-pair tasks) and an integer label."""

    text: str
    label: int
    text_pair: str | None = None


@dataclass
class Dataset:
    """Examples plus the label names, index i being label i."""

    examples: list[Example]
    label_names: list[str]


def text_columns(columns: Sequence[str], source: object) -> tuple[str, str | None]:
    """The (text, second text or None) columns of a table with these ``columns``, by :data:`TEXT_COLUMNS`."""
    for text, pair in TEXT_COLUMNS:
        if text in columns and (pair is None or pair in columns):
            return text, pair
    raise ValueError(
        f"{source}: no text column; expected one of {sorted({c for p in TEXT_COLUMNS for c in p if c})}, "
        f"found {list(columns)}"
    )


def label_column(columns: Sequence[str], source: object) -> str:
    for name in LABEL_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"{source}: no label column; expected one of {list(LABEL_COLUMNS)}, found {list(columns)}"
    )


def _read_rows(path: Path) -> list[dict[str, str]]:
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json"}:
        with path.open(encoding="utf-8") as f:
            return [{k: str(v) for k, v in json.loads(line).items()} for line in f if line.strip()]
    if suffix not in {".tsv", ".csv"}:
        raise ValueError(f"{path}: unsupported format {suffix!r}; use .tsv, .csv or .jsonl")
    with path.open(encoding="utf-8", newline="") as f:
        if suffix == ".tsv":
            # GLUE's TSVs are not CSV-quoted: a sentence may start with a double quote.
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return list(csv.DictReader(f))


def read_labelled(path: str | os.PathLike[str], label_names: list[str] | None = None) -> Dataset:
    """Read a labelled TSV, CSV or JSONL file (the GLUE TSV layout included) into a :class:`Dataset`.

    Integer labels are kept as they are; string labels are numbered in sorted order (so RTE's ``entailment`` is 0,
    as in GLUE) unless ``label_names`` fixes the order, e.g. to read dev with train's names.
    """
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    columns = list(rows[0].keys())
    text_col, pair_col = text_columns(columns, path)
    label_col = label_column(columns, path)
    rows = [r for r in rows if r.get(label_col) not in (None, "")]
    raw = [r[label_col].strip() for r in rows]
    if label_names is None:
        if all(v.lstrip("-").isdigit() for v in raw):
            label_names = [str(i) for i in range(max(int(v) for v in raw) + 1)]
        else:
            label_names = sorted(set(raw))
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise ValueError(f"{path}: labels {unknown[:5]} not in {label_names}")
    examples = [
        Example(text=r[text_col], label=index[v], text_pair=r[pair_col] if pair_col else None)
        for r, v in zip(rows, raw)
    ]
    return Dataset(examples, label_names)


# -- tokenised batches ------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids per example (unpadded) and labels; :meth:`batch` pads a batch to its own longest example.

    ``features`` holds each example's input_ids and attention_mask (and token_type_ids where the tokenizer makes
    them); ``collate`` pads them on the tokenizer's padding side (transformers' ``DataCollatorWithPadding``).
    """

    features: list[dict[str, list[int]]]
    labels: torch.Tensor  # (n,)
    collate: Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.features)

    def length(self, i: int) -> int:
        return len(self.features[i]["input_ids"])

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        return {**self.collate([self.features[i] for i in idx]), "labels": self.labels[list(idx)]}


def encode(tokenizer: Any, examples: Sequence[Example], max_length: int = 64) -> Encoded:
    """Tokenise once, up front; padding happens per batch (transformers' ``DataCollatorWithPadding``)."""
    from transformers import DataCollatorWithPadding

    pairs = [e.text_pair for e in examples]
    has_pair = any(p is not None for p in pairs)
    texts = [e.text for e in examples]
    enc = tokenizer(
        texts, [p or "" for p in pairs] if has_pair else None, truncation=True, max_length=max_length
    )
    features = [dict(zip(enc.keys(), values)) for values in zip(*enc.values())]
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return Encoded(features, labels, DataCollatorWithPadding(tokenizer))


# -- models -----------------------------------------------------------------------------------------------------

#: The methods compared (names of :data:`osora.app.methods.METHODS`). ``osora`` is OSoRAConfig's default (raw S);
#: ``osora-scaled`` trains s with S = σ ⊙ s; ``osora-S`` / ``osora-O`` train one vector only (the paper's ablation).
METHODS = ("head", "full", "lora", "vera", "osora", "osora-scaled", "osora-S", "osora-O")


@dataclass
class MethodSpec:
    """How a method is built: LoRA's rank, and the rank r shared by VeRA and every OSoRA variant.

    VeRA and OSoRA both train r + d_out numbers per matrix, so one r gives them the same parameter budget.
    """

    name: str
    lora_rank: int = 8
    vector_rank: int = 64


#: How a sequence's hidden states become the classifier's input: ``model``, the architecture's own pooler (BERT's
#: dense + tanh over the [CLS] state); ``mean``, the masked mean over tokens that sentence-transformers encoders
#: such as all-MiniLM-L6-v2 are trained with (their [CLS] state and pooler were never trained as a summary).
POOLINGS = ("model", "mean")


class MeanPooler(nn.Module):
    """Masked mean of the last hidden states, in place of a BERT-style ``pooler``: (batch, seq, d) -> (batch, d).

    The pooler is called with the hidden states only, so the encoder's forward pre-hook (:func:`use_mean_pooling`)
    hands it the batch's attention mask first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None  # (batch, seq), set per forward

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden.mean(dim=1)
        weights = self.mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Replace a BERT-style model's [CLS] pooler with :class:`MeanPooler` (in place; returns ``model``)."""
    encoder = getattr(model, "base_model", model)
    if not isinstance(getattr(encoder, "pooler", None), nn.Module):
        raise ValueError(
            f"pooling='mean' replaces a BERT-style encoder's pooler, and {type(model).__name__} has none; "
            "use pooling='model'"
        )
    pooler = MeanPooler()
    encoder.pooler = pooler

    def take_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.mask = mask

    encoder.register_forward_pre_hook(take_mask, with_kwargs=True)
    return model


def load_base(
    model_name: str, num_labels: int, seed: int, pooling: str = "model"
) -> tuple[nn.Module, list[str]]:
    """The pretrained model with a fresh classification head (seeded), and the names of the head's modules.

    ``pooling`` is one of :data:`POOLINGS`.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized weights" warning is expected here
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_name, num_labels=num_labels, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    # the modules whose weights the checkpoint lacks: the task head (top-level, e.g. ``classifier``), and inside the
    # encoder e.g. BERT's pooler when the checkpoint was saved without it
    prefix = getattr(model, "base_model_prefix", "")
    head = sorted(
        {k.rsplit(".", 1)[0] if k.split(".")[0] == prefix else k.split(".")[0] for k in info["missing_keys"]}
    ) or ["classifier"]
    if pooling == "mean":
        use_mean_pooling(model)
        modules = dict(model.named_modules())
        head = [h for h in head if h in modules]  # a missing pooler is gone with the pooler
    return model, head


def in_head(name: str, head: list[str]) -> bool:
    """Whether parameter or module ``name`` belongs to one of the head's modules."""
    return any(name == h or name.startswith(h + ".") for h in head)


def target_modules(model: nn.Module, head: list[str]) -> list[str] | str:
    """OSoRA's default targets for the architecture, else every linear layer outside the head and the pooler."""
    from osora import DEFAULT_TARGET_MODULES

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    names = {
        name.split(".")[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not in_head(name, head) and "pooler" not in name
    }
    return sorted(names)


def build(method: str, model: nn.Module, head: list[str], spec: MethodSpec | None = None) -> nn.Module:
    """Wrap ``model`` for ``method`` (a name of :data:`osora.app.methods.METHODS`): freeze all but the head,
    unfreeze everything, or attach the method's PEFT adapter."""
    import peft

    family = get_method(method).family
    spec = spec or MethodSpec(method)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(in_head(name, head))
        return model
    fields: dict[str, Any] = {
        "target_modules": target_modules(model, head),
        "modules_to_save": list(head),  # a copy: peft extends the list it is given
        "task_type": "SEQ_CLS",
    }
    if family == "lora":
        fields |= {"r": spec.lora_rank, "lora_alpha": 2 * spec.lora_rank}
    elif family == "vera":
        # save_projection=False and save_factors=False: both vector methods save only their trained vectors
        # (plus what regenerates the frozen part), so adapter bytes compare like with like.
        fields |= {"r": spec.vector_rank, "save_projection": False}
    else:
        fields |= {"r": spec.vector_rank, "save_factors": False}
    return peft.get_peft_model(model, peft_config(method, **fields))


def save_trained(
    model: nn.Module, directory: str | os.PathLike[str], save_factors: bool | None = None
) -> int:
    """Save what a method trains (the PEFT adapter, or the trainable tensors for head/full); return its bytes.
    ``save_factors``: OSoRA's file mode (:func:`osora.save_adapter`; None: as configured)."""
    import peft

    import osora
    from osora.checkpoint import atomic_save_file

    directory = Path(directory)
    if isinstance(model, peft.PeftModel):
        osora.save_adapter(model, directory, save_factors=save_factors)
    else:
        tensors = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        atomic_save_file(tensors, directory / "model.safetensors")
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def adapter_bytes(model: nn.Module, save_factors: bool | None = None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return save_trained(model, Path(tmp) / "adapter", save_factors)


# -- training and scoring -------------------------------------------------------------------------------------


#: transformers' TrainingArguments of every classification run, beside its rate, epochs, batch size and seed:
#: AdamW, linear warm-up over the first 6 % of the steps and linear decay to 0, gradients clipped at norm 1, no
#: weight decay, the loss logged every step, nothing saved or reported.
TRAINING_ARGUMENTS: dict[str, Any] = {
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.06,  # a float below 1 is a fraction of the steps
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}


def training_arguments(lr: float, epochs: float, batch_size: int, seed: int = 0, **overrides: Any) -> Any:
    """The ``TrainingArguments`` of a run (:data:`TRAINING_ARGUMENTS`; ``epochs`` may be a fraction)."""
    from transformers import TrainingArguments

    fields: dict[str, Any] = {
        "learning_rate": lr,
        "num_train_epochs": epochs,
        "per_device_train_batch_size": batch_size,
    }
    fields |= {"seed": seed, "output_dir": os.path.join(tempfile.gettempdir(), "osora-classify")}
    fields["dataloader_pin_memory"] = torch.cuda.is_available()  # pinning warns on a machine without a GPU
    return TrainingArguments(**TRAINING_ARGUMENTS | fields | overrides)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def train(model: nn.Module, data: Encoded, args: Any, desc: str = "train") -> TrainResult:
    """Train ``model`` on ``data`` with transformers' Trainer under ``args`` (:func:`training_arguments`); returns
    the loss of every step, shown on one progress bar named ``desc`` (Trainer's own bar prints every log line)."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    result = TrainResult()

    class StepLosses(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = tqdm(total=state.max_steps, desc=desc, leave=False, disable=args.disable_tqdm)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.update()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                result.losses.append(float(logs["loss"]))
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.close()

    rows = [{**f, "labels": int(label)} for f, label in zip(data.features, data.labels)]
    trainer = Trainer(model, args, train_dataset=rows, data_collator=data.collate, callbacks=[StepLosses()])
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    metrics = trainer.train().metrics
    model.eval()
    result.seconds, result.steps = float(metrics["train_runtime"]), trainer.state.global_step
    return result


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, batch_size: int = 128, desc: str | None = None) -> torch.Tensor:
    """Logits (n, num_labels) on the CPU, batched by length so padding stays small; the batches go to the model's
    device (Trainer leaves a trained model on the GPU where there is one)."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=data.length)
    logits = torch.empty(0)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(chunks, desc=desc or "eval", leave=False, disable=desc is None):
        batch = data.batch(idx)
        batch.pop("labels")
        out = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()  # (batch, num_labels)
        if logits.numel() == 0:
            logits = torch.empty(len(data), out.shape[-1])
        logits[idx] = out
    return logits


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()
