"""Check OSoRA's learning-rate rule against every committed sweep: does one rate land near each task's pick?

Reads the committed results (``benchmarks/results/glue_*.json``: SST-2 on MiniLM-L6; ``llm_*.json``: SmolLM2-135M on
GSM8K and commonsense) and, for each file and each OSoRA row (raw S, and ``osora-scaled``), prints the rates its
sweep trained with the first seed, the rate the benchmark's protocol picked on held-out data, and the test
measure (SST-2 dev accuracy, GSM8K reference NLL, commonsense average accuracy) at the pick and at the rule's rate.
The rule holds on a task when the rule's rate scores within ``--points`` accuracy points (GSM8K: within
``--nll`` nats of reference NLL) of the pick, first seed against first seed. A file that never trained the rule's
rate, or fewer than three rates, says so. Nothing is trained: this only reads what the benchmarks wrote.

    python benchmarks/lr_rule.py                 # the rule osora.app uses: 1e-2
    python benchmarks/lr_rule.py --rate 0.0316
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The rows checked: OSoRA with both vectors trained (either parametrisation, any rank), as the benchmarks name them.
OSORA_ROW = re.compile(r"osora(-scaled)?(-r\d+)?")


def measures(path: Path, run: dict[str, Any]) -> tuple[float, float, str]:
    """(selection score, higher is better; test measure; its unit) of one run of the result file ``path``."""
    if path.name.startswith("glue_"):
        return run["select_acc"], 100 * run["dev_acc"], "dev acc (%)"
    import llm

    task = "commonsense" if "commonsense" in path.name else "gsm8k"
    if task == "gsm8k":
        return llm.selection_score(task, run), run["test_nll"], "ref NLL"
    return llm.selection_score(task, run), 100 * run["test_acc"]["average"], "avg acc (%)"


def check(path: Path, rate: float, points: float, nll: float) -> list[str]:
    runs = json.loads(path.read_text())["runs"]
    lines = []
    for method in sorted({r["method"] for r in runs if OSORA_ROW.fullmatch(r["method"])}):
        seeds = sorted({r["seed"] for r in runs if r["method"] == method})
        if not seeds:
            continue
        sweep = {r["lr"]: r for r in runs if r["method"] == method and r["seed"] == seeds[0]}
        # the protocol's pick: best held-out score, a tie going to the lower rate (as glue.py and llm.py pick)
        pick = max(sweep, key=lambda lr: (measures(path, sweep[lr])[0], -lr))
        _, at_pick, unit = measures(path, sweep[pick])
        near = [lr for lr in sweep if math.isclose(lr, rate, rel_tol=0.01)]
        if len(sweep) < 3:
            verdict, at_rule = "no check: fewer than 3 rates trained", "–"
        elif not near:
            verdict, at_rule = "rule's rate not trained", "–"
        else:
            value = measures(path, sweep[near[0]])[1]
            gap = value - at_pick if unit.endswith("(%)") else at_pick - value  # > 0: the rule scores better
            limit = points if unit.endswith("(%)") else nll
            verdict = f"{'holds' if gap >= -limit else 'misses'} ({gap:+.3g})"
            at_rule = f"{value:.4g}"
        tried = ", ".join(f"{lr:g}" for lr in sorted(sweep))
        lines.append(
            f"| {path.name} | {method} | {tried} | {pick:g} | {unit} | {at_pick:.4g} | {at_rule} | {verdict} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1e-2, help="the rule's learning rate")
    parser.add_argument("--points", type=float, default=1.0, help="accuracy points the rule may lose")
    parser.add_argument(
        "--nll", type=float, default=0.01, help="GSM8K reference NLL (nats) the rule may lose"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    print(
        f"Rule: learning rate {args.rate:g} (within {args.points:g} points, GSM8K within {args.nll:g} nats)\n"
    )
    print("| result file | row | rates trained (first seed) | pick | measure | at pick | at rule | rule |")
    print("|---|---|---|---:|---|---:|---:|---|")
    for path in sorted(args.results.glob("glue_*.json")) + sorted(args.results.glob("llm_*.json")):
        for line in check(path, args.rate, args.points, args.nll):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
