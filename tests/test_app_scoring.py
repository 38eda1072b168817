"""Golden (completion, expected) tables for every scorer, and the GSM8K reference parser on the real test set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from osora.app.scoring import (
    COMMONSENSE_CHOICES,
    TASKS,
    gsm8k_reference,
    last_boxed,
    last_number,
    math_equal,
    math_verify_equal,
    normalize_math_answer,
    numeric_equal,
)

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("The answer is 1,234.", "1234"),
        ("It costs $3.50 in total.", "3.50"),
        ("The temperature drops to -5 degrees.", "-5"),
        ("First 3 then 4, so the answer is 7.", "7"),
        ("The answer is .5", ".5"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_gsm8k_last_number(completion: str, expected: str | None) -> None:
    assert last_number(completion) == expected


@pytest.mark.parametrize(
    ("completion", "reference", "correct"),
    [
        ("so she makes 18 dollars", "18", True),
        ("so she makes 18.00 dollars", "18", True),
        ("the total is 1,000", "1000", True),
        ("the total is 1000.", "1,000", True),
        ("it is 17", "18", False),
        ("I cannot tell", "18", False),
        ("the answer is 0.5", "0.50", True),
    ],
)
def test_gsm8k_numeric_compare(completion: str, reference: str, correct: bool) -> None:
    assert numeric_equal(last_number(completion), reference) is correct


def test_gsm8k_task_scores_a_record() -> None:
    record = {"question": "q", "answer": "He pays 2 * 600 = <<2*600=1200>>1,200 dollars.\n#### 1,200"}
    assert TASKS["gsm8k"].score("He pays 1200 dollars in all.", record) == ("1200", "1200", True)
    assert gsm8k_reference(record["answer"]) == "1200"
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("no marker")


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"GSM8K test set not found at {GSM8K_TEST}")
def test_gsm8k_reference_parses_all_1319_problems() -> None:
    records = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    assert len(records) == 1319
    for record in records:
        reference = gsm8k_reference(record["answer"])
        float(reference)  # every reference is a number once commas are stripped
        # the reference is also what the prediction extractor reads from the gold solution itself
        assert numeric_equal(last_number(record["answer"]), reference), record["answer"][-60:]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("So the answer is $\\boxed{5}$.", "5"),
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{x^{2}+1}", "x^{2}+1"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\fbox{7}", "7"),
        ("The answer is $\\boxed 9$.", "9"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_math_boxed_extraction(completion: str, expected: str | None) -> None:
    assert last_boxed(completion) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "equal"),
    [
        ("\\frac12", "\\frac{1}{2}", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("\\dfrac{3}{4}", "\\frac{3}{4}", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
        ("10 \\text{ inches}", "10", True),
        ("90^\\circ", "90", True),
        ("50\\%", "50", True),
        ("x = 5", "5", True),
        ("\\sqrt2", "\\sqrt{2}", True),
        (".5", "0.5", True),
        ("\\$12", "12", True),
        ("3", "4", False),
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        (None, "1", False),
    ],
)
def test_math_equivalence(prediction: str | None, reference: str, equal: bool) -> None:
    assert math_equal(prediction, reference) is equal
    assert math_verify_equal(prediction, reference) is equal


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("\\frac{3}{4}", "0.75"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\{1,2\\}", "\\{2,1\\}"),
        ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
        ("x^2+2x+1", "(x+1)^2"),
    ],
)
def test_math_verify_finds_equal_answers_the_string_comparison_misses(
    prediction: str, reference: str
) -> None:
    assert math_verify_equal(prediction, reference)
    assert not math_equal(prediction, reference)  # the paper's comparison marks these wrong


@pytest.mark.parametrize(("prediction", "reference"), [("(1,2)", "(2,1)"), ("[1,3)", "[1,3]"), ("2", "-2")])
def test_math_verify_keeps_different_answers_apart(prediction: str, reference: str) -> None:
    assert not math_verify_equal(prediction, reference) and not math_equal(prediction, reference)


def test_math_task_reports_both_comparisons() -> None:
    record = {"problem": "p", "answer": "0.75"}
    task = TASKS["math"]
    assert task.default_comparison == "math-verify"
    assert task.score_all("so $\\boxed{\\frac{3}{4}}$", record) == (
        "\\frac{3}{4}",
        "0.75",
        {"math-verify": True, "string": False},
    )
    assert task.score("so $\\boxed{\\frac{3}{4}}$", record, comparison="string")[2] is False


def test_math_task_reads_reference_from_solution() -> None:
    record = {"problem": "p", "solution": "Thus it is $\\boxed{\\dfrac{3}{4}}$."}
    assert TASKS["math"].score("so $\\boxed{\\frac34}$", record)[2]
    assert normalize_math_answer("\\frac34") == "\\frac{3}{4}"
    # MetaMath-trained models end with "The answer is: X" rather than a box
    assert TASKS["math"].score("so it is 3/4.\nThe answer is: \\frac{3}{4}", record)[2]
    assert TASKS["math"].score("no answer", record)[:2] == (None, "\\dfrac{3}{4}")


@pytest.mark.parametrize(
    ("task", "completion", "expected"),
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "The correct answer is False.", "false"),
        ("boolq", "maybe", None),
        ("piqa", "the correct answer is solution2", "solution2"),
        ("siqa", "the correct answer is answer3", "answer3"),
        ("social_i_qa", "answer1", "answer1"),
        ("hellaswag", "the correct answer is ending4", "ending4"),
        ("winogrande", "the correct answer is option1", "option1"),
        ("arc_e", "the correct answer is answer5", "answer5"),
        ("arc_c", "answer2 because answer1 is wrong", "answer2"),
        ("obqa", "the correct answer is answer4", "answer4"),
        ("obqa", "the correct answer is answer5", None),
        ("piqa", "solution10", "solution1"),
    ],
)
def test_commonsense_extraction(task: str, completion: str, expected: str | None) -> None:
    assert TASKS[task].extract(completion) == expected


def test_every_commonsense_task_scores() -> None:
    assert (
        len({"boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"} - set(TASKS)) == 0
    )
    for task, choices in COMMONSENSE_CHOICES.items():
        record = {"instruction": "q", "input": "", "output": "", "answer": choices[-1]}
        assert TASKS[task].score(f"the correct answer is {choices[-1]}", record)[2]
        assert not TASKS[task].score(f"the correct answer is {choices[0]}", record)[2]


def test_eval_reports_both_math_comparisons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from osora.app import evaluate as E
    from osora.app.config import ConfigError, load_config

    records = [
        {"problem": "3/4 as a decimal?", "solution": "It is $\\boxed{0.75}$."},
        {"problem": "sqrt(8)?", "solution": "$\\boxed{2\\sqrt{2}}$"},
        {"problem": "1+1?", "solution": "$\\boxed{2}$"},
    ]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    completions = ["so $\\boxed{\\frac{3}{4}}$", "so $\\boxed{\\sqrt{8}}$", "so $\\boxed{3}$"]
    monkeypatch.setattr(E, "load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(
        E, "generate", lambda model, tokenizer, prompts, *args, **kw: completions[: len(prompts)]
    )
    overrides = [f"--eval.path={data}", "--eval.task=math", f"--eval.output={tmp_path / 'report.json'}"]
    report = E.evaluate(load_config(None, overrides))
    assert report["comparison"] == "math-verify" and report["correct"] == 2
    assert report["accuracy_by"] == {"math-verify": 2 / 3, "string": 0.0}
    assert [x["correct_by"] for x in report["examples"]][0] == {"math-verify": True, "string": False}
    assert "accuracy 0.6667 (2/3, by math-verify); by string: 0.0000 (0/3)" in capsys.readouterr().out
    paper = E.evaluate(load_config(None, [*overrides, "--eval.comparison=string"]))
    assert paper["accuracy"] == 0.0 and paper["accuracy_by"] == report["accuracy_by"]
    with pytest.raises(ConfigError, match="choose from math-verify, string"):
        E.evaluate(load_config(None, [*overrides, "--eval.comparison=exact"]))
