"""The paper's LLM experiments: commonsense and GSM8K, OSoRA against LoRA, VeRA, PiSSA, DoRA and full fine-tuning.

One runner, the same data, schedule and step budget for every method (SmolLM2-135M-Instruct by default, any
model folder, short name or hub id with ``--model``). Prompts are the model's chat template; the loss is on the
response only (:mod:`osora.app.data`).

Tasks:
  commonsense  train on an equal mix of the BoolQ, ARC-Easy, ARC-Challenge and OpenBookQA training sets; test on
               a fixed subset of each test set and their average. An answer is scored by the log-likelihood
               ranking of the options ("the correct answer is answer1" ... under the model), not by generation:
               no parse failures, one forward pass per question, lower noise. Second measure: the option
               NLL, −log of the right option's probability once the options' likelihoods are normalised (the
               ranking's log-loss): it moves with every record, where accuracy at this scale sits near the
               majority answer. ``--answers texts`` asks the bare question instead and scores each option's own
               text (lm-evaluation-harness's form for these sets): LLM-Adapters' label words ("answer2") ask a
               135M model to bind labels to listed options, which 100 steps do not teach it.
  gsm8k        train on GSM8K train; test: exact match of the greedy completion's last number with the reference
               (the paper's extraction, :data:`osora.app.scoring.TASKS`), plus the mean per-token negative
               log-likelihood of the reference solutions (a low-noise second measure).

Protocol (the same for every method):
  1. The training sets are shuffled with ``--data-seed``; the first records train, the next ones form a held-out
     *selection* slice. Test sets are never used to choose anything.
  2. Each method's learning rate comes from a log grid (the scale's ``grid_points`` values ``grid_step`` apart,
     centred on the row's ``lr_centre`` in :data:`ROWS`), trained with the first seed and scored on the selection
     slice (commonsense: option NLL; GSM8K: reference NLL). Where the best rate is an end of the grid, the grid
     grows past that end, one rate at a time, up to :data:`GRID_EXTENSIONS` rates. The best rate (a tie goes to the
     lower) is trained with every other seed; the table reports mean ± std over the seeds.
  3. Runs are scheduled in passes so that a benchmark cut short still answers the main questions: every method at
     its grid centre, then the rest of the grids, then the extra seeds.

Every finished run is written at once to ``benchmarks/results/llm_<task>_<scale>.json`` (config, git commit and
dirty flag, package versions, hardware, every run with its wall time, peak memory, trainable parameters and
adapter bytes) and reused by the next invocation with the same setup, so the benchmark completes over several
invocations; ``--time-budget`` stops starting new runs. The README table (``benchmarks/README_llm_<task>.md``,
placed by ``benchmarks/update_readme.py``, whose ``--check`` regenerates it from the JSON) and a PNG of accuracy
against trainable parameters (log x) are rewritten from the JSON after every run.

``--workers N`` trains N runs at once; every run has a fresh spawned process of its own (its peak memory is its
own). N > 1 is meant for a GPU, where one run of a 135M model uses a fraction of the device (on 2 CPU cores: at
most 2, with ``--threads 1``).

Example (the CPU preset, one invocation, resumable):
    nice -n 19 python benchmarks/llm.py --task commonsense --scale cpu
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import math
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from osora.app.provenance import BenchmarkRecord, peak_memory_bytes, provenance, shown_path, write_result
from osora.app.scoring import commonsense_options as answer_options
from osora.app.scoring import option_response

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

from glue import lr_grid  # noqa: E402
from workers import executor, own_peak_mb, runs_before  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COMMONSENSE_SETS = ("boolq", "arc_e", "arc_c", "obqa")


# -- methods --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A row of the table: a method of the registry (:data:`osora.app.methods.METHODS`) and its rank."""

    name: str  # osora, osora-S, osora-O, osora-scaled, lora, vera, pissa, dora, full, or "base" (no training)
    r: int = 0
    lr_centre: float = 0.0


#: Rank of OSoRA's "largest the matrices allow" row: min(d_in, d_out) of SmolLM2-135M's largest matrices
#: (hidden size 576); the k/v projections (576 -> 192) are clamped to 192 by OSoRA itself.
OSORA_RMAX = 576

#: The rows, most informative first. VeRA at r=32 trains r + d_out numbers per matrix: exactly OSoRA r=32's count.
#: Grid centres: the methods' usual rates for short LLM schedules; vector methods take larger ones.
ROWS: dict[str, Row] = {
    "base": Row("base"),
    "osora-r32": Row("osora", 32, 1e-2),
    "lora-r8": Row("lora", 8, 1e-3),
    "vera-r32": Row("vera", 32, 1e-2),
    "osora-S-r32": Row("osora-S", 32, 1e-2),
    "osora-O-r32": Row("osora-O", 32, 1e-2),
    "osora-r8": Row("osora", 8, 1e-2),
    "osora-r128": Row("osora", 128, 1e-2),
    f"osora-r{OSORA_RMAX}": Row("osora", OSORA_RMAX, 1e-2),
    "lora-r32": Row("lora", 32, 1e-3),
    "pissa-r8": Row("pissa", 8, 3e-4),
    "dora-r8": Row("dora", 8, 1e-3),
    # the learning-rate rule's candidate: S = σ ⊙ s with s trained, so Adam moves S and O by the same relative step
    "osora-scaled-r32": Row("osora-scaled", 32, 1e-2),
    "full": Row("full", 0, 3e-5),
}


# -- scales ---------------------------------------------------------------------------------------------------------


#: The forms of a commonsense answer (:attr:`Scale.answers`), as the table describes them.
ANSWERS_TEXT = {
    "labels": 'LLM-Adapters\' prompts (the options listed, the answer a label: "the correct answer is answer2")',
    "texts": "the bare question as the prompt and each option's own text as the answer (BoolQ: yes / no), "
    "lm-evaluation-harness's form",
}

#: The precisions a run can use (:attr:`Scale.precision`), as the table describes them.
PRECISION_TEXT = {
    "bf16": "training under bfloat16 autocast (float32 master weights), scoring in float32, GSM8K generation in "
    "bfloat16",
    "fp32": "float32 throughout",
}


@dataclass(frozen=True)
class Scale:
    """What one invocation trains and scores; every field is part of the setup that decides run reuse."""

    train_size: int  # training records (commonsense: split equally over the four sets)
    select_size: int  # held-out selection records (commonsense: per set)
    test_size: int  # test records per test set; 0: all
    max_length: int  # training records longer than this (prompt + response) are counted and skipped
    steps: int
    batch_size: int
    warmup_ratio: float = 0.1
    max_new_tokens: int = 256  # GSM8K generation
    eval_batch_size: int = 16
    #: "bf16": training under bfloat16 autocast (float32 master weights, as LLM fine-tuning is usually run) and
    #: GSM8K generation on bfloat16 weights; the log-likelihood scorers stay float32. "fp32": float32 throughout.
    precision: str = "bf16"
    #: Commonsense only, what an answer is (:data:`ANSWERS_TEXT`): "labels", LLM-Adapters' prompt with the options
    #: listed and the answer a label word (the paper's); "texts", the bare question and the answer the option's
    #: own text (lm-evaluation-harness's form for these sets).
    answers: str = "labels"
    seeds: tuple[int, ...] = (0, 1, 2)
    grid_points: int = 3
    grid_step: float = math.sqrt(10)

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_TEXT:
            raise ValueError(f"precision must be one of {sorted(PRECISION_TEXT)}, got {self.precision!r}")
        if self.answers not in ANSWERS_TEXT:
            raise ValueError(f"answers must be one of {sorted(ANSWERS_TEXT)}, got {self.answers!r}")


#: (task, scale) -> setup. The CPU preset is the issue's reduced scale (160-256 token records, 100 steps, 100 test
#: records per set; one commonsense run took 33 minutes at one thread on the shared 2 cores). The GPU preset uses
#: the full test sets and more data: commonsense 800 training records per set, what ARC-Challenge's 1,119 leave
#: beside its 250 held-out ones (an equal mix), 600 steps of 16 (3 epochs); GSM8K 7,000 of its 7,473.
SCALES: dict[tuple[str, str], Scale] = {
    ("commonsense", "cpu"): Scale(800, 25, 100, 160, 100, 8, max_new_tokens=0),
    ("gsm8k", "cpu"): Scale(800, 64, 100, 256, 100, 8, max_new_tokens=200),
    ("commonsense", "gpu"): Scale(3200, 250, 0, 256, 600, 16, max_new_tokens=0, eval_batch_size=64),
    ("gsm8k", "gpu"): Scale(7000, 400, 0, 512, 1000, 16, max_new_tokens=400, eval_batch_size=64),
}


# -- data -----------------------------------------------------------------------------------------------------------


def _read(path: Path) -> list[dict[str, Any]]:
    from osora.app.data import load_records

    return load_records(str(path))


def load_data(task: str, data_dir: Path, scale: Scale, data_seed: int) -> dict[str, Any]:
    """{"train": records, "select": records, "test": {set name: records}} for ``task``."""
    rng = random.Random(data_seed)
    if task == "commonsense":
        train: list[dict[str, Any]] = []
        select: list[dict[str, Any]] = []
        test = {}
        per_set = scale.train_size // len(COMMONSENSE_SETS)
        for name in COMMONSENSE_SETS:
            records = _read(data_dir / name / "train.json")
            rng.shuffle(records)
            if len(records) < per_set + scale.select_size:
                raise SystemExit(f"{data_dir / name}: {len(records)} training records, fewer than needed")
            form = answer_texts if scale.answers == "texts" else dict
            train += [form(r, set=name) for r in records[:per_set]]
            select += [form(r, set=name) for r in records[per_set : per_set + scale.select_size]]
            test[name] = [form(r, set=name) for r in _read(data_dir / name / "test.json")][
                : scale.test_size or None
            ]
        rng.shuffle(train)
        return {"train": train, "select": select, "test": test}
    records = _read(data_dir / "train.jsonl")
    rng.shuffle(records)
    if len(records) < scale.train_size + scale.select_size:
        raise SystemExit(f"{data_dir}: {len(records)} training records, fewer than needed")
    return {
        "train": records[: scale.train_size],
        "select": records[scale.train_size : scale.train_size + scale.select_size],
        "test": {"gsm8k": _read(data_dir / "test.jsonl")[: scale.test_size or None]},
    }


_LISTED_OPTION = re.compile(r"Answer(\d+): (.*?)(?= Answer\d+: |\n\nAnswer format:)", re.S)


def options_of(record: dict[str, Any]) -> list[str]:
    """A commonsense question's answer labels, in either form (:attr:`Scale.answers`)."""
    return list(record["option_texts"]) if "option_texts" in record else answer_options(record)


def answer_texts(record: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An LLM-Adapters commonsense record in the "texts" form (:attr:`Scale.answers`): the instruction becomes the
    bare question, ``option_texts`` maps each label to its text (BoolQ's true / false to yes / no), and the
    training response is the right option's text. The label stays the answer, so picks, the majority line and the
    paired scores read as in the "labels" form."""
    instruction, labels = str(record["instruction"]), answer_options(record)
    head, sep, rest = instruction.partition("question:")
    if not sep:
        raise ValueError(f"no 'question:' in the commonsense instruction {instruction[:120]!r}")
    if labels == ["true", "false"]:
        question = rest.split("\n\nAnswer format:")[0].strip()
        question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
        texts = {"true": "yes", "false": "no"}
    else:
        question = rest.split("\n\nAnswer1:")[0].strip()
        listed = {f"answer{n}": text.strip() for n, text in _LISTED_OPTION.findall(instruction)}
        if sorted(listed) != sorted(labels) or not all(listed.values()):
            raise ValueError(
                f"options {sorted(listed)} listed, {labels} in the answer format: {instruction[:120]!r}"
            )
        texts = {label: listed[label] for label in labels}
    answer = reference_answer(record)
    if answer not in texts:
        raise ValueError(f"answer {answer!r} is none of the options {labels}")
    return {**record, **extra, "instruction": question, "output": texts[answer], "option_texts": texts}


# -- scorers (pure given a log-probability function) ----------------------------------------------------------------


@dataclass
class ChoiceRequest:
    """How to score one question's options: one forward pass of ``context`` when the options' token sequences
    differ only in their last token (read at ``tokens``), else one pass per option (``sequences``)."""

    context: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    sequences: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt ids, response ids)


def choice_request(prompt_ids: list[int], option_ids: Sequence[list[int]]) -> ChoiceRequest:
    """The cheapest exact way to get log p(option | prompt) for each option (up to a shared prefix's term)."""
    common = 0
    while all(len(ids) > common + 1 for ids in option_ids) and len({ids[common] for ids in option_ids}) == 1:
        common += 1
    if all(len(ids) == common + 1 for ids in option_ids) and len({ids[-1] for ids in option_ids}) == len(
        option_ids
    ):
        return ChoiceRequest(
            context=prompt_ids + list(option_ids[0][:common]), tokens=[ids[-1] for ids in option_ids]
        )
    return ChoiceRequest(sequences=[(prompt_ids, list(ids)) for ids in option_ids])


def pick_option(scores: Sequence[float]) -> int:
    """The index of the most likely option (the first of equals)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def gsm8k_exact_match(completion: str, record: dict[str, Any]) -> bool:
    """The paper's GSM8K scoring: the completion's last number equals the reference after ``####``."""
    from osora.app.scoring import TASKS

    return TASKS["gsm8k"].score(completion, record)[2]


# -- model-side evaluation ------------------------------------------------------------------------------------------


def _batches(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _right_pad(seqs: Sequence[list[int]], pad: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def response_logprobs(model: Any, pairs: Sequence[tuple[list[int], list[int]]], pad: int, batch_size: int):
    """(summed log p(response | prompt), response length) for each (prompt ids, response ids) pair."""
    import torch

    out: list[tuple[float, int]] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in _batches(pairs, batch_size):
            ids, mask = _right_pad([p + r for p, r in batch], pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (b, seq, vocab)
            for i, (p, r) in enumerate(batch):
                logp = torch.log_softmax(
                    logits[i, len(p) - 1 : len(p) + len(r) - 1].float(), -1
                )  # (len(r), vocab), on the model's device
                picked = logp.gather(1, torch.tensor(r, device=device)[:, None])
                out.append((float(picked.sum()), len(r)))
    return out


def next_token_logprobs(
    model: Any, contexts: Sequence[list[int]], pad: int, batch_size: int, keep: Sequence[list[int]]
):
    """log p(token | context) for the tokens ``keep[i]`` of each context i (a CPU tensor per context).

    Left-padded with explicit positions (so padding changes nothing) and the LM head run on the last position only;
    only the kept entries leave the device (a full-test-set run would otherwise hold 200 KB per question).
    """
    import torch

    rows = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch, kept in zip(_batches(contexts, batch_size), _batches(keep, batch_size)):
            width = max(len(c) for c in batch)
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in batch])  # (batch, width)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in batch])
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=1,
            ).logits
            logp = torch.log_softmax(logits[:, -1].float(), -1)  # (batch, vocab)
            rows += [logp[i, tokens].cpu() for i, tokens in enumerate(kept)]
    return rows


def shared_prompt_logprobs(
    model: Any, questions: Sequence[tuple[list[int], Sequence[list[int]]]], pad: int, batch_size: int
) -> list[list[float]]:
    """Summed log p(response | prompt) of each response of each (prompt ids, [response ids, …]) question, the
    prompt run once and its key/value cache shared by its responses (the commonsense options of the "texts" form
    are a few tokens after a prompt ten times longer). Prompts are left-padded with explicit positions, the
    responses right-padded after them; only the positions that predict a response token reach the LM head."""
    import torch

    out: list[list[float]] = []
    device = next(model.parameters()).device
    # transformers 5.25 renamed the forward's past_key_values to cache (the old name warns)
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        for batch in _batches(questions, batch_size):
            width = max(len(p) for p, _ in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            first = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            first_logp = torch.log_softmax(first.logits[:, -1].float(), -1)  # (b, vocab): each response's 1st
            owner = [i for i, (_, responses) in enumerate(batch) for _ in responses]
            flat = [list(r) for _, responses in batch for r in responses]
            index = torch.tensor(owner, device=device)
            cache = getattr(first, "cache", None) or first.past_key_values
            cache.reorder_cache(index)  # each question's cache once per response
            span = max(len(r) for r in flat) - 1  # the response tokens that predict a next one
            scores = [float(first_logp[i, r[0]]) for i, r in zip(owner, flat)]
            if span > 0:
                rest = torch.tensor([r[:-1] + [pad] * (span - len(r) + 1) for r in flat], device=device)
                rest_mask = torch.tensor(
                    [[1] * (len(r) - 1) + [0] * (span - len(r) + 1) for r in flat], device=device
                )
                logits = model(
                    input_ids=rest,
                    attention_mask=torch.cat([mask[index], rest_mask], 1),
                    position_ids=positions[index, -1:] + 1 + torch.arange(span, device=device),
                    **{cache_argument: cache},
                ).logits  # (responses, span, vocab)
                for j, r in enumerate(flat):
                    if len(r) > 1:
                        logp = torch.log_softmax(logits[j, : len(r) - 1].float(), -1)
                        picked = logp.gather(1, torch.tensor(r[1:], device=device)[:, None])
                        scores[j] += float(picked.sum())
            start = 0
            for _, responses in batch:
                out.append(scores[start : start + len(responses)])
                start += len(responses)
    return out


def prompt_ids(tokenizer: Any, record: dict[str, Any], fmt: str) -> list[int]:
    from osora.app.data import make_prompt

    return tokenizer(make_prompt(record, fmt, "chat", tokenizer), add_special_tokens=False)["input_ids"]


def choice_scores(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], batch_size: int
) -> list[tuple[list[str], list[float]]]:
    """Each question's options ("answer1", "true", …) and their log-likelihoods log p(option | prompt), in record
    order (up to a term shared by a question's options, which neither the ranking nor the option NLL sees). The
    response scored is the training response with the option as the answer, or in the "texts" form the option's
    own text (``option_texts``)."""
    requests, options = [], []
    for record in records:
        options.append(options_of(record))
        texts = record.get("option_texts") or {o: option_response(record, o) for o in options[-1]}
        ids = [tokenizer(texts[o], add_special_tokens=False)["input_ids"] for o in options[-1]]
        requests.append(choice_request(prompt_ids(tokenizer, record, "commonsense"), ids))
    pad = tokenizer.pad_token_id
    fast = [q for q in requests if q.tokens]
    rows = iter(
        next_token_logprobs(model, [q.context for q in fast], pad, batch_size, [q.tokens for q in fast])
    )
    slow = [(q.sequences[0][0], [r for _, r in q.sequences]) for q in requests if not q.tokens]
    sums = iter(shared_prompt_logprobs(model, slow, pad, batch_size))
    return [
        (opts, [float(v) for v in next(rows)] if q.tokens else next(sums))
        for q, opts in zip(requests, options)
    ]


def option_nll(options: Sequence[str], scores: Sequence[float], answer: str) -> float:
    """−log of the correct option's probability among the question's options (their likelihoods normalised to
    sum to 1): the log-loss of the ranking, 0 when sure and right, log(#options) for a uniform guess (nats)."""
    top = max(scores)
    return top + math.log(sum(math.exp(s - top) for s in scores)) - scores[options.index(answer)]


def choice_outcomes(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], batch_size: int
) -> tuple[list[str], list[float]]:
    """Each question's picked option and its option NLL (:func:`option_nll`), in record order."""
    scored = choice_scores(model, tokenizer, records, batch_size)
    picks = [opts[pick_option(scores)] for opts, scores in scored]
    nlls = [
        option_nll(opts, scores, reference_answer(r))
        for (opts, scores), r in zip(scored, records, strict=True)
    ]
    return picks, nlls


def reference_answer(record: dict[str, Any]) -> str:
    return str(record["answer"]).strip().lower()


def accuracy_of(picks: Sequence[str], records: Sequence[dict[str, Any]]) -> float:
    return statistics.fmean(p == reference_answer(r) for p, r in zip(picks, records, strict=True))


def majority_baseline(data: dict[str, Any]) -> dict[str, float]:
    """Test accuracy (0–1) of always giving the answer most common among a set's training records (no model), per
    test set and their average: what a run that learned only the answer distribution scores."""
    out = {}
    for name, records in data["test"].items():
        counts = collections.Counter(reference_answer(r) for r in data["train"] if r["set"] == name)
        answer = min(counts, key=lambda a: (-counts[a], a))
        out[name] = statistics.fmean(reference_answer(r) == answer for r in records)
    out["average"] = statistics.fmean(out.values())
    return out


def top_pick_share(picks: dict[str, dict[str, int]]) -> float:
    """The share (0–1) of a set's questions given its most frequent pick, averaged over the sets: 1 when a model
    answers every question of each set alike, 1 / options when it spreads its answers evenly."""
    return statistics.fmean(max(c.values()) / sum(c.values()) for c in picks.values())


def reference_nll(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], batch_size: int) -> float:
    """Mean per-token negative log-likelihood of the reference responses (+ EOS, as trained), all tokens pooled."""
    sums, tokens = reference_nll_sums(model, tokenizer, records, batch_size)
    return sum(sums) / sum(tokens)


def reference_nll_sums(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], batch_size: int
) -> tuple[list[float], list[int]]:
    """Each reference response's summed negative log-likelihood (+ EOS, as trained) and its token count."""
    pairs = [
        (
            prompt_ids(tokenizer, r, "gsm8k"),
            tokenizer(r["answer"].strip() + tokenizer.eos_token, add_special_tokens=False)["input_ids"],
        )
        for r in records
    ]
    scored = response_logprobs(model, pairs, tokenizer.pad_token_id, batch_size)
    return [-float(s) for s, _ in scored], [int(n) for _, n in scored]


def gsm8k_exact_matches(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], scale: Scale):
    """(exact match per record, 1.0 or 0.0; completions) of greedy generation."""
    from osora.app.data import make_prompt
    from osora.app.evaluate import generate

    tokenizer.padding_side = "left"
    prompts = [make_prompt(r, "gsm8k", "chat", tokenizer) for r in records]
    completions = generate(
        model,
        tokenizer,
        prompts,
        scale.eval_batch_size,
        scale.max_new_tokens,
        add_special_tokens=False,  # the chat template holds them
        progress=False,
    )
    tokenizer.padding_side = "right"
    return [float(gsm8k_exact_match(c, r)) for c, r in zip(completions, records)], completions


# -- one run --------------------------------------------------------------------------------------------------------


def train(trainer: Any, precision: str) -> Any:
    """``trainer.train()`` in ``precision`` (:data:`PRECISION_TEXT`); its ``TrainOutput``.

    bf16 enters ``torch.autocast`` here rather than through ``TrainingArguments(bf16=True)``: accelerate keeps the
    first Trainer's precision for every later one in a process, so one process could not run both. The autocast
    weight cache is off: it lives as long as the context, so over a whole ``train()`` it would keep serving the first
    step's bfloat16 copy of every trainable weight and the forward would never see an update (peft's LoRA, PiSSA and
    DoRA then did not train; OSoRA's and VeRA's vectors, which autocast does not cast, did)."""
    import torch

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
        return trainer.train()


def run_one(
    task: str, key: str, lr: float, seed: int, args: argparse.Namespace, scale: Scale, data: dict[str, Any]
) -> dict[str, Any]:
    """Train ``key`` (a :data:`ROWS` row) at ``lr`` with ``seed``, score it; the run's result row."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from osora.app.classify import adapter_bytes
    from osora.app.config import DataConfig, MethodConfig
    from osora.app.data import build_train_dataset
    from osora.app.models import load_causal_lm
    from osora.app.params import count_parameters
    from osora.app.provenance import reset_peak_memory
    from osora.app.train import apply_method

    method = ROWS[key]
    row: dict[str, Any] = {"method": key, "lr": lr, "seed": seed, "steps": 0}
    row["earlier_runs_in_process"] = runs_before()  # only a process's first run measures its own peak memory
    reset_peak_memory()
    started = time.time()
    set_seed(seed)
    model, tokenizer = load_causal_lm(args.model, dtype="float32")
    tokenizer.padding_side = "right"
    if method.name != "base":
        fmt = "commonsense" if task == "commonsense" else "gsm8k"
        data_cfg = DataConfig(format=fmt, prompt="chat", max_length=scale.max_length)  # type: ignore[arg-type]
        train_set, report = build_train_dataset(data["train"], tokenizer, data_cfg)
        row["train_records"] = {"kept": report.kept, "skipped": dict(report.skipped)}
        model = apply_method(
            model, MethodConfig(name=method.name, fields={"r": method.r} if method.r else {})
        )
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(
                    Path(args.work_dir) / f"trainer-{key}-{lr:g}-{seed}"
                ),  # one per concurrent run
                max_steps=scale.steps,
                learning_rate=lr,
                lr_scheduler_type="cosine",
                warmup_steps=scale.warmup_ratio,
                per_device_train_batch_size=scale.batch_size,
                save_strategy="no",
                report_to=[],
                logging_steps=10,
                seed=seed,
                disable_tqdm=True,
            ),
            train_dataset=train_set,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        )
        result = train(trainer, scale.precision)
        row["steps"] = trainer.state.global_step
        row["train_loss"] = result.training_loss
        row["loss_curve"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row["train_seconds"] = time.time() - started
    row["trainable_params"], row["total_params"] = count_parameters(model)
    if method.name == "base":
        row["trainable_params"] = 0
    row["adapter_bytes"] = adapter_bytes(model) if method.name not in {"base", "full"} else 0
    if method.name.startswith("osora"):  # the compact file: S, O and fingerprints, factors recomputed on load
        row["compact_adapter_bytes"] = adapter_bytes(model, save_factors=False)
    if method.name == "full":
        row["adapter_bytes"] = 4 * row["trainable_params"]  # the whole fp32 model is the "adapter"
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # scoring on merged weights: no adapter cost per token
    if torch.cuda.is_available():  # Trainer moved a trained model there; the base model is scored there too
        model = model.cuda()
    model.eval()
    evaluated = time.time()
    if task == "commonsense":
        picks, nlls = choice_outcomes(model, tokenizer, data["select"], scale.eval_batch_size)
        row["select_acc"], row["select_nll"] = accuracy_of(picks, data["select"]), statistics.fmean(nlls)
        row["test_acc"], row["test_nll"], row["test_picks"], row["per_record"] = {}, {}, {}, {}
        for name, records in data["test"].items():
            picks, nlls = choice_outcomes(model, tokenizer, records, scale.eval_batch_size)
            row["test_acc"][name], row["test_nll"][name] = accuracy_of(picks, records), statistics.fmean(nlls)
            row["test_picks"][name] = dict(sorted(collections.Counter(picks).items()))
            row["per_record"][name] = [float(p == reference_answer(r)) for p, r in zip(picks, records)]
            row["per_record"][f"{name}_nll"] = nlls
        row["test_acc"]["average"] = statistics.fmean(row["test_acc"].values())
        row["test_nll"]["average"] = statistics.fmean(row["test_nll"].values())
    else:
        test = data["test"]["gsm8k"]
        row["select_nll"] = reference_nll(model, tokenizer, data["select"], scale.eval_batch_size)
        nll_sums, tokens = reference_nll_sums(model, tokenizer, test, scale.eval_batch_size)
        row["test_nll"] = sum(nll_sums) / sum(tokens)
        if scale.precision == "bf16":
            model = model.to(torch.bfloat16)  # generation as deployed; the NLLs above are float32
        matches, completions = gsm8k_exact_matches(model, tokenizer, test, scale)
        row["test_acc"] = {"gsm8k": statistics.fmean(matches)}
        row["per_record"] = {"gsm8k": matches, "nll": nll_sums, "tokens": tokens}
        row["completion_samples"] = completions[:3]
    row["eval_seconds"] = time.time() - evaluated
    row["peak_memory_bytes"] = peak_memory_bytes()
    row["torch_threads"] = torch.get_num_threads()
    return row


# -- protocol, summary ----------------------------------------------------------------------------------------------


def selection_score(task: str, row: dict[str, Any]) -> float:
    """Higher is better: minus the held-out NLL (GSM8K: of the reference solutions; commonsense: the option NLL,
    :func:`option_nll`). Commonsense runs written before the option NLL was kept (every run of the float32 file)
    are ranked by held-out accuracy instead; within one result file all runs have the same criterion."""
    if task == "commonsense" and "select_nll" not in row:
        return row["select_acc"]
    return -row["select_nll"]


#: How many rates a method's grid may grow by in all, one grid step past an end at a time (:func:`grids`).
GRID_EXTENSIONS = 2


def grids(
    methods: Sequence[str], scale: Scale, task: str = "", runs: Sequence[dict[str, Any]] = ()
) -> dict[str, list[float]]:
    """Each method's learning rates: ``grid_points`` rates ``grid_step`` apart centred on its row's ``lr_centre``.

    With ``runs`` (of ``task``) a grid grows: once every rate in it has been trained with the first seed and the
    pick (:func:`best_lr`) is one of its ends, the next rate past that end joins it, at most
    :data:`GRID_EXTENSIONS` rates in all. A pick at an edge says the best rate may lie beyond it."""
    first, out = scale.seeds[0], {}
    for m in methods:
        if ROWS[m].name == "base":
            out[m] = [0.0]
            continue
        wide = lr_grid(ROWS[m].lr_centre, scale.grid_points + 2 * GRID_EXTENSIONS, scale.grid_step)
        lo, hi = GRID_EXTENSIONS, GRID_EXTENSIONS + scale.grid_points - 1  # the grid is wide[lo : hi + 1]
        while runs and hi - lo + 1 < scale.grid_points + GRID_EXTENSIONS:
            sweep = [
                r for r in runs if r["method"] == m and r["seed"] == first and r["lr"] in wide[lo : hi + 1]
            ]
            if {r["lr"] for r in sweep} != set(wide[lo : hi + 1]):
                break
            pick = best_lr(task, sweep, m, first)
            if pick == wide[hi]:
                hi += 1
            elif pick == wide[lo]:
                lo -= 1
            else:
                break
        out[m] = wide[lo : hi + 1]
    return out


def grid_centre(method: str, scale: Scale) -> float:
    """The middle rate of ``method``'s grid before it grew: the first rate it trains."""
    grid = grids([method], scale)[method]
    return grid[len(grid) // 2]


def best_lr(task: str, runs: Sequence[dict[str, Any]], method: str, seed: int) -> float | None:
    """The rate of the best selection score among ``method``'s runs with ``seed`` (a tie: the lower rate)."""
    sweep = [r for r in runs if r["method"] == method and r["seed"] == seed]
    if not sweep:
        return None
    return max(sweep, key=lambda r: (selection_score(task, r), -r["lr"]))["lr"]


def schedule(
    task: str, runs: Sequence[dict[str, Any]], methods: Sequence[str], scale: Scale
) -> list[tuple[str, float, int]]:
    """The runs still to do, in passes: every method at its grid centre, the rest of the grids (grown where the
    pick sits at an end, :func:`grids`), the extra seeds.

    The extra seeds of a method wait until its grid is complete (the pick is only known then)."""
    done = {(r["method"], r["lr"], r["seed"]) for r in runs}
    grid = grids(methods, scale, task, runs)
    first = scale.seeds[0]
    todo: list[tuple[str, float, int]] = []
    todo += [(m, grid_centre(m, scale), first) for m in methods]
    todo += [(m, lr, first) for m in methods for lr in grid[m]]
    for m in methods:
        if all((m, lr, first) in done for lr in grid[m]):
            lr = best_lr(task, runs, m, first)
            todo += [(m, lr, s) for s in (scale.seeds if ROWS[m].name != "base" else ()) if lr is not None]
    seen: set[tuple[str, float, int]] = set()
    return [k for k in todo if not (k in done or k in seen or seen.add(k))]  # type: ignore[func-returns-value]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


#: The row every other row is compared with record by record (:func:`paired_difference`): the paper's method at
#: the rank whose r + d_out trainables VeRA r = 32 matches.
PAIRED_REFERENCE = "osora-r32"


def _per_record_mean(runs: Sequence[dict[str, Any]], key: str) -> list[float]:
    """Each test record's ``key`` value averaged over ``runs`` (the seeds of one row)."""
    return [statistics.fmean(v) for v in zip(*(r["per_record"][key] for r in runs), strict=True)]


def _paired(runs: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [a - b for a, b in zip(_per_record_mean(runs, key), _per_record_mean(reference, key), strict=True)]


def _standard_error(values: Sequence[float]) -> float:
    return math.sqrt(statistics.variance(values) / len(values)) if len(values) > 1 else 0.0


def paired_difference(
    task: str, runs: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]]
) -> dict[str, tuple[float, float]] | None:
    """A row's headline measures minus the reference row's on the same test records, with the standard error of
    that difference over the records (each record's value first averaged over the seeds a row ran): commonsense,
    the average accuracy (points) and option NLL (the four sets' differences averaged, their variances combined;
    the NLL only when both sides kept it); GSM8K, exact match (points) and the pooled per-token reference NLL. It separates a real gap from the test subset's noise,
    not from the seed's. None when a run on either side was written before the per-record values were kept."""
    if not reference or not all("per_record" in r for r in [*runs, *reference]):
        return None
    if task == "commonsense":

        def over_sets(suffix: str) -> tuple[float, float]:  # the four sets' differences averaged
            diffs = [_paired(runs, reference, name + suffix) for name in COMMONSENSE_SETS]
            mean = statistics.fmean(statistics.fmean(d) for d in diffs)
            return mean, math.sqrt(sum(_standard_error(d) ** 2 for d in diffs)) / len(diffs)

        mean, error = over_sets("")
        out = {"average": (100 * mean, 100 * error)}
        if all(f"{COMMONSENSE_SETS[0]}_nll" in r["per_record"] for r in [*runs, *reference]):
            out["nll"] = over_sets("_nll")
        return out
    tokens = runs[0]["per_record"]["tokens"]
    if any(r["per_record"]["tokens"] != tokens for r in [*runs, *reference]):
        raise ValueError("paired NLL: the runs scored reference solutions of different token counts")
    em, nll = _paired(runs, reference, "gsm8k"), _paired(runs, reference, "nll")
    return {
        "gsm8k": (100 * statistics.fmean(em), 100 * _standard_error(em)),
        "nll": (sum(nll) / sum(tokens), len(nll) * _standard_error(nll) / sum(tokens)),
    }


def summarise(
    task: str, runs: Sequence[dict[str, Any]], methods: Sequence[str], scale: Scale
) -> list[dict[str, Any]]:
    """One row per method with runs: the rate picked so far, mean ± std over the seeds run at it, costs, and the
    paired difference from :data:`PAIRED_REFERENCE`."""
    grid = grids(methods, scale, task, runs)
    reference_lr = best_lr(task, runs, PAIRED_REFERENCE, scale.seeds[0])
    reference = [r for r in runs if r["method"] == PAIRED_REFERENCE and r["lr"] == reference_lr]
    rows = []
    for m in methods:
        lr = best_lr(task, runs, m, scale.seeds[0])
        if lr is None:
            continue
        final = [r for r in runs if r["method"] == m and r["lr"] == lr]
        tried = sorted(r["lr"] for r in runs if r["method"] == m and r["seed"] == scale.seeds[0])
        row: dict[str, Any] = {
            "method": m,
            "best_lr": lr,
            "grid": grid[m],
            "lrs_tried": tried,
            "grid_complete": tried == sorted(grid[m]),
            "best_lr_at_grid_edge": len(grid[m]) > 1 and lr in (min(grid[m]), max(grid[m])),
            "seeds": sorted(r["seed"] for r in final),
            "trainable_params": final[0]["trainable_params"],
            "adapter_bytes": final[0]["adapter_bytes"],
            "compact_adapter_bytes": final[0].get("compact_adapter_bytes"),
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in final),
            "peak_memory_mb": own_peak_mb(final),
            "test": {},
        }
        for name in final[0]["test_acc"]:
            row["test"][name] = _mean_std([100 * r["test_acc"][name] for r in final])
        if all("test_picks" in r for r in final):  # runs written before the picks were kept have none
            row["top_pick_share"] = statistics.fmean(top_pick_share(r["test_picks"]) for r in final)
        if m != PAIRED_REFERENCE and (paired := paired_difference(task, final, reference)) is not None:
            row["vs_reference"] = paired
        sweep = [r for r in runs if r["method"] == m and r["seed"] == scale.seeds[0]]
        if task == "gsm8k":
            row["test"]["nll"] = _mean_std([r["test_nll"] for r in final])
        elif all("test_nll" in r for r in final):
            row["test"]["nll"] = _mean_std([r["test_nll"]["average"] for r in final])
        if task == "commonsense":
            row["select_acc_by_lr"] = {str(r["lr"]): r["select_acc"] for r in sweep}
        if all("select_nll" in r for r in sweep):
            row["select_nll_by_lr"] = {str(r["lr"]): r["select_nll"] for r in sweep}
        rows.append(row)
    return rows


def headline(task: str) -> str:
    return "average" if task == "commonsense" else "gsm8k"


# -- table and plot -------------------------------------------------------------------------------------------------


def machine(hardware: dict[str, Any]) -> str:
    """Where the runs ran, as the table names it: the GPU and the CPU beside it, or the CPU alone."""
    gpu = hardware.get("gpu")
    return f"{gpu} ({hardware['cpu']}, {hardware['cores']} cores)" if gpu else hardware["cpu"]


def markdown(report: dict[str, Any]) -> str:
    """The README table of one result file."""
    task, cfg = report["task"], report["config"]
    scale, git = cfg["scale"], report["provenance"]["git"]
    picks = task == "commonsense"
    option_nll_kept = picks and any("nll" in row["test"] for row in report["summary"])
    sets = [*COMMONSENSE_SETS, "average"] + ["nll"] * option_nll_kept if picks else ["gsm8k", "nll"]
    names = {"average": "avg", "nll": "option NLL" if picks else "ref NLL", "gsm8k": "GSM8K EM"}
    if not picks:
        measure = "exact match (%) of the greedy answer's last number, and the mean per-token NLL of the reference solutions"
        criterion = "reference NLL"
    else:
        form = ANSWERS_TEXT[scale.get("answers", "labels")]
        measure = f"{form}; accuracy (%) by log-likelihood ranking of the answer options" + (
            ", and the option NLL averaged over the four sets: −log of the right option's probability when the "
            "options' likelihoods are normalised to sum to 1 (nats, lower is better; a uniform guess scores 0.693 "
            "on BoolQ's two options, 1.386 on four)"
            if option_nll_kept
            else ""
        )
        criterion = "option NLL" if option_nll_kept else "accuracy"
    paired = any("vs_reference" in row for row in report["summary"])
    lines = [
        f"<!-- generated by benchmarks/llm.py from {report['output_json']}; do not edit by hand -->",
        f"**{task}** ({cfg['scale_name']} scale), `{cfg['model']}`: {scale['steps']} steps × {scale['batch_size']} "
        f"records of ≤ {scale['max_length']} tokens ({scale['train_size']} training records), cosine schedule; "
        f"{PRECISION_TEXT[scale.get('precision', 'fp32')]}; "
        f"test: {measure}, first {scale['test_size'] or 'all'} records of each test set; mean ± std over the seeds "
        f"run at the picked rate. Learning rate picked per method by its {criterion} on a held-out slice of the "
        f"training data ({scale['grid_points']}-point grid ×{scale['grid_step']:.3g} apart, grown past an end by up "
        f"to {GRID_EXTENSIONS} rates while the pick sits there). "
        f"Git {git['commit'][:8]}{' (dirty)' if git['dirty'] else ''}, {machine(report['provenance']['hardware'])}.",
        "",
        "| method | "
        + " | ".join(names.get(s, s) for s in sets)
        + (" | top pick (%)" if picks else "")
        + (f" | Δ vs {PAIRED_REFERENCE} (paired)" if paired else "")
        + " | trainable params | adapter bytes | lr (grid done) | seeds | train time (s) | peak mem (MB) |",
        "|---|" + "---|" * (len(sets) + 6 + picks + paired),
    ]
    if "majority" in report:
        lines.append(
            "| majority answer (no model) | "
            + " | ".join(
                f"{100 * report['majority'][s]:.1f}" if s in report["majority"] else "–" for s in sets
            )
            + " | 100"
            + (" | –" if paired else "")
            + " | 0 | 0 | – | – | – | – |"
        )
    for row in report["summary"]:
        cells = []
        for s in sets:
            if s not in row["test"]:  # a row of runs written before the option NLL was kept
                cells.append("–")
                continue
            mean, std = row["test"][s]
            cells.append(f"{mean:.3f} ± {std:.3f}" if s == "nll" else f"{mean:.1f} ± {std:.1f}")
        if picks:
            cells.append(f"{100 * row['top_pick_share']:.0f}" if "top_pick_share" in row else "–")
        if paired:
            cells.append(_paired_text(row))
        grid_text = (
            "–"
            if row["grid"] == [0.0]
            else (
                f"{row['best_lr']:g} ({len(row['lrs_tried'])}/{len(row['grid'])}{', edge' if row['best_lr_at_grid_edge'] else ''})"
            )
        )
        train_time = f"{row['train_seconds_mean']:.0f}" if row["trainable_params"] else "–"
        lines.append(
            f"| {row['method']} | " + " | ".join(cells) + f" | {row['trainable_params']:,} | {_bytes(row)} | "
            f"{grid_text} | {len(row['seeds'])} | {train_time} | {_peak_text(row)} |"
        )
    lines += [
        "",
        '"lr (grid done)": the picked rate and how many of the grid\'s rates were trained ("edge": the pick is an '
        "end of the grid); a row with fewer than all rates or one seed is unfinished. Train time is wall clock per run "
        "(model load and training; scoring not included), peak memory the process's peak resident set (CPU) or CUDA allocation; on a "
        'shared CPU both are noisy. Peak memory "–": no run of the row is known to have been the first in its process (each may have read '
        "what earlier runs had left allocated: runs written before every run had a process of its own). Adapter "
        "bytes: the file `osora.save_adapter` writes by default (OSoRA's with its "
        "frozen factors), and for OSoRA rows the compact file (`save_factors=False`: S, O and base-weight "
        "fingerprints; the factors are recomputed on load).",
        "",
    ]
    if paired:
        measures = (
            "exact match and the reference NLL"
            if not picks
            else "average accuracy and option NLL"
            if option_nll_kept
            else "the average accuracy"
        )
        lines += [
            f"\"Δ vs {PAIRED_REFERENCE}\": this row's {measures} minus {PAIRED_REFERENCE}'s, record by record on the "
            "same test records (each record averaged over a row's seeds first), ± the standard error of that "
            "difference over the records: the test subset's noise, not the seed's. Positive accuracy and negative "
            'NLL are better than OSoRA; "–": a row with runs written before the per-record scores were kept.',
            "",
        ]
    if picks:
        lines += [
            '"majority answer": every test question given the answer most common among its set\'s training records; '
            'a run at or below it has learned no more than the answer distribution. "top pick": the share of a test '
            "set's questions given the run's most frequent answer, averaged over the four sets (100: one answer for "
            'everything; 31: answers spread evenly over each set\'s options); "–": a run written before the picks were kept.',
            "",
        ]
    lines += [
        f"Command (resumable; {len(report['runs'])} runs so far): `{report['command']}`",
    ]
    return "\n".join(lines) + "\n"


def _paired_text(row: dict[str, Any]) -> str:
    if row["method"] == PAIRED_REFERENCE:
        return "(reference)"
    if "vs_reference" not in row:
        return "–"
    parts = {
        name: f"{mean:+.3f} ± {error:.3f}" if name == "nll" else f"{mean:+.1f} ± {error:.1f}"
        for name, (mean, error) in row["vs_reference"].items()
    }
    if "average" in parts:
        return parts["average"] + (f", NLL {parts['nll']}" if "nll" in parts else "")
    return f"EM {parts['gsm8k']}, NLL {parts['nll']}"


def _peak_text(row: dict[str, Any]) -> str:
    return "–" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"


def _bytes(row: dict[str, Any]) -> str:
    compact = row.get("compact_adapter_bytes")
    return f"{row['adapter_bytes']:,}" + (f" (compact {compact:,})" if compact else "")


def plot(report: dict[str, Any], path: Path) -> None:
    """Test score against trainable parameters (log x), mean ± std over seeds; a second panel with the task's
    low-noise measure, the reference NLL (GSM8K) or the option NLL (commonsense, when its runs kept it), lower is
    better. Untrained rows are dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = report["task"]
    panels = [
        (
            headline(task),
            f"{task} test accuracy (%)" + (", average of 4 sets" if task == "commonsense" else ""),
        )
    ]
    if task == "gsm8k":
        panels.append(("nll", "reference-solution NLL per token (lower is better)"))
    elif any("nll" in row["test"] for row in report["summary"]):
        panels.append(("nll", "option NLL, average of 4 sets (lower is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        if key in report.get("majority", {}):
            ax.axhline(
                100 * report["majority"][key], color="grey", ls=":", lw=1, label="majority answer (no model)"
            )
        for row in report["summary"]:
            if key not in row["test"]:
                continue
            mean, std = row["test"][key]
            if row["trainable_params"] == 0:
                ax.axhline(mean, color="grey", ls="--", lw=1, label=f"{row['method']} (untrained)")
                continue
            ax.errorbar(row["trainable_params"], mean, yerr=std, fmt="o", capsize=3)
            ax.annotate(
                row["method"],
                (row["trainable_params"], mean),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel without untrained rows or majority line has none
            ax.legend(fontsize=8)
    fig.suptitle(f"{task}, {report['config']['model']}: test score vs trainable parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def readme_name(task: str, scale: str, precision: str = "bf16", answers: str = "labels") -> str:
    """The table's name: ``<!-- bench:NAME -->`` in README.md, ``benchmarks/README_NAME.md``,
    ``benchmarks/results/NAME.json``; a precision other than the presets' bf16 and commonsense answers other than
    labels are part of it."""
    return (
        f"llm_{task}_{scale}"
        + ("" if answers == "labels" else f"_{answers}")
        + ("" if precision == "bf16" else f"_{precision}")
    )


def render(json_path: Path) -> str:
    """The table of a committed result file (what ``update_readme.py --check`` compares with README_llm_*.md)."""
    return markdown(as_record(json.loads(json_path.read_text())))


# -- main -----------------------------------------------------------------------------------------------------------


def as_record(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` in the shape of :class:`osora.app.provenance.BenchmarkRecord` (files written before this runner
    used it kept their git state and environment at the top level; their runs get that git state)."""
    if "provenance" in report:
        return report
    old = report
    for run in old["runs"]:
        run.setdefault("git", old["git"])
    config = {
        "scale_name": old["config"]["scale"],
        **{k: old["config"][k] for k in ("model", "methods", "data_seed")},
    }
    config |= {
        "setup": old["setup"],
        "scale": old["scale"],
        "rows": old["methods"],
        "lr_grids": old["lr_grids"],
    }
    return {
        "benchmark": "llm",
        "command": old["command"],
        "config": {**config, "protocol": old["protocol"]},
        # this machine and venv as now, with the git state and date of the invocation that wrote the runs
        "provenance": {
            **provenance(),
            "git": old["git"],
            "date_utc": max((r["finished_at"] for r in old["runs"]), default=None),
        },
        "wall_s": sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in old["runs"]),
        "peak_memory_bytes": max((r["peak_memory_bytes"] for r in old["runs"]), default=0),
        **{k: old[k] for k in ("task", "output_json", "runs", "summary") if k in old},
    }


#: Scale fields that do not change a run's result (which runs to do, how fast to score), left out of the setup.
NOT_SETUP = ("seeds", "grid_points", "grid_step", "eval_batch_size")


def setup_of(args: argparse.Namespace, scale: Scale) -> dict[str, Any]:
    """What decides whether an earlier run can be reused: model, data, and the scale's training and test sizes."""
    fields = {k: v for k, v in asdict(scale).items() if k not in NOT_SETUP}
    if fields["answers"] == "labels":  # the form of every file written before there was a choice
        del fields["answers"]
    return {"model": args.model, "data_dir": str(args.data_dir), "data_seed": args.data_seed, **fields}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("commonsense", "gsm8k"), required=True)
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct", help="short name, model folder or hub id")
    p.add_argument("--data-dir", type=Path, help="default: ../shared/data/<task> next to the repository")
    p.add_argument("--methods", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, help="default: the scale's (0 1 2)")
    p.add_argument("--steps", type=int, help="override the scale's step budget")
    p.add_argument("--test-size", type=int, help="override the scale's test records per set (0: all)")
    p.add_argument("--train-size", type=int, help="override the scale's training records")
    p.add_argument(
        "--select-size", type=int, help="override the scale's held-out records (commonsense: per set)"
    )
    p.add_argument(
        "--precision",
        choices=sorted(PRECISION_TEXT),
        help="override the scale's (bf16: training under autocast)",
    )
    p.add_argument(
        "--answers",
        choices=sorted(ANSWERS_TEXT),
        help="commonsense: labels (LLM-Adapters' prompts, the default) or texts (the bare question, each option's "
        "text scored); texts results go to llm_commonsense_<scale>_texts.json",
    )
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument(
        "--time-budget", type=float, default=2.5 * 3600, help="seconds; no new run starts after it"
    )
    p.add_argument("--max-runs", type=int, default=0, help="stop after this many new runs (0: no limit)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--readme-dir", type=Path, default=ROOT / "benchmarks")
    p.add_argument("--work-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "osora-bench-llm"))
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); on an oversubscribed CPU 1 is several times faster",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs trained at once, each in its own process (on one GPU a 135M model uses a fraction of it); "
        "1: one after another",
    )
    p.add_argument("--render", action="store_true", help="only rewrite the table and plot from the JSON")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    if args.data_dir is None:  # ../shared/data next to the checkout (or next to the folder of worktrees)
        found = [d / "shared" / "data" for d in ROOT.parents if (d / "shared" / "data").is_dir()]
        args.data_dir = (found[0] if found else ROOT.parent / "shared" / "data") / args.task
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = SCALES[(args.task, args.scale)]
    overrides = {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "steps": args.steps,
        "test_size": args.test_size,
    }
    overrides |= {"train_size": args.train_size, "select_size": args.select_size, "precision": args.precision}
    if args.answers and args.task != "commonsense":
        raise SystemExit("--answers applies to --task commonsense only")
    overrides["answers"] = args.answers
    scale = replace(scale, **{k: v for k, v in overrides.items() if v is not None})
    if not args.render and not args.data_dir.is_dir():
        raise SystemExit(
            f"--data-dir {args.data_dir}: no such folder (the {args.task} data; default: ../shared/data/{args.task} "
            "next to the checkout)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    name = readme_name(args.task, args.scale, scale.precision, scale.answers)
    json_path = args.out / f"{name}.json"
    png_path = json_path.with_suffix(".png")
    readme_path = args.readme_dir / f"README_{name}.md"
    setup = setup_of(args, scale)
    try:
        earlier: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise SystemExit(
            f"{json_path} is not a complete result file ({e}); it is left as it is: move it away, or pass --out DIR"
        ) from None
    if earlier:
        earlier = as_record(earlier)
        if earlier["config"]["setup"] != setup:
            changed = sorted(k for k in setup if earlier["config"]["setup"].get(k) != setup[k])
            print(
                f"{json_path} holds runs of another setup (differs in {', '.join(changed)}); pass --out DIR to "
                "keep both",
                file=sys.stderr,
            )
            return 2
    runs: list[dict[str, Any]] = earlier.get("runs", [])
    results = {
        "task": args.task,
        "output_json": shown_path(json_path),
        "runs": runs,
    }

    def save(result: dict[str, Any]) -> None:
        result["summary"] = summarise(args.task, runs, result["config"]["methods"], scale)
        write_result(json_path, result)
        if result["summary"]:
            plot(result, png_path)
            readme_path.write_text(markdown(result))

    if args.render:  # the table and plot of the JSON as it is (its provenance and command kept)
        if not earlier:
            print(
                f"--render: no result file {json_path} (--out names the folder that holds it)",
                file=sys.stderr,
            )
            return 2
        earlier["output_json"] = results[
            "output_json"
        ]  # the file's place now (a GPU machine wrote it elsewhere)
        if args.task == "commonsense" and "majority" not in earlier and args.data_dir.is_dir():
            earlier["majority"] = majority_baseline(
                load_data(args.task, args.data_dir, scale, args.data_seed)
            )
        save(earlier)
        return 0
    # The table keeps every method already run, so running a few rows with --methods does not drop the others.
    shown = [m for m in ROWS if m in args.methods or any(r["method"] == m for r in runs)]
    config = {
        "scale_name": args.scale,
        "model": args.model,
        "methods": shown,
        "data_seed": args.data_seed,
        "setup": setup,
        "scale": asdict(scale),
        "rows": {m: asdict(ROWS[m]) for m in shown},
        "lr_grids": grids(shown, scale),
        "protocol": __doc__.split("Protocol (the same for every method):")[1].split("\n\n")[0].strip(),
    }
    command = " ".join(["python", "benchmarks/llm.py", *(sys.argv[1:] if argv is None else argv)])
    record = BenchmarkRecord("llm", config, command=command)  # provenance taken before anything is written
    data = load_data(args.task, args.data_dir, scale, args.data_seed)
    if args.task == "commonsense":
        results["majority"] = majority_baseline(data)
    started, new = time.time(), 0

    def finish() -> dict[str, Any]:
        """The record as it stands; its peak memory the larger of this process's and its runs' own."""
        runs_peak = max((r.get("peak_memory_bytes") or 0 for r in runs), default=0)
        return record.finish(peak_memory=max(peak_memory_bytes(), runs_peak), **results)

    running: dict[Future[dict[str, Any]], tuple[str, float, int]] = {}
    with executor(args.workers, args.threads) as pool:
        while True:
            todo = [t for t in schedule(args.task, runs, args.methods, scale) if t not in running.values()]
            over = time.time() - started > args.time_budget or bool(
                args.max_runs and new + len(running) >= args.max_runs
            )
            while todo and not over and len(running) < args.workers:
                key, lr, seed = todo.pop(0)
                print(f"run {key} lr={lr:g} seed={seed} ({len(todo) + 1} left)", flush=True)
                job = pool.submit(run_one, args.task, key, lr, seed, args, scale, data)
                running[job] = (key, lr, seed)
            if not running:
                if todo:
                    print(f"stopping: budget reached; {len(todo)} runs left (run the same command again)")
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for job in finished:
                del running[job]
                row = job.result()
                row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                row["git"] = record.provenance["git"]
                row["concurrent_runs"] = args.workers
                runs.append(row)
                new += 1
                print(
                    json.dumps(
                        {k: v for k, v in row.items() if k not in {"loss_curve", "completion_samples"}}
                    ),
                    flush=True,
                )
                save(finish())
    save(finish())
    return 0


if __name__ == "__main__":
    sys.exit(main())
