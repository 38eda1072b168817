"""``osora demo``: fine-tune the real SmolLM2-135M-Instruct offline on a task it cannot do, OSoRA beside LoRA.

The task is generated here (no data folder): write a date given in words ("14 March 2019", "March 14, 2019") as
``YYYY-MM-DD``. The base model cannot: it repeats the date or talks about it (0% exact match). The held-out dates
use years that never occur in training, so only the rule, not the examples, solves them. Prompts go through the
model's chat template and the loss covers the answer only (:func:`osora.app.data.encode`), as in ``osora train``.

OSoRA and LoRA (PEFT's own) train for the same number of steps on the same batches, then:

- held-out exact-match accuracy of the base model and of each fine-tuned one (generated on merged weights, each
  sequence stopped at its end-of-turn token), trainable parameters, adapter size and training time are printed,
  with a few held-out answers before and after;
- the OSoRA adapter (``<out>/adapters/osora``), its PEFT LoRA export (``<out>/adapters/osora-as-lora``) and the
  LoRA adapter are saved, the loss curves go to ``<out>/loss_curves.png`` and every number to
  ``<out>/results.json``;
- it ends with the ``osora generate`` command that tries the adapter.

``osora demo --encoder`` runs the earlier MiniLM-L6 sentiment demo instead (:mod:`osora.app.encoder_demo`).

Example:
    osora demo                      # SmolLM2-135M-Instruct, about 4 minutes on 2 CPU cores
    osora demo --steps 40 --out runs/demo
"""

from __future__ import annotations

import json
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .cli import argument_parser, parse_arguments
from .config import MethodConfig
from .data import encode, make_prompt
from .evaluate import generate, merged_for_inference
from .models import DEFAULT_MODEL, load_causal_lm

#: Methods compared: (rank, learning rate). LoRA's r=8 is the usual choice; OSoRA's r=32 trains fewer numbers.
DEMO_METHODS: dict[str, tuple[int, float]] = {"osora": (32, 2e-2), "lora": (8, 2e-3)}

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
FORMATS = ("{d} {month} {y}", "{month} {d}, {y}")
INSTRUCTION = "Write the date {date} in the form YYYY-MM-DD."

# -- the generated task -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DateTask:
    """Records ``{"instruction", "output"}`` (the alpaca layout of :mod:`osora.app.data`); test years are unseen."""

    train: list[dict[str, str]]
    test: list[dict[str, str]]
    test_years: frozenset[int]


def date_task(n_train: int = 512, n_test: int = 64, seed: int = 0) -> DateTask:
    """Deterministic (seeded) date records; a fifth of the years 1900-2099 is held out for the test split."""
    rng = random.Random(seed)
    years = list(range(1900, 2100))
    rng.shuffle(years)
    test_years, train_years = years[: len(years) // 5], years[len(years) // 5 :]

    def sample(n: int, pool: list[int]) -> list[dict[str, str]]:
        out = []
        for _ in range(n):
            y, m, d = rng.choice(pool), rng.randint(1, 12), rng.randint(1, 28)
            date = rng.choice(FORMATS).format(d=d, month=MONTHS[m - 1], y=y)
            out.append({"instruction": INSTRUCTION.format(date=date), "output": f"{y}-{m:02d}-{d:02d}"})
        return out

    return DateTask(sample(n_train, train_years), sample(n_test, test_years), frozenset(test_years))


# -- training and scoring -----------------------------------------------------------------------------------------


def answers(model: Any, tokenizer: Any, records: list[dict[str, str]], batch_size: int = 32) -> list[str]:
    """Greedy answers to ``records`` through the chat template, each stopped at its end of turn."""
    prompts = [make_prompt(r, "alpaca", "chat", tokenizer) for r in records]
    out = generate(
        model, tokenizer, prompts, batch_size, max_new_tokens=16, add_special_tokens=False, progress=False
    )
    return [a.strip() for a in out]


def exact_match(predictions: list[str], records: list[dict[str, str]]) -> float:
    return sum(p == r["output"] for p, r in zip(predictions, records)) / max(len(records), 1)


def train(model: Any, tokenizer: Any, records: list[dict[str, str]], args: Any, lr: float):
    """Train ``model`` for ``args.steps`` steps with transformers' Trainer; returns (per-step losses, seconds)."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    examples = [encode(r, tokenizer, "alpaca", "chat", args.max_length) for r in records]
    dataset = Dataset.from_list(
        [{k: v for k, v in e.items() if k != "skip"} for e in examples if not e["skip"]]
    )
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=True,
        disable_tqdm=False,
    )
    tokenizer.padding_side = "right"
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, seconds


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _fmt_size(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':<16} {'held-out exact match':>21} {'trainable params':>17} {'adapter':>10} {'train time':>11}",
        "-" * 79,
    ]
    for r in rows:
        params = f"{r['trainable_params']:,}" if r["trainable_params"] else "-"
        size = _fmt_size(r["adapter_bytes"]) if r["adapter_bytes"] else "-"
        seconds = f"{r['train_seconds']:.0f}s" if r["train_seconds"] else "-"
        lines.append(f"{r['model']:<16} {100 * r['accuracy']:>20.1f}% {params:>17} {size:>10} {seconds:>11}")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> Any:
    p = argument_parser("demo", __doc__.split("\n\n")[0] + " (--encoder first: the MiniLM-L6 sentiment demo)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"causal LM (default: {DEFAULT_MODEL}, offline)")
    p.add_argument("--out", default="osora-demo", help="output directory (default: ./osora-demo)")
    methods = Literal[tuple(DEMO_METHODS)]  # type: ignore[misc,valid-type]  # the names of DEMO_METHODS
    p.add_argument("--methods", type=list[methods], default=list(DEMO_METHODS))  # type: ignore[valid-type]
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per method (the same budget)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--train_size", type=int, default=512)
    p.add_argument("--test_size", type=int, default=64)
    p.add_argument("--max_length", type=int, default=80, help="tokens per training record (prompt + answer)")
    p.add_argument(
        "--lr", type=list[float] | None, default=None, help="learning rate per method (default: tuned)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=4, help="held-out answers shown before and after")
    args = parse_arguments(p, argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--encoder" in argv:
        from . import encoder_demo

        return encoder_demo.main([a for a in argv if a != "--encoder"])
    args = parse_args(argv)
    import osora
    from osora import export

    from .params import count_parameters
    from .train import apply_method

    # harmless here: a transformers deprecation raised inside peft, and peft looking for the base's config under
    # its short name (the vocabulary is not modified)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = date_task(args.train_size, args.test_size, args.seed)
    print(
        f"osora demo: {args.model}; task: write a date given in words as YYYY-MM-DD "
        f"({len(task.train)} train / {len(task.test)} held-out dates, held-out years never seen in training)"
    )
    base, tokenizer = load_causal_lm(args.model, dtype="float32")
    base_answers = answers(base.eval(), tokenizer, task.test)
    rows: list[dict[str, Any]] = [
        {"model": "base", "accuracy": exact_match(base_answers, task.test), "trainable_params": 0,
         "adapter_bytes": 0, "train_seconds": 0.0}
    ]  # fmt: skip
    print(f"[base] held-out exact match {100 * rows[0]['accuracy']:.1f}%")
    curves: dict[str, list[float]] = {}
    after: dict[str, list[str]] = {}
    lrs = dict(zip(args.methods, args.lr or [])) if args.lr else {}
    for method in args.methods:
        rank, default_lr = DEMO_METHODS[method]
        lr = lrs.get(method, default_lr)
        if method != args.methods[0]:
            base, _ = load_causal_lm(args.model, dtype="float32", with_tokenizer=False)
        torch.manual_seed(args.seed)
        model = apply_method(base, MethodConfig(name=method, fields={"r": rank}))  # as osora train builds it
        trainable, total = count_parameters(model)
        print(f"[{method}] r={rank}, lr={lr:g}: trainable params {trainable:,} / {total:,}")
        losses, seconds = train(model, tokenizer, task.train, args, lr)
        adapter_dir = out / "adapters" / method
        osora.save_adapter(model.eval(), adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        if method == "osora":
            export.save_as_lora(model, out / "adapters" / "osora-as-lora")
        predictions = answers(merged_for_inference(model), tokenizer, task.test)
        accuracy = exact_match(predictions, task.test)
        print(
            f"[{method}] held-out exact match {100 * accuracy:.1f}% after {args.steps} steps ({seconds:.0f}s)"
        )
        rows.append(
            {"model": f"{method} r={rank}", "method": method, "accuracy": accuracy, "trainable_params": trainable,
             "total_params": total, "adapter_bytes": _size(adapter_dir), "train_seconds": seconds, "lr": lr}
        )  # fmt: skip
        curves[method], after[method] = losses, predictions

    print()
    print(table(rows))
    print("\nheld-out answers (reference | base | " + " | ".join(args.methods) + "):")
    for i, record in enumerate(task.test[: args.show]):
        date = record["instruction"].removeprefix("Write the date ").split(" in the form")[0]
        answers_i = " | ".join(after[m][i] for m in args.methods)
        print(f"  {date:<20} {record['output']} | {base_answers[i]!r} | {answers_i}")

    from .encoder_demo import plot_losses

    plot_losses(curves, out / "loss_curves.png")
    wall = time.perf_counter() - start
    report = {
        "model": args.model,
        "task": "date -> YYYY-MM-DD (generated, held-out years)",
        "config": args.as_dict(),
        "results": rows,
        "examples": [
            {
                "prompt": r["instruction"],
                "reference": r["output"],
                "base": base_answers[i],
                **{m: after[m][i] for m in args.methods},
            }
            for i, r in enumerate(task.test)
        ],  # fmt: skip
        "wall_seconds": wall,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nloss curves: {out / 'loss_curves.png'}; results: {out / 'results.json'}; total {wall:.0f}s")
    if "osora" in args.methods:
        print(
            f'try the adapter: osora generate {out / "adapters" / "osora"} "Write the date 3 May 1987 in the form YYYY-MM-DD."'
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
