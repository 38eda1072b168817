"""``osora eval --harness TASKS MODEL [...]``: lm-evaluation-harness on a base model, an adapter or a merged model.

The model loads as every osora command loads it (:func:`osora.app.evaluate.load_model`: an OSoRA or other PEFT
adapter folder on its base, a merged or exported folder, a ``.gguf`` file, a short name) and goes to lm-eval's
``HFLM`` as the model object itself, so an OSoRA adapter is scored in-process, unmerged, by a harness that never
imports osora. The tasks are lm-eval YAMLs shipped in :data:`TASKS_DIR`, for the local files under ``--data_dir``
(default ``../shared/data``, relative to the working directory like the configs' paths), offline:

* ``osora_boolq``, ``osora_arc_e``, ``osora_arc_c``, ``osora_obqa`` (group ``osora_commonsense``):
  LLM-Adapters' commonsense test sets, multiple choice by log-likelihood: each response "the correct answer is
  <option>" is scored after the prompt; ``acc`` picks the most likely, ``acc_norm`` the most likely per byte.
* ``osora_gsm8k``: greedy generation, scored as ``osora eval`` scores it (the last number of the completion).

The prompt is the one the model was trained with (``--prompt auto``: the run's ``data.prompt`` from its
``osora_run.json``, else the chat template where the tokenizer has one, else the paper's): ``chat`` puts the
question in the user turn through lm-eval's ``apply_chat_template``; ``paper`` and ``alpaca`` are osora's own
templates (:func:`osora.app.data.make_prompt`).

The same YAMLs serve lm-eval's own CLI (``--include_path``; README): the data functions below read the task's
metadata (``data_dir``, ``prompt``).

Example:
    osora eval --harness commonsense runs/smollm2-135m-commonsense-osora --limit 100
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .checkpoints import RUN_FILE, atomic_write_text
from .config import ConfigError, PromptStyle
from .data import DataError, load_records, make_prompt, user_message
from .scoring import TASKS, commonsense_options, option_response

#: lm-eval task YAMLs for the local data (``--include_path`` for lm-eval's CLI).
TASKS_DIR = Path(__file__).parent / "harness_tasks"
#: Where the data lives unless ``--data_dir`` says otherwise (relative to the working directory).
DEFAULT_DATA_DIR = "../shared/data"
PROMPT_STYLES: tuple[PromptStyle, ...] = ("chat", "paper", "alpaca")
_PREFIX = "osora_"


# ----------------------------------------------------------------------------- the data (called by lm-eval)
def _prompt_text(record: Mapping[str, Any], fmt: str, prompt: str) -> str:
    """The text lm-eval puts before the response: the user turn for ``chat`` (lm-eval applies the template)."""
    if prompt not in PROMPT_STYLES:
        raise ConfigError(f"prompt={prompt!r} is not a prompt style; choose from {', '.join(PROMPT_STYLES)}")
    return user_message(record, fmt) if prompt == "chat" else make_prompt(record, fmt, prompt)  # type: ignore[arg-type]


def _splits(files: Mapping[str, Path], fields: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """A ``datasets.DatasetDict`` of the local ``files`` (split -> path), each record extended by ``fields``."""
    import datasets

    for path in files.values():
        if not path.is_file():
            raise DataError(
                f"{path}: no such file; pass --data_dir (lm-eval: --metadata '{{\"data_dir\": ...}}') pointing at "
                f"the folder that holds commonsense/ and gsm8k/ (default {DEFAULT_DATA_DIR})"
            )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list([{**r, **fields(r)} for r in load_records(str(path))])
            for split, path in files.items()
        }
    )


def commonsense_dataset(
    data_dir: str = DEFAULT_DATA_DIR, subset: str = "boolq", prompt: str = "chat", **_: Any
) -> Any:
    """``{test, train}`` of ``DATA_DIR/commonsense/SUBSET/{test,train}.json`` with the multiple-choice fields:
    ``osora_prompt``, ``osora_choices`` (one response per option) and ``osora_label`` (the right one's index)."""
    space = " " if prompt == "paper" else ""  # the paper's prompt ends "Answer:"; a space starts the response

    def fields(record: dict[str, Any]) -> dict[str, Any]:
        options = commonsense_options(record)
        return {
            "osora_prompt": _prompt_text(record, "commonsense", prompt),
            "osora_choices": [space + option_response(record, o) for o in options],
            "osora_label": options.index(str(record["answer"]).strip().lower()),
        }

    folder = Path(data_dir).expanduser() / "commonsense" / subset
    return _splits({s: folder / f"{s}.json" for s in ("test", "train")}, fields)


def gsm8k_dataset(data_dir: str = DEFAULT_DATA_DIR, prompt: str = "chat", **_: Any) -> Any:
    """``{test, train}`` of ``DATA_DIR/gsm8k/{test,train}.jsonl`` with ``osora_prompt`` and ``osora_response``
    (the worked answer, for few-shot examples)."""
    space = " " if prompt == "paper" else ""

    def fields(record: dict[str, Any]) -> dict[str, Any]:
        return {
            "osora_prompt": _prompt_text(record, "gsm8k", prompt),
            "osora_response": space + str(record["answer"]).strip(),
        }

    folder = Path(data_dir).expanduser() / "gsm8k"
    return _splits({s: folder / f"{s}.jsonl" for s in ("test", "train")}, fields)


def gsm8k_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """lm-eval's ``process_results`` for GSM8K: osora's scorer (last number vs the number after ``####``)."""
    _, _, correct = TASKS["gsm8k"].score(results[0], doc)
    return {"exact_match": float(correct)}


# ------------------------------------------------------------------------------------------- the command
#: lm-eval's warnings that say nothing to an osora user (logger -> a part of the message): the --metadata hint of tasks
#: with a custom_dataset, and the notes on an in-memory model and on osora's own generation settings.
_QUIET = {
    "lm_eval.api.task": "Custom kwargs can be passed",
    "lm_eval.models.huggingface": "`pretrained` model kwarg is not of type",
    "lm_eval.evaluator": "generation_kwargs:",
}


@functools.cache  # once per process
def _quiet_lm_eval() -> None:
    import logging

    for name, part in _QUIET.items():
        logging.getLogger(name).addFilter(lambda r, part=part: part not in r.getMessage())  # type: ignore[misc]


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--harness needs lm-evaluation-harness: pip install 'osora[harness]'")


def task_manager(data_dir: str, prompt: str) -> Any:
    """lm-eval's TaskManager over :data:`TASKS_DIR` only (offline: none of lm-eval's hub-backed tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": data_dir, "prompt": prompt}
    )


def task_names(requested: str, available: Sequence[str]) -> list[str]:
    """The task names of a comma-separated ``requested`` list; the ``osora_`` prefix may be left out."""
    names: list[str] = []
    for name in (n.strip() for n in requested.split(",")):
        full = name if name in available else _PREFIX + name
        if not name or full not in available:
            known = ", ".join(a.removeprefix(_PREFIX) for a in sorted(available))
            raise ConfigError(
                f"--harness {requested}: unknown task {name!r}; choose from {known} (comma-separated)"
            )
        names.append(full)
    return names


def load_tasks(tasks: str, data_dir: str, prompt: PromptStyle) -> tuple[Any, list[Any], list[str]]:
    """(TaskManager, the Task/Group objects of ``tasks``, their names), the data read in ``prompt``'s style."""
    manager = task_manager(data_dir, prompt)
    names = task_names(tasks, manager.all_tasks)
    loaded = [manager.load(name) for name in names]
    return manager, [(d["groups"] | d["tasks"])[n] for d, n in zip(loaded, names)], names


def _leaves(objects: Sequence[Any]) -> list[Any]:
    """The tasks of a list of lm-eval Tasks and Groups."""
    return [t for o in objects for t in (o.get_all_tasks() if hasattr(o, "get_all_tasks") else [o])]


def prompt_style(model_path: str, tokenizer: Any, requested: str) -> PromptStyle:
    """``requested``, or for ``auto``: the run's ``data.prompt``, else chat where the tokenizer has a template,
    else the paper's prompt."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    run = Path(model_path) / RUN_FILE
    if run.is_file():
        style = json.loads(run.read_text()).get("config", {}).get("data", {}).get("prompt")
        if style in PROMPT_STYLES:
            return style  # type: ignore[no-any-return]
    return "chat" if getattr(tokenizer, "chat_template", None) else "paper"


def evaluate_harness(
    model: str,
    *,
    harness: str,
    base: str | None = None,
    data_dir: str = DEFAULT_DATA_DIR,
    prompt: Literal["auto", "chat", "paper", "alpaca"] = "auto",
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_gen_toks: int = 256,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    output: str | None = None,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Score a base model, an adapter or a merged model with lm-evaluation-harness on the local data.

    Returns lm-eval's results (``simple_evaluate``), also written to ``output`` as JSON. The tasks and their data
    load first, so a wrong name or a missing file fails before the model loads.

    Args:
        model: Adapter folder, merged/base model folder, .gguf file, short name or hub id.
        harness: Comma-separated task names: boolq, arc_e, arc_c, obqa, commonsense (the four), gsm8k.
        base: Base model of an adapter (default: from adapter_config.json).
        data_dir: The folder holding commonsense/ and gsm8k/.
        prompt: Prompt style; auto: the run's data.prompt, else chat where the tokenizer has a template, else paper.
        limit: Score the first N records of each test set.
        num_fewshot: Solved examples from the train split before each question.
        batch_size: Requests scored together.
        max_gen_toks: Generation length limit (GSM8K).
        dtype: Dtype the weights are loaded in.
        output: The report JSON (default: MODEL/harness-results.json).
        loaded: (model, tokenizer) already in memory to score instead (``model`` then only names them; Python only).
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable, make_table

    from .evaluate import STOP_STRINGS, load_model, report_path

    if prompt not in ("auto", *PROMPT_STYLES):
        raise ConfigError(f"--prompt {prompt}: choose from auto, {', '.join(PROMPT_STYLES)}")
    _quiet_lm_eval()
    started = time.time()
    style: PromptStyle = "chat" if prompt == "auto" else prompt  # type: ignore[assignment]
    # the tasks read their data here: a missing file fails before the model loads
    manager, objects, names = load_tasks(harness, data_dir, style)
    lm_model, tokenizer = loaded or load_model(model, base, dtype)
    if prompt == "auto" and (style := prompt_style(model, tokenizer, prompt)) != "chat":
        manager, objects, names = load_tasks(harness, data_dir, style)
    generates = any(t.get_config("output_type") == "generate_until" for t in _leaves(objects))

    lm = HFLM(pretrained=lm_model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=objects,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=style == "chat",
        gen_kwargs=(
            {"until": list(STOP_STRINGS[style]), "max_gen_toks": max_gen_toks, "do_sample": False}
            if generates
            else None
        ),
        log_samples=True,
        bootstrap_iters=0,  # no bootstrap: the metrics are means, whose standard errors need none
    )
    assert results is not None  # one process: rank 0
    samples = results.pop("samples", {})
    report = {
        "model": model,
        "base": base,
        "tasks": names,
        "prompt": style,
        "data_dir": data_dir,
        "limit": limit,
        "wall_s": round(time.time() - started, 2),
        "results": results["results"],
        "groups": results.get("groups", {}),
        "n_samples": results.get("n-samples", {}),
        "lm_eval": {k: v for k, v in results.items() if k not in {"results", "groups", "n-samples"}},
        "samples": {
            task: [
                {
                    "doc_id": s["doc_id"],
                    "target": s["target"],
                    "resps": s["filtered_resps"],
                    **{k: s[k] for k in ("acc", "acc_norm", "exact_match") if k in s},
                }
                for s in rows
            ]
            for task, rows in samples.items()
        },
    }
    path = report_path(output, model, "harness-results.json")
    atomic_write_text(path, json.dumps(report, indent=2, default=handle_non_serializable, ensure_ascii=False))
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(f"prompt: {style}; {report['wall_s']:.0f} s; report: {path}")
    return report


def main(argv: list[str]) -> int:
    from .cli import call

    call(evaluate_harness, "eval", argv, skip={"loaded"})
    sys.stdout.flush()
    return 0
