"""``osora demo``: fine-tune the real SmolLM2-135M-Instruct offline on a task it cannot do, OSoRA beside LoRA.

The task is generated here (no data folder): write a date given in words ("14 March 2019", "March 14, 2019") as
``YYYY-MM-DD``. The base model cannot: it repeats the date or talks about it (0% exact match). The held-out dates
use years that never occur in training, so only the rule, not the examples, solves them. Prompts go through the
model's chat template and the loss covers the answer only (:func:`osora.app.data.encode`), as in ``osora train``.

OSoRA and LoRA (PEFT's own) train for the same number of steps on the same batches, each as an ``osora train`` run
(:func:`osora.app.train.run`, the one training path) over the generated records, then:

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

from .cli import argument_parser, parse_arguments
from .data import make_prompt
from .encoder_demo import plot_losses, size_text
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


def run_config(args: Any, method: str, rank: int, lr: float) -> Any:
    """The ``osora train`` config of one method's run: the same data, schedule and Trainer as every run."""
    from .config import load_config

    return load_config(
        None,
        [
            f"--model.name_or_path={args.model}",
            "--model.dtype=float32",
            "--data.format=alpaca",
            "--data.prompt=chat",
            f"--data.max_length={args.max_length}",
            f"--method.name={method}",
            f"--method.r={rank}",
            f"--training.output_dir={Path(args.out) / 'adapters' / method}",
            "--training.overwrite_output_dir=true",
            f"--training.max_steps={args.steps}",
            f"--training.per_device_train_batch_size={args.batch_size}",
            f"--training.learning_rate={lr}",
            "--training.lr_scheduler_type=linear",
            "--training.warmup_steps=0.1",
            "--training.train_sampling_strategy=random",
            "--training.logging_steps=1",
            "--training.save_strategy=no",
            "--training.report_to=[]",
            f"--training.seed={args.seed}",
            "--training.use_cpu=true",
            "--training.disable_tqdm=false",
        ],
    )


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':<16} {'held-out exact match':>21} {'trainable params':>17} {'adapter':>10} {'train time':>11}",
        "-" * 79,
    ]
    for r in rows:
        params = f"{r['trainable_params']:,}" if r["trainable_params"] else "-"
        size = size_text(r["adapter_bytes"]) if r["adapter_bytes"] else "-"
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

    from .checkpoints import atomic_write_text
    from .params import count_parameters
    from .train import received_signal, run

    # harmless here: peft looking for the base's config under its short name (the vocabulary is not modified)
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
    del base
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
        print(f"[{method}] r={rank}, lr={lr:g}")
        trainer = run(run_config(args, method, rank, lr), records=task.train)  # saves adapter and tokenizer
        if received_signal(trainer) is not None:
            raise KeyboardInterrupt
        model, history = trainer.model.eval(), trainer.state.log_history
        trainable, total = count_parameters(model)
        losses, seconds = [h["loss"] for h in history if "loss" in h], history[-1]["train_runtime"]
        adapter_dir = out / "adapters" / method
        if method == "osora":
            export.save_as_lora(model, out / "adapters" / "osora-as-lora")
            osora.save_adapter(model, out / "adapters" / "osora-compact", save_factors=False)
            compact = _size(out / "adapters" / "osora-compact")
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
    if "osora" in args.methods:
        print(
            f"the osora adapter without its frozen factors (save_factors=False; recomputed on load): "
            f"{size_text(compact)} in {out / 'adapters' / 'osora-compact'}"
        )
    print("\nheld-out answers (reference | base | " + " | ".join(args.methods) + "):")
    for i, record in enumerate(task.test[: args.show]):
        date = record["instruction"].removeprefix("Write the date ").split(" in the form")[0]
        answers_i = " | ".join(after[m][i] for m in args.methods)
        print(f"  {date:<20} {record['output']} | {base_answers[i]!r} | {answers_i}")

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
    atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
    print(f"\nloss curves: {out / 'loss_curves.png'}; results: {out / 'results.json'}; total {wall:.0f}s")
    if "osora" in args.methods:
        print(
            f'try the adapter: osora generate {out / "adapters" / "osora"} "Write the date 3 May 1987 in the form YYYY-MM-DD."'
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
