"""Pure answer scorers for the paper's benchmarks: GSM8K, MATH and the eight commonsense tasks.

No torch, no model: each task is an ``extract`` (completion -> answer or None), a ``reference`` (dataset record
-> answer) and an ``equal`` (prediction, reference -> bool), collected in :data:`TASKS`.

- GSM8K: the reference is what follows ``####``; the prediction is the last number in the completion; numbers
  compare as values once commas are stripped (``1,000`` == ``1000.0``).
- MATH: the answer is the content of the last ``\\boxed{...}`` (nested braces respected), or what follows
  MetaMath's "The answer is:" when nothing is boxed. Answers compare two ways, both reported: ``math-verify``
  (the default: both parsed from LaTeX into SymPy and compared as mathematics, so ``\\frac{3}{4}`` equals
  ``0.75`` and ``\\{1,2\\}`` equals ``\\{2,1\\}``), and ``string``, the paper's comparison (equal after the
  normalisation of Hendrycks et al.'s ``is_equiv``: units, ``\\left``/``\\right``, spaces, ``\\frac12``...).
- Commonsense (LLM-Adapters, Hu et al. 2023): the first answer word of the task's closed set in the completion
  (``true``/``false``, ``solution1/2``, ``answer1-5``, ``ending1-4``, ``option1/2``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


# --------------------------------------------------------------------------------------------------- GSM8K
def gsm8k_reference(answer: str) -> str:
    """The reference answer of a GSM8K record: the text after the last ``####``, commas stripped."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####': {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "").rstrip(".")


def last_number(completion: str) -> str | None:
    """The last number in ``completion`` (commas stripped), or None if it has none."""
    numbers = _NUMBER.findall(completion)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").rstrip(".")


def numeric_equal(prediction: str | None, reference: str) -> bool:
    """Whether two numbers written as text are equal as values (``18`` == ``18.00``; commas ignored)."""
    if prediction is None:
        return False
    try:
        return abs(float(prediction.replace(",", "")) - float(reference.replace(",", ""))) < 1e-6
    except ValueError:
        return prediction.strip() == reference.strip()


# ---------------------------------------------------------------------------------------------------- MATH
def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces respected."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    if rest.startswith("\\boxed "):  # the "\boxed 5$" form
        return rest[len("\\boxed ") :].split("$", 1)[0].strip()
    brace = rest.find("{")
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[brace + 1 : i]
    return None


def math_prediction(completion: str) -> str | None:
    """The answer of a MATH completion: the last ``\\boxed{}``, else what follows MetaMath's "The answer is:"."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if "The answer is:" in completion:
        return completion.rsplit("The answer is:", 1)[1].strip().rstrip(".").strip() or None
    return None


def math_reference(solution: str) -> str | None:
    """The reference answer of a MATH record: the last boxed expression of its ``solution``."""
    return last_boxed(solution)


def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr.startswith("{"):
            new_str += substr
            continue
        if len(substr) < 2:
            return string
        a, b = substr[0], substr[1]
        if b != "{":
            new_str += "{" + a + "}{" + b + "}" + substr[2:]
        else:
            new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    if len(string.split("/")) != 2:
        return string
    a, b = string.split("/")
    try:
        a_int, b_int = int(a), int(b)
    except ValueError:
        return string
    if string != f"{a_int}/{b_int}":
        return string
    return "\\frac{" + str(a_int) + "}{" + str(b_int) + "}"


def _remove_right_units(string: str) -> str:
    if "\\text{ " in string:
        return string.split("\\text{ ")[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if split and split[0] != "{":
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_string += "\\sqrt" + split
    return new_string


def normalize_math_answer(string: str) -> str:
    """Hendrycks et al.'s ``strip_string``: the canonical form two MATH answers are compared in."""
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "").replace("$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "").replace(r"\%", "").replace("%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    # "x = 5" -> "5" when the left side is a short variable name
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def math_equal(prediction: str | None, reference: str | None) -> bool:
    """Hendrycks et al.'s ``is_equiv``: equal after :func:`normalize_math_answer`."""
    if prediction is None or reference is None:
        return prediction is None and reference is None
    try:
        return normalize_math_answer(prediction) == normalize_math_answer(reference)
    except Exception:  # the reference implementation falls back to raw comparison on any parse error
        return prediction == reference


def math_verify_equal(prediction: str | None, reference: str | None) -> bool:
    """Whether two MATH answers are equal as mathematics: both parsed by math-verify (LaTeX or plain
    expressions, into SymPy) and compared by its ``verify`` (numbers, fractions, radicals, sets, intervals...)."""
    if prediction is None or reference is None:
        return prediction is None and reference is None
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold, predicted = parse(f"${reference}$", config), parse(f"${prediction}$", config)
    return bool(gold and predicted and verify(gold, predicted))


# ----------------------------------------------------------------------------------------------- commonsense
#: Answer words per commonsense task, as in LLM-Adapters' ``commonsense_evaluate.py``.
COMMONSENSE_CHOICES: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "siqa": ("answer1", "answer2", "answer3"),
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "arc_e": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "arc_c": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "obqa": ("answer1", "answer2", "answer3", "answer4"),
}


def commonsense_extractor(task: str) -> Callable[[str], str | None]:
    """The extractor of ``task``: the first of its answer words found in the completion."""
    pattern = re.compile("|".join(sorted(COMMONSENSE_CHOICES[task], key=len, reverse=True)))

    def extract(completion: str) -> str | None:
        found = pattern.search(completion.strip().lower())
        return found.group(0) if found else None

    return extract


def commonsense_options(record: Mapping[str, Any]) -> list[str]:
    """The answer words a commonsense question offers: its "Answer format: a/b/c" line (LLM-Adapters' layout)."""
    text = str(record["instruction"])
    if "Answer format:" not in text:
        raise ValueError(f"no 'Answer format:' line in {text[-120:]!r}")
    return [w.strip() for w in text.rsplit("Answer format:", 1)[1].strip().split("/") if w.strip()]


def option_response(record: Mapping[str, Any], option: str) -> str:
    """The training response with ``option`` as the answer ("the correct answer is answer2")."""
    output, answer = str(record["output"]), str(record["answer"])
    if not output.endswith(answer):
        raise ValueError(f"output {output!r} does not end with its answer {answer!r}")
    return output[: len(output) - len(answer)] + option


def _exact(prediction: str | None, reference: str | None) -> bool:
    return (
        prediction is not None and reference is not None and prediction.strip() == reference.strip().lower()
    )


# -------------------------------------------------------------------------------------------------- registry
Equal = Callable[[str | None, str | None], bool]


@dataclass(frozen=True)
class Task:
    """How one benchmark is scored: how a completion's answer is extracted, where a record's reference is, and how
    the two compare.

    ``comparisons`` names every way a prediction is compared with its reference; the first is the default.
    """

    extract: Callable[[str], str | None]
    reference: Callable[[Mapping[str, Any]], str | None]
    comparisons: Mapping[str, Equal]

    @property
    def default_comparison(self) -> str:
        return next(iter(self.comparisons))

    def score(
        self, completion: str, record: Mapping[str, Any], comparison: str | None = None
    ) -> tuple[str | None, str | None, bool]:
        """(extracted prediction, reference, correct) for one completion of ``record``, by ``comparison``
        (default: the first)."""
        prediction, reference, correct = self.score_all(completion, record)
        return prediction, reference, correct[comparison or self.default_comparison]

    def score_all(
        self, completion: str, record: Mapping[str, Any]
    ) -> tuple[str | None, str | None, dict[str, bool]]:
        """(extracted prediction, reference, {comparison: correct}) for one completion of ``record``."""
        prediction = self.extract(completion)
        reference = self.reference(record)
        correct = {
            name: bool(reference is not None and equal(prediction, reference))
            for name, equal in self.comparisons.items()
        }
        return prediction, reference, correct


def _commonsense(task: str) -> Task:
    return Task(commonsense_extractor(task), lambda r: str(r["answer"]), {"exact": _exact})


TASKS: dict[str, Task] = {
    "gsm8k": Task(
        last_number,
        lambda r: gsm8k_reference(r["answer"]),
        {"numeric": numeric_equal},  # type: ignore[dict-item]
    ),
    "math": Task(
        math_prediction,
        lambda r: r.get("answer") or math_reference(r["solution"]),
        {"math-verify": math_verify_equal, "string": math_equal},
    ),
    **{name: _commonsense(name) for name in COMMONSENSE_CHOICES},
}
