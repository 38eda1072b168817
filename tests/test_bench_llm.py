"""benchmarks/llm.py's pure parts: the option scorer, the GSM8K scorer, the schedule, resumability, the table."""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


import llm  # noqa: E402  (benchmarks/ is not a package: its folder is on the path)
import update_readme  # noqa: E402
from osora.app.provenance import RECORD_KEYS  # noqa: E402

ARC = {
    "instruction": "Please choose the correct answer to the question: Which is a metal?\n\n"
    "Answer1: wood Answer2: iron Answer3: glass\n\nAnswer format: answer1/answer2/answer3",
    "input": "",
    "output": "the correct answer is answer2",
    "answer": "answer2",
}
BOOLQ = {
    "instruction": "Please answer the following question with true or false, question: is iron a metal?\n\n"
    "Answer format: true/false",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}


def test_answer_options_and_responses():
    assert llm.answer_options(ARC) == ["answer1", "answer2", "answer3"]
    assert llm.answer_options(BOOLQ) == ["true", "false"]
    assert llm.option_response(BOOLQ, "false") == "the correct answer is false"
    with pytest.raises(ValueError, match="Answer format"):
        llm.answer_options({**ARC, "instruction": "no format line"})


def test_answer_texts_form_asks_the_bare_question_and_scores_each_options_text():
    arc = llm.answer_texts(ARC, set="arc_e")
    assert arc["instruction"] == "Which is a metal?" and arc["set"] == "arc_e"
    assert arc["option_texts"] == {"answer1": "wood", "answer2": "iron", "answer3": "glass"}
    assert arc["output"] == "iron" and llm.reference_answer(arc) == "answer2"  # the label stays the answer
    boolq = llm.answer_texts({**BOOLQ, "answer": "false", "output": "the correct answer is false"})
    assert boolq["instruction"] == "Is iron a metal?" and boolq["output"] == "no"
    assert boolq["option_texts"] == {"true": "yes", "false": "no"}
    missing = {**ARC, "instruction": ARC["instruction"].replace(" Answer3: glass", "")}
    with pytest.raises(ValueError, match=r"options \['answer1', 'answer2'\] listed"):
        llm.answer_texts(missing)
    with pytest.raises(ValueError, match="none of the options"):
        llm.answer_texts({**ARC, "answer": "answer4"})
    with pytest.raises(ValueError, match="no 'question:'"):
        llm.answer_texts({**ARC, "instruction": "Which is a metal?\n\nAnswer format: answer1/answer2"})


def test_choice_request_one_pass_only_when_options_differ_in_their_last_token():
    fast = llm.choice_request([1, 2], [[5, 6, 7], [5, 6, 8], [5, 6, 9]])
    assert fast.context == [1, 2, 5, 6] and fast.tokens == [7, 8, 9] and not fast.sequences
    slow = llm.choice_request([1, 2], [[5, 6, 7], [5, 8]])  # different lengths: one pass per option
    assert not slow.tokens and slow.sequences == [([1, 2], [5, 6, 7]), ([1, 2], [5, 8])]
    same_last = llm.choice_request([1], [[5, 7], [6, 7]])  # differ before the last token
    assert not same_last.tokens and len(same_last.sequences) == 2


def test_pick_option_first_of_equals():
    assert llm.pick_option([-3.0, -1.0, -1.0]) == 1
    assert llm.pick_option([-0.5]) == 0


def _tiny_lm_and_tokenizer(extra: Sequence[str] = ()):
    from osora.app.data import word_level_tokenizer

    from conftest import tiny_model

    texts = [ARC["instruction"], ARC["output"], BOOLQ["instruction"], BOOLQ["output"], "user assistant"]
    texts += list(extra)
    tokenizer = word_level_tokenizer(texts + [o for o in ("answer1", "answer3", "false")])
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant "
    )
    torch.manual_seed(0)
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tokenizer))
    return model.eval(), tokenizer


@pytest.mark.parametrize("answers", ["labels", "texts"])
def test_choice_outcomes_match_brute_force_full_sequence_scoring(answers):
    texts = [llm.answer_texts(r)["instruction"] for r in (ARC, BOOLQ)] + ["wood iron glass yes no old green"]
    model, tokenizer = _tiny_lm_and_tokenizer(texts if answers == "texts" else ())
    records = [ARC, BOOLQ, {**ARC, "answer": "answer3", "output": "the correct answer is answer3"}]
    if answers == "texts":  # options of several tokens too: the prompt's cache shared by its options
        words = ARC["instruction"].replace("wood", "old wood").replace("glass", "green glass glass")
        records = [llm.answer_texts(r) for r in [*records, {**ARC, "instruction": words}]]
        assert records[-1]["option_texts"]["answer3"] == "green glass glass"
    brute, brute_nll = [], []
    for record in records:
        prompt = llm.prompt_ids(tokenizer, record, "commonsense")
        options = llm.options_of(record)
        responses = {
            o: record["option_texts"][o] if answers == "texts" else llm.option_response(record, o)
            for o in options
        }
        pairs = [(prompt, tokenizer(responses[o], add_special_tokens=False)["input_ids"]) for o in options]
        scores = [s for s, _ in llm.response_logprobs(model, pairs, tokenizer.pad_token_id, batch_size=1)]
        brute.append(options[llm.pick_option(scores)])
        probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
        brute_nll.append(-math.log(float(probs[options.index(record["answer"])])))
    picks, nlls = llm.choice_outcomes(model, tokenizer, records, batch_size=2)
    assert picks == brute and nlls == pytest.approx(brute_nll, abs=1e-4)
    right = sum(b == r["answer"] for b, r in zip(brute, records))
    assert llm.accuracy_of(picks, records) == pytest.approx(right / len(records))


def test_option_nll_is_the_log_loss_over_the_options():
    assert llm.option_nll(["a", "b"], [-3.0, -3.0], "b") == pytest.approx(math.log(2))  # a uniform guess
    assert llm.option_nll(["a", "b", "c"], [0.0, -800.0, -800.0], "a") == pytest.approx(0.0)  # no underflow
    assert llm.option_nll(["a", "b"], [-1.0, -2.0], "b") == pytest.approx(-math.log(1 / (1 + math.e)))


def test_majority_baseline_answers_each_sets_most_common_training_answer():
    arc3 = {**ARC, "answer": "answer3"}
    data = {
        "train": [{**ARC, "set": "arc_e"}] * 2 + [{**arc3, "set": "arc_e"}] + [{**BOOLQ, "set": "boolq"}],
        "test": {"arc_e": [ARC, arc3, arc3, arc3], "boolq": [BOOLQ, {**BOOLQ, "answer": "false"}]},
    }
    assert llm.majority_baseline(data) == {"arc_e": 0.25, "boolq": 0.5, "average": 0.375}
    tie = {"train": [{**ARC, "set": "arc_e"}, {**arc3, "set": "arc_e"}], "test": {"arc_e": [arc3]}}
    assert llm.majority_baseline(tie)["arc_e"] == 0.0  # a tie goes to the first answer by name
    assert llm.top_pick_share({"arc_e": {"answer1": 3, "answer2": 1}, "boolq": {"true": 4}}) == 0.875


def test_response_logprobs_batched_equals_one_by_one():
    model, _ = _tiny_lm_and_tokenizer()
    pairs = [([2, 5, 6], [7, 8]), ([2, 9], [10, 11, 12])]
    batched = llm.response_logprobs(model, pairs, pad=0, batch_size=2)
    single = [llm.response_logprobs(model, [p], pad=0, batch_size=1)[0] for p in pairs]
    for (a, n), (b, m) in zip(batched, single):
        assert n == m and a == pytest.approx(b, abs=1e-4)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([[2, 5, 6, 7, 8]])).logits, -1)[0]  # (t, vocab)
    assert batched[0][0] == pytest.approx(float(logp[2, 7] + logp[3, 8]), abs=1e-4)


def test_gsm8k_exact_match_uses_the_last_number():
    record = {"question": "q", "answer": "so 3 + 4 = 7\n#### 1,007"}
    assert llm.gsm8k_exact_match("We get 3 apples, so the answer is 1007.", record)
    assert not llm.gsm8k_exact_match("1007 or maybe 8", record)


SCALE = llm.Scale(8, 1, 2, 64, 2, 2, seeds=(0, 1), grid_points=3)


def _row(method: str, lr: float, seed: int, select: float) -> dict:
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "select_acc": select,
        "test_acc": {**{s: 0.5 for s in llm.COMMONSENSE_SETS}, "average": 0.5 + seed / 100},
        "trainable_params": 100 if method != "base" else 0,
        "adapter_bytes": 400,
        "train_seconds": 1.0,
        "peak_memory_bytes": 2**20,
        "earlier_runs_in_process": 0,
    }


def test_peak_memory_only_from_runs_that_were_first_in_their_process():
    """A CPU process's resident high-water mark keeps what earlier runs left: only a first run's peak is shown."""
    runs = [_row("osora-r32", 0.01, 0, 0.5), {**_row("lora-r8", 1e-3, 0, 0.5), "earlier_runs_in_process": 2}]
    runs += [{**_row("lora-r8", 1e-3, 1, 0.5), "peak_memory_bytes": 2**30}]
    runs[-1].pop("earlier_runs_in_process")  # a run written before the count was kept
    summary = llm.summarise("commonsense", runs, ["osora-r32", "lora-r8"], SCALE)
    assert [row["peak_memory_mb"] for row in summary] == [1.0, None]
    rows = {ln.split(" | ")[0]: ln for ln in llm.markdown(_report(summary, runs)).splitlines()}
    assert rows["| osora-r32"].endswith("| 1 |") and rows["| lora-r8"].endswith("| – |")


def test_schedule_runs_centres_first_then_grids_then_seeds_at_the_pick():
    methods = ["base", "osora-r32", "lora-r8"]
    grid = llm.grids(methods, SCALE)
    todo = llm.schedule("commonsense", [], methods, SCALE)
    assert todo[:3] == [
        ("base", 0.0, 0),
        ("osora-r32", grid["osora-r32"][1], 0),
        ("lora-r8", grid["lora-r8"][1], 0),
    ]
    assert len(todo) == 1 + 3 + 3  # no extra seeds before a grid is complete
    runs = [_row("osora-r32", lr, 0, s) for lr, s in zip(grid["osora-r32"], (0.7, 0.9, 0.9))]
    todo = llm.schedule("commonsense", runs, methods, SCALE)
    assert ("osora-r32", grid["osora-r32"][1], 1) in todo  # the tie went to the lower rate
    assert not any(m == "osora-r32" and seed == 0 for m, _, seed in todo)


def test_a_grid_grows_past_the_end_its_pick_sits_at():
    m = "osora-S-r32"
    grid = llm.grids([m], SCALE)[m]
    step = SCALE.grid_step
    runs = [_row(m, lr, 0, s) for lr, s in zip(grid, (0.1, 0.2, 0.3))]  # the top rate wins
    up = llm.grids([m], SCALE, "commonsense", runs)[m]
    assert up[:3] == grid and up[3] == pytest.approx(grid[2] * step, rel=1e-2)
    todo = llm.schedule("commonsense", runs, [m], SCALE)
    assert todo == [(m, up[3], 0)]  # no extra seed while the grid grows
    runs.append(_row(m, up[3], 0, 0.4))  # the new rate wins again: one more, then the cap
    top = llm.grids([m], SCALE, "commonsense", runs)[m]
    assert len(top) == 3 + llm.GRID_EXTENSIONS and llm.schedule("commonsense", runs, [m], SCALE) == [
        (m, top[4], 0)
    ]
    runs.append(_row(m, top[4], 0, 0.5))
    assert llm.grids([m], SCALE, "commonsense", runs)[m] == top  # capped although the pick is still the end
    assert llm.schedule("commonsense", runs, [m], SCALE) == [(m, top[4], 1)]
    (row,) = llm.summarise("commonsense", runs, [m], SCALE)
    assert row["grid"] == top and row["grid_complete"] and row["best_lr_at_grid_edge"]
    down = [
        _row(m, lr, 0, s) for lr, s in zip(grid, (0.3, 0.2, 0.1))
    ]  # the lowest rate wins: grows downwards
    assert llm.grids([m], SCALE, "commonsense", down)[m][1:] == grid
    middle = [_row(m, lr, 0, s) for lr, s in zip(grid, (0.1, 0.3, 0.2))]
    assert llm.grids([m], SCALE, "commonsense", middle)[m] == grid
    assert (
        llm.grids([m], SCALE, "commonsense", middle[:2])[m] == grid
    )  # not grown before the grid is complete


def _report(summary: list, runs: list) -> dict:
    """A result file's fields that the table and the plot read, around ``summary`` and ``runs``."""
    return {
        "task": "commonsense",
        "config": {"scale_name": "cpu", "model": "tiny", "scale": vars(SCALE) | {"seeds": list(SCALE.seeds)}},
        "summary": summary,
        "runs": runs,
        "provenance": {"git": {"commit": "0123456789", "dirty": False}, "hardware": {"cpu": "test cpu"}},
        "command": "python benchmarks/llm.py --task commonsense",
        "output_json": "x.json",
    }


def test_summary_and_table():
    runs = [_row("base", 0.0, 0, 0.3)]
    grid = llm.grids(["osora-r32"], SCALE)["osora-r32"]
    runs += [_row("osora-r32", lr, 0, s) for lr, s in zip(grid, (0.4, 0.8, 0.6))]
    runs += [_row("osora-r32", grid[1], 1, 0.0)]
    summary = llm.summarise("commonsense", runs, ["base", "osora-r32"], SCALE)
    osora_row = summary[1]
    assert osora_row["best_lr"] == grid[1] and osora_row["seeds"] == [0, 1] and osora_row["grid_complete"]
    assert osora_row["test"]["average"] == pytest.approx((50.5, 0.7071), abs=1e-3)
    report = _report(summary, runs)
    table = llm.markdown(report)
    assert "| osora-r32 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.5 ± 0.7 | – | 100 |" in table
    assert "| base |" in table and "5 runs so far" in table and "majority answer (no model)" not in table
    for r in runs:  # runs that kept their picks: the top-pick share of the rows' runs, averaged
        r["test_picks"] = {s: {"a": 3, "b": 1} if r["seed"] else {"a": 4} for s in llm.COMMONSENSE_SETS}
    report["summary"] = llm.summarise("commonsense", runs, ["base", "osora-r32"], SCALE)
    report["majority"] = {**{s: 0.25 for s in llm.COMMONSENSE_SETS}, "average": 0.25}
    table = llm.markdown(report)
    assert "| majority answer (no model) | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 | 100 | 0 |" in table
    assert "| 50.5 ± 0.7 | 88 | 100 |" in table  # (75 % + 100 %) / 2
    report["summary"][1]["compact_adapter_bytes"] = 1234
    assert "| 100 | 400 (compact 1,234) |" in llm.markdown(report)


def test_paired_difference_matches_a_direct_computation_and_shows_in_the_table(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    centre = llm.grids([llm.PAIRED_REFERENCE], SCALE)[llm.PAIRED_REFERENCE][1]

    def with_records(row: dict, n: int = 9) -> dict:
        row["per_record"] = {s: rng.integers(0, 2, n).astype(float).tolist() for s in llm.COMMONSENSE_SETS}
        return row

    reference = with_records(_row(llm.PAIRED_REFERENCE, centre, 0, 0.9))
    lora = [with_records(_row("lora-r8", 1e-3, seed, 0.8)) for seed in (0, 1)]
    runs = [reference, *lora, _row("base", 0.0, 0, 0.1)]  # the base run predates per-record scores
    summary = llm.summarise("commonsense", runs, ["base", llm.PAIRED_REFERENCE, "lora-r8"], SCALE)
    by_method = {row["method"]: row for row in summary}
    assert "vs_reference" not in by_method["base"] and "vs_reference" not in by_method[llm.PAIRED_REFERENCE]
    diffs = [
        np.mean([r["per_record"][s] for r in lora], axis=0) - np.array(reference["per_record"][s])
        for s in llm.COMMONSENSE_SETS
    ]
    expected_mean = 100 * np.mean([d.mean() for d in diffs])
    expected_error = 100 * np.sqrt(sum(d.var(ddof=1) / len(d) for d in diffs)) / 4
    mean, error = by_method["lora-r8"]["vs_reference"]["average"]
    assert (mean, error) == pytest.approx((expected_mean, expected_error))
    report = _report(summary, runs)
    table = llm.markdown(report)
    assert f"| Δ vs {llm.PAIRED_REFERENCE} (paired) |" in table
    assert f"| – | {mean:+.1f} ± {error:.1f} | 100 |" in table and "| (reference) |" in table

    def gsm(method: str, lr: float, nll: list[float], matches: list[float]) -> dict:
        row = _row(method, lr, 0, 0.0) | {"select_nll": 1.0, "test_nll": sum(nll) / 12}
        row |= {"test_acc": {"gsm8k": float(np.mean(matches))}}
        return row | {"per_record": {"gsm8k": matches, "nll": nll, "tokens": [5, 4, 3]}}

    reference = gsm(llm.PAIRED_REFERENCE, centre, [6.0, 4.0, 3.5], [1.0, 0.0, 0.0])
    lora = gsm("lora-r8", 1e-3, [5.0, 4.5, 2.0], [1.0, 1.0, 0.0])
    (row,) = [r for r in llm.summarise("gsm8k", [reference, lora], ["lora-r8"], SCALE)]
    em, nll = row["vs_reference"]["gsm8k"], row["vs_reference"]["nll"]
    assert em[0] == pytest.approx(100 * (lora["test_acc"]["gsm8k"] - reference["test_acc"]["gsm8k"]))
    assert nll[0] == pytest.approx(lora["test_nll"] - reference["test_nll"])  # pooled over the same tokens
    d = np.array([-1.0, 0.5, -1.5])
    assert nll[1] == pytest.approx(np.sqrt(len(d) * d.var(ddof=1)) / 12)
    gsm_report = report | {
        "task": "gsm8k",
        "summary": llm.summarise("gsm8k", [reference, lora], ["lora-r8"], SCALE),
    }
    llm.plot(gsm_report, tmp_path / "gsm8k.png")  # two panels: exact match and reference NLL
    assert (tmp_path / "gsm8k.png").stat().st_size > 0
    lora["per_record"]["tokens"] = [5, 4, 4]
    with pytest.raises(ValueError, match="different token counts"):
        llm.paired_difference("gsm8k", [lora], [reference])


def test_commonsense_picks_the_rate_by_held_out_option_nll_and_tables_it(tmp_path):
    """Runs that kept the option NLL are ranked by it (not by the noisier held-out accuracy); it gets a column, a
    paired difference and a plot panel; rows of runs written before it show "–"."""
    import numpy as np

    grid = llm.grids([llm.PAIRED_REFERENCE], SCALE)[llm.PAIRED_REFERENCE]
    rng = np.random.default_rng(1)

    def with_nll(row: dict, select_nll: float) -> dict:
        row["per_record"] = {}
        for name in llm.COMMONSENSE_SETS:
            row["per_record"][name] = rng.integers(0, 2, 5).astype(float).tolist()
            row["per_record"][f"{name}_nll"] = rng.uniform(0.2, 1.5, 5).tolist()
        row["test_nll"] = {n: float(np.mean(row["per_record"][f"{n}_nll"])) for n in llm.COMMONSENSE_SETS}
        row["test_nll"]["average"] = float(np.mean(list(row["test_nll"].values())))
        return row | {"select_nll": select_nll}

    # held-out accuracy prefers the top rate, the option NLL the lowest: the NLL decides
    runs = [
        with_nll(_row(llm.PAIRED_REFERENCE, lr, 0, acc), nll)
        for lr, acc, nll in zip(grid, (0.5, 0.6, 0.7), (0.8, 0.9, 1.0))
    ]
    lora = with_nll(_row("lora-r8", 1e-3, 0, 0.5), 0.9)
    runs += [lora, _row("vera-r32", 1e-2, 0, 0.5)]  # VeRA's run predates the option NLL
    summary = llm.summarise("commonsense", runs, [llm.PAIRED_REFERENCE, "lora-r8", "vera-r32"], SCALE)
    by_method = {row["method"]: row for row in summary}
    assert by_method[llm.PAIRED_REFERENCE]["best_lr"] == grid[0]
    assert by_method[llm.PAIRED_REFERENCE]["select_nll_by_lr"] == {
        str(lr): n for lr, n in zip(grid, (0.8, 0.9, 1.0))
    }
    assert "nll" not in by_method["vera-r32"]["test"] and "vs_reference" not in by_method["vera-r32"]
    reference = runs[0]
    expected = np.mean(
        [
            np.mean(np.subtract(lora["per_record"][f"{n}_nll"], reference["per_record"][f"{n}_nll"]))
            for n in llm.COMMONSENSE_SETS
        ]
    )
    mean, error = by_method["lora-r8"]["vs_reference"]["nll"]
    assert (
        mean
        == pytest.approx(expected)
        == pytest.approx(lora["test_nll"]["average"] - reference["test_nll"]["average"])
    )
    report = _report(summary, runs) | {
        "majority": {**{s: 0.25 for s in llm.COMMONSENSE_SETS}, "average": 0.25}
    }
    table = llm.markdown(report)
    assert "| avg | option NLL | top pick (%) |" in table and "by its option NLL on a held-out slice" in table
    assert "| majority answer (no model) | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 | – | 100 |" in table
    nll_mean = lora["test_nll"]["average"]
    assert (
        f"| {nll_mean:.3f} ± 0.000 | – | {by_method['lora-r8']['vs_reference']['average'][0]:+.1f}" in table
    )
    assert f", NLL {mean:+.3f} ± {error:.3f} |" in table
    assert (
        "| vera-r32 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | – | – | – |" in table
    )
    llm.plot(report, tmp_path / "commonsense.png")  # two panels: accuracy and option NLL
    assert (tmp_path / "commonsense.png").stat().st_size > 0


def _commonsense_dir(tmp_path: Path) -> Path:
    for name in llm.COMMONSENSE_SETS:
        folder = tmp_path / name
        folder.mkdir(parents=True)
        record = BOOLQ if name == "boolq" else ARC
        for split, n in (("train", 6), ("test", 3)):
            (folder / f"{split}.json").write_text(json.dumps([record] * n))
    return tmp_path


def test_main_writes_every_run_at_once_and_reuses_them(tmp_path, monkeypatch):
    data_dir = _commonsense_dir(tmp_path / "data")
    calls: list[tuple[str, float, int]] = []

    def fake_run(task, key, lr, seed, args, scale, data):
        calls.append((key, lr, seed))
        assert len(data["train"]) == 4 and len(data["test"]["arc_e"]) == 2
        return _row(key, lr, seed, select=1.0 - abs(lr - 0.01))  # osora-r32's grid centre wins: no growth

    monkeypatch.setattr(llm, "run_one", fake_run)
    monkeypatch.setattr(llm, "executor", lambda workers, threads: ThreadPoolExecutor(workers))
    argv = ["--task", "commonsense", "--data-dir", str(data_dir), "--out", str(tmp_path / "out")]
    argv += ["--readme-dir", str(tmp_path), "--methods", "base", "osora-r32", "--seeds", "0", "1"]
    argv += ["--train-size", "4", "--select-size", "1", "--test-size", "2", "--steps", "1"]
    assert llm.main([*argv, "--max-runs", "2"]) == 0
    result = tmp_path / "out" / "llm_commonsense_cpu.json"
    assert [r["method"] for r in json.loads(result.read_text())["runs"]] == ["base", "osora-r32"]
    assert llm.main(argv) == 0  # the rest, without repeating the first two
    assert len(calls) == len(set(calls)) == 1 + 3 + 1
    report = json.loads(result.read_text())
    assert report["config"]["setup"]["train_size"] == 4 and report["provenance"]["git"]["commit"]
    assert list(report)[:6] == list(RECORD_KEYS)
    assert report["majority"]["average"] == 1.0  # every fake record has the same answer
    assert (tmp_path / "README_llm_commonsense_cpu.md").read_text() == llm.render(result)
    assert result.with_suffix(".png").is_file()
    assert llm.main([*argv, "--seeds", "0", "1", "2"]) == 0  # another seed: the same setup, one more run
    assert calls[-1][2] == 2 and len(calls) == 6
    report = json.loads(result.read_text())
    assert llm.main([*argv[:-2], "--steps", "2"]) == 2  # another setup: refused, nothing overwritten
    assert json.loads(result.read_text())["runs"] == report["runs"]
    methods_at = argv.index("--methods")
    only_lora = [*argv[:methods_at], "--methods", "lora-r8", *argv[methods_at + 3 :], "--max-runs", "1"]
    assert llm.main(only_lora) == 0  # a few rows at a time: the rows run before stay in the table
    report = json.loads(result.read_text())
    assert report["config"]["methods"] == ["base", "osora-r32", "lora-r8"]
    assert [row["method"] for row in report["summary"]] == ["base", "osora-r32", "lora-r8"]


def test_main_answers_texts_is_a_setup_of_its_own_with_its_own_file(tmp_path, monkeypatch):
    data_dir = _commonsense_dir(tmp_path / "data")
    seen: list[dict] = []

    def fake_run(task, key, lr, seed, args, scale, data):
        seen.append(data["test"]["arc_e"][0])
        return _row(key, lr, seed, select=0.5)

    monkeypatch.setattr(llm, "run_one", fake_run)
    monkeypatch.setattr(llm, "executor", lambda workers, threads: ThreadPoolExecutor(workers))
    argv = ["--task", "commonsense", "--data-dir", str(data_dir), "--out", str(tmp_path / "out")]
    argv += ["--readme-dir", str(tmp_path), "--methods", "base", "--seeds", "0"]
    argv += ["--train-size", "4", "--select-size", "1", "--test-size", "2"]
    assert llm.main([*argv, "--answers", "texts"]) == 0
    assert seen[-1]["instruction"] == "Which is a metal?" and seen[-1]["output"] == "iron"
    texts = json.loads((tmp_path / "out" / "llm_commonsense_cpu_texts.json").read_text())
    assert texts["config"]["setup"]["answers"] == "texts"
    assert "option's own text" in (tmp_path / "README_llm_commonsense_cpu_texts.md").read_text()
    assert llm.main(argv) == 0  # labels: the file of the earlier runs, whose setups had no "answers"
    labels = json.loads((tmp_path / "out" / "llm_commonsense_cpu.json").read_text())
    assert "answers" not in labels["config"]["setup"] and seen[-1]["instruction"] == ARC["instruction"]
    with pytest.raises(SystemExit, match="--answers applies to --task commonsense only"):
        llm.main(["--task", "gsm8k", "--answers", "texts", "--data-dir", str(data_dir)])
    with pytest.raises(ValueError, match="answers must be one of"):
        llm.Scale(8, 1, 1, 16, 1, 1, answers="words")


def test_main_names_a_missing_data_folder_and_keeps_a_half_written_result(tmp_path):
    out = tmp_path / "out"
    argv = [
        "--task",
        "commonsense",
        "--out",
        str(out),
        "--readme-dir",
        str(tmp_path),
        "--methods",
        "osora-r32",
    ]
    with pytest.raises(SystemExit, match="--data-dir .*absent: no such folder"):
        llm.main([*argv, "--data-dir", str(tmp_path / "absent")])
    out.mkdir()  # the refused run created nothing
    cut = '{"benchmark": "llm", "runs": [{"method": "osora-r32", "lr"'  # a file cut short mid-write
    (out / "llm_commonsense_cpu.json").write_text(cut)
    data_dir = _commonsense_dir(tmp_path / "data")
    with pytest.raises(
        SystemExit, match="llm_commonsense_cpu.json is not a complete result file .* left as it is"
    ):
        llm.main([*argv, "--data-dir", str(data_dir)])
    assert (out / "llm_commonsense_cpu.json").read_text() == cut  # nothing overwritten


def test_update_readme_check_regenerates_llm_tables_from_their_json(tmp_path, monkeypatch):
    update = update_readme
    bench = tmp_path / "benchmarks"
    (bench / "results").mkdir(parents=True)
    monkeypatch.setattr(update, "BENCHMARKS", bench)
    monkeypatch.setitem(update.RENDERERS, "llm_", lambda name: f"table of {name}\n")
    (bench / "README_llm_gsm8k_cpu.md").write_text("table of llm_gsm8k_cpu\n")
    (bench / "README_other.md").write_text("other\n")
    tables = update.generated_tables()
    assert list(tables.values()) == ["table of llm_gsm8k_cpu\n"]
    readme = "a\n<!-- bench:llm_gsm8k_cpu -->\nold\n<!-- /bench:llm_gsm8k_cpu -->\n"
    assert "table of llm_gsm8k_cpu" in update.render(readme, tables)


def test_render_keeps_an_earlier_files_provenance_and_runs(tmp_path, monkeypatch, capsys):
    data_dir = _commonsense_dir(tmp_path / "data")
    argv = ["--task", "commonsense", "--data-dir", str(data_dir), "--out", str(tmp_path), "--methods", "base"]
    argv += ["--readme-dir", str(tmp_path), "--train-size", "4", "--select-size", "1", "--test-size", "2"]
    args = llm.parse_args(argv)
    scale = llm.replace(llm.SCALES[("commonsense", "cpu")], train_size=4, select_size=1, test_size=2)
    old = {  # the layout before the runner used BenchmarkRecord
        "benchmark": "llm",
        "task": "commonsense",
        "command": "python benchmarks/llm.py --task commonsense",
        "config": {"scale": "cpu", "model": args.model, "methods": ["base"], "data_seed": 0},
        "setup": llm.setup_of(args, scale),
        "scale": llm.asdict(scale),
        "methods": {"base": llm.asdict(llm.ROWS["base"])},
        "lr_grids": {"base": [0.0]},
        "protocol": "p",
        "output_json": "x.json",
        "runs": [{**_row("base", 0.0, 0, 0.25), "finished_at": "2026-12-01T21:21:53Z", "eval_seconds": 2.0}],
        "git": {"commit": "abcdef12", "dirty": False},
        "environment": {"hardware": {"cpu": "old cpu"}, "python": "3.11"},
    }
    path = tmp_path / "llm_commonsense_cpu.json"
    path.write_text(json.dumps(old))
    assert llm.main([*argv, "--render"]) == 0
    new = json.loads(path.read_text())
    assert new["provenance"]["git"]["commit"] == "abcdef12" and new["runs"][0]["git"]["commit"] == "abcdef12"
    assert new["config"]["setup"] == old["setup"] and new["summary"][0]["method"] == "base"
    assert new["provenance"]["date_utc"] == "2026-12-01T21:21:53Z" and new["wall_s"] == 3.0
    table = (tmp_path / "README_llm_commonsense_cpu.md").read_text()
    assert "Git abcdef12, " in table and "| base | 50.0 ± 0.0 |" in table
    assert f"from {path};" in table and new["output_json"] == str(path)  # where it is now, not "x.json"
    empty = tmp_path / "empty"
    assert (
        llm.main([*argv[:5], str(empty), *argv[6:], "--render"]) == 2
    )  # nothing to render: said, not silent
    assert "no result file" in capsys.readouterr().err and not any(empty.iterdir())


@pytest.mark.parametrize(
    ("task", "key", "precision"),
    [
        ("commonsense", "osora-r32", "bf16"),
        ("gsm8k", "lora-r8", "bf16"),
        ("gsm8k", "osora-r32", "fp32"),
        ("gsm8k", "osora-scaled-r32", "bf16"),
        ("commonsense", "base", "bf16"),
    ],
)
def test_run_one_trains_and_scores_a_tiny_model(tmp_path, monkeypatch, task, key, precision):
    from osora.app.data import word_level_tokenizer

    train, precisions = llm.train, []

    def recording_train(trainer, precision):
        precisions.append(precision)
        return train(trainer, precision)

    monkeypatch.setattr(
        llm, "train", recording_train
    )  # what train() does: test_bf16_training_follows_float32

    model, _ = _tiny_lm_and_tokenizer()
    gsm = {"question": "what is 3 plus 4 ?", "answer": "3 plus 4 is 7\n#### 7"}
    tokenizer = word_level_tokenizer(
        [ARC["instruction"], ARC["output"], BOOLQ["instruction"], gsm["question"]]
    )
    tokenizer.add_tokens(
        ["####", "user", "assistant", "answer1", "answer3", "false", "plus", "is", "7", "3", "4"]
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant "
    )
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    args = llm.parse_args(
        ["--task", task, "--model", str(tmp_path / "model"), "--work-dir", str(tmp_path / "w")]
    )
    scale = llm.Scale(4, 1, 2, 96, 2, 2, max_new_tokens=4, eval_batch_size=2, precision=precision)
    if task == "commonsense":
        data = {"train": [ARC, BOOLQ] * 2, "select": [ARC], "test": {"arc_e": [ARC, ARC], "boolq": [BOOLQ]}}
    else:
        data = {"train": [gsm] * 4, "select": [gsm], "test": {"gsm8k": [gsm, gsm]}}
    row = llm.run_one(task, key, 1e-3, 0, args, scale, data)
    assert row["steps"] == (0 if key == "base" else 2)
    assert precisions == ([] if key == "base" else [precision])  # trained in the scale's precision
    assert (row["trainable_params"] > 0) == (key != "base") and row["peak_memory_bytes"] > 0
    if key.startswith("osora"):
        assert 0 < row["compact_adapter_bytes"] < row["adapter_bytes"]
    else:
        assert "compact_adapter_bytes" not in row
    assert 0.0 <= row["test_acc"][next(iter(data["test"]))] <= 1.0
    if task == "gsm8k":
        assert row["test_nll"] > 0 and len(row["completion_samples"]) == 2
        per_record = row["per_record"]
        assert sum(per_record["nll"]) / sum(per_record["tokens"]) == pytest.approx(row["test_nll"])
        assert sum(per_record["gsm8k"]) / 2 == row["test_acc"]["gsm8k"]
    else:
        assert set(row["test_acc"]) == {"arc_e", "boolq", "average"}
        picks = row["test_picks"]
        assert sum(picks["arc_e"].values()) == 2 and set(picks["boolq"]) <= {"true", "false"}
        assert row["test_acc"]["boolq"] == picks["boolq"].get("true", 0)  # its one record's answer is true
        assert row["per_record"]["boolq"] == [row["test_acc"]["boolq"]]
        assert sum(row["per_record"]["arc_e"]) / 2 == row["test_acc"]["arc_e"]
        assert set(row["test_nll"]) == {"arc_e", "boolq", "average"} and row["select_nll"] > 0
        assert sum(row["per_record"]["arc_e_nll"]) / 2 == pytest.approx(row["test_nll"]["arc_e"])
        assert (row["per_record"]["boolq_nll"][0] < math.log(2)) == bool(row["test_acc"]["boolq"])


def test_workers_run_the_schedule_concurrently_and_each_run_once(tmp_path, monkeypatch):
    data_dir = _commonsense_dir(tmp_path / "data")
    calls: list[tuple[str, float, int]] = []

    def fake_run(task, key, lr, seed, args, scale, data):
        pickle.dumps((task, key, lr, seed, args, scale, data))  # what a worker process is sent
        calls.append((key, lr, seed))
        return _row(key, lr, seed, select=0.5 + lr)

    monkeypatch.setattr(llm, "run_one", fake_run)
    monkeypatch.setattr(llm, "executor", lambda workers, threads: ThreadPoolExecutor(workers))
    argv = ["--task", "commonsense", "--data-dir", str(data_dir), "--out", str(tmp_path / "out")]
    argv += ["--readme-dir", str(tmp_path), "--methods", "base", "osora-r32", "lora-r8", "--seeds", "0", "1"]
    argv += ["--train-size", "4", "--select-size", "1", "--test-size", "2", "--workers", "3"]
    assert llm.main(argv) == 0
    grown = 3 + llm.GRID_EXTENSIONS  # the highest rate always wins here: each grid grows to its cap
    assert len(calls) == len(set(calls)) == 1 + 2 * grown + 2  # the grids, then one more seed per method
    runs = json.loads((tmp_path / "out" / "llm_commonsense_cpu.json").read_text())["runs"]
    assert len(runs) == len(calls) and {r["concurrent_runs"] for r in runs} == {3}
    grid = llm.grids(["osora-r32"], llm.SCALES[("commonsense", "cpu")], "commonsense", runs)["osora-r32"]
    seeds = [i for i, c in enumerate(calls) if c[0] == "osora-r32" and c[2] == 1]
    assert seeds and seeds[0] > max(i for i, c in enumerate(calls) if c[0] == "osora-r32" and c[2] == 0)
    assert len(grid) == grown and calls[seeds[0]][1] == max(
        grid
    )  # the best selection score: the highest rate
    with pytest.raises(SystemExit):
        llm.parse_args(["--task", "gsm8k", "--workers", "0"])


def test_every_run_gets_a_fresh_worker_process_that_imports_the_runner():
    """A fresh process per run (its peak resident memory is its own), even with one worker; spawned processes have
    the benchmarks folder on their path too."""
    with llm.executor(1, 1) as pool:
        pids = [pool.submit(os.getpid).result(timeout=120) for _ in range(2)]
        assert pool.submit(llm.selection_score, "gsm8k", {"select_nll": 0.25}).result(timeout=120) == -0.25
    assert len(set(pids)) == 2 and os.getpid() not in pids


def test_workers_end_when_the_runner_is_killed(tmp_path):
    """A killed runner leaves no worker training on: each worker's watchdog ends it once its parent is gone."""
    import subprocess
    import time

    pid_file = tmp_path / "worker.pid"
    script = (
        "import os, signal, sys, time; sys.path.insert(0, sys.argv[1]); import llm\n"
        "pool = llm.executor(2, 1)\n"
        "pool.submit(exec, f'import os, time; open({sys.argv[2]!r}, \"w\").write(str(os.getpid())); time.sleep(300)')\n"
        "for _ in range(240):\n"
        "    if os.path.exists(sys.argv[2]): break\n"
        "    time.sleep(0.5)\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )  # the worker, in the middle of its (sleeping) run, says which process it is
    runner = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "benchmarks"), str(pid_file)], timeout=180
    )
    assert runner.returncode == -9
    worker = int(pid_file.read_text())
    for _ in range(40):  # the watchdog looks every 2 s
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.kill(worker, 9)
    raise AssertionError(f"worker {worker} still running 20 s after its runner was killed")


@pytest.mark.parametrize(("task", "scale"), sorted(llm.SCALES))
def test_every_preset_fits_the_shared_data(task, scale):
    """Each preset's training, held-out and test sizes exist in ../shared/data (a GPU run must not stop at once)."""
    data_dir = ROOT.parent / "shared" / "data" / task
    if not data_dir.is_dir():
        pytest.skip(f"{data_dir} is not here")
    preset = llm.SCALES[(task, scale)]
    data = llm.load_data(task, data_dir, preset, data_seed=0)
    assert len(data["train"]) == preset.train_size
    assert len(data["select"]) == preset.select_size * (
        len(llm.COMMONSENSE_SETS) if task == "commonsense" else 1
    )


@pytest.mark.parametrize("method", ["lora", "osora"])
def test_bf16_training_follows_float32(tmp_path, method):
    """Each bfloat16 step sees the previous step's update: the loss curve follows float32's. With the autocast weight
    cache on over the whole train(), LoRA's forward kept the first step's copy of A and B and its loss stayed flat."""
    from transformers import Trainer, TrainingArguments

    from osora.app.config import MethodConfig
    from osora.app.train import apply_method

    curves = {}
    for precision in ("fp32", "bf16"):
        model, tokenizer = _tiny_lm_and_tokenizer()
        model = apply_method(model, MethodConfig(name=method, fields={"r": 4}))
        ids = tokenizer(BOOLQ["instruction"] + " " + BOOLQ["output"])["input_ids"]
        records = [{"input_ids": ids, "labels": ids}] * 4
        trainer = Trainer(
            model=model.train(),
            args=TrainingArguments(
                output_dir=str(tmp_path / precision),
                max_steps=8,
                learning_rate=0.3,
                per_device_train_batch_size=2,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                seed=0,
            ),
            train_dataset=records,
        )
        llm.train(trainer, precision)
        curves[precision] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == 8 and fp32[-1] < fp32[0] - 0.1
    assert bf16[-1] < bf16[0] - 0.1
    assert all(abs(b - f) < 0.03 * f for b, f in zip(bf16, fp32))


def test_lr_rule_reads_the_sweeps_and_judges_the_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/lr_rule.py: the protocol's pick from the held-out score (a tie: the lower rate), the rule's test
    measure against the pick's, and no verdict on a sweep of fewer than three rates."""
    import lr_rule

    def glue(rates: dict[float, tuple[float, float]], seed: int = 0) -> list[dict]:
        return [
            {"method": "osora", "lr": lr, "seed": seed, "select_acc": sel, "dev_acc": dev}
            for lr, (sel, dev) in rates.items()
        ]

    sweep = {0.00316: (0.70, 0.60), 0.01: (0.85, 0.80), 0.0316: (0.86, 0.815)}
    runs = glue(sweep) + glue({0.01: (0.0, 0.0)}, seed=1)  # a later seed never decides
    (tmp_path / "glue_a.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "glue_b.json").write_text(json.dumps({"runs": glue({**sweep, 0.0316: (0.86, 0.79)})}))
    (tmp_path / "glue_c.json").write_text(json.dumps({"runs": glue({0.01: (0.85, 0.80)})}))
    tie = {0.00316: (0.5, 0.5), 0.01: (0.9, 0.7), 0.0316: (0.9, 0.9)}
    (tmp_path / "glue_d.json").write_text(json.dumps({"runs": glue(tie)}))
    assert lr_rule.main(["--results", str(tmp_path)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert "| 0.0316 |" in rows["glue_a.json"] and "misses (-1.5)" in rows["glue_a.json"]  # 80.0 vs 81.5
    assert "holds (+1)" in rows["glue_b.json"]  # the rule beats the pick
    assert "no check" in rows["glue_c.json"]
    assert (
        "| 0.01 |" in rows["glue_d.json"] and "holds (+0)" in rows["glue_d.json"]
    )  # a tie picks the lower rate
    assert lr_rule.main(["--results", str(tmp_path), "--points", "2"]) == 0
    assert "holds (-1.5)" in capsys.readouterr().out
