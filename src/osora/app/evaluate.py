"""``osora eval --config CONFIG.yaml [--section.key VALUE ...]``: score a base model, an adapter dir or a merged model.

Prompts are built like the training prompts (``eval.prompt`` or ``data.prompt``), optionally preceded by
``eval.k_shot`` solved examples, generated greedily in left-padded batches, and scored by the task's pure scorer
(:mod:`osora.app.scoring`). The JSON report holds the config, the accuracy and every example's prompt,
completion, extracted answer, reference and verdict.

Example:
    osora eval --config configs/tiny/gsm8k-osora.yaml --eval.model=runs/tiny-gsm8k-osora
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoints import atomic_write_text, check_not_partial_adapter
from .config import ConfigError, RunConfig, config_from_argv, to_dict
from .data import detect_format, few_shot_prefix, load_records, make_prompt
from .models import load_causal_lm, load_tokenizer
from .scoring import TASKS

ADAPTER_CONFIG = "adapter_config.json"


def load_model(
    path: str, base: str | None = None, dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) for a model (a folder, ``.gguf`` file, short name or hub id: see
    :func:`osora.app.models.resolve`), or for an adapter dir on top of its base model."""
    model: Any
    adapter_config = Path(path) / ADAPTER_CONFIG
    if adapter_config.is_file():
        from peft import PeftModel

        import osora  # noqa: F401  (registers OSoRA with peft)

        base = base or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}: adapter_config.json names no base model; pass eval.base")
        has_tokenizer = (Path(path) / "tokenizer_config.json").is_file()
        model, tokenizer = load_causal_lm(base, dtype, trust_remote_code, with_tokenizer=not has_tokenizer)
        model = PeftModel.from_pretrained(model, path)
        if has_tokenizer:
            tokenizer = load_tokenizer(path)
    else:
        check_not_partial_adapter(Path(path))
        model, tokenizer = load_causal_lm(path, dtype, trust_remote_code)
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


def merged_for_inference(model: Any) -> Any:
    """The plain transformers model with every adapter merged into its weights (W' = W + ΔW), for fast generation.

    A PEFT model is merged in place and unwrapped (``merge_and_unload``); any other model is returned as it is.
    Generation then costs what the base model costs: no adapter branch runs per token.
    """
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def cut_at_stop(completion: str, stop_strings: Sequence[str]) -> str:
    """``completion`` up to (not including) the first of ``stop_strings`` that occurs in it."""
    ends = [completion.find(s) for s in stop_strings if s and s in completion]
    return completion[: min(ends)] if ends else completion


class StopOnStrings:
    """A transformers stopping criterion: a sequence is done once its new text holds one of ``stop_strings``.

    It decodes the last few new tokens of each sequence, so it works with any tokenizer (transformers' own
    ``stop_strings`` needs a tokenizer whose tokens decode with a prefix, which word-level ones do not).
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stop_strings, self.prompt_length = tokenizer, list(stop_strings), prompt_length
        self.window = (
            max(len(s) for s in self.stop_strings) + 8
        )  # tokens: each stop character needs at most one

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tail = input_ids[:, self.prompt_length :][:, -self.window :]  # (batch, <= window)
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    batch_size: int,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    add_special_tokens: bool = True,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (the generated text only, cut at the first stop string), in input order.

    Each sequence stops at EOS or at a stop string (:class:`StopOnStrings`); a batch ends when all its
    sequences have. Prompts are batched by length (less left padding) and left-padded. Pass a merged model
    (:func:`merged_for_inference`) for speed. ``add_special_tokens=False`` for prompts that already hold them
    (chat-templated prompts).
    """
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: dict[int, str] = {}
    stops = [s for s in stop_strings if s]
    try:
        for start in tqdm(
            range(0, len(prompts), batch_size), desc="generating", unit="batch", disable=not progress
        ):
            index = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in index],
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList(
                    [StopOnStrings(tokenizer, stops, batch["input_ids"].shape[1])] if stops else []
                ),
            )  # (batch, prompt + new)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            completions.update((i, cut_at_stop(t, stops)) for i, t in zip(index, texts))
    finally:
        tokenizer.padding_side = padding_side
    return [completions[i] for i in range(len(prompts))]


#: Where a completion ends, per prompt style, besides EOS: a model that keeps writing after its answer starts a new
#: problem ("Question:" with the paper's prompt, "### Instruction" with alpaca's).
STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "paper": ("Question:",),
    "alpaca": ("### Instruction", "Below is an instruction"),
    "chat": (),
}


def report_path(output: str | None, model: str, name: str) -> Path:
    """Where a report goes: ``output``, else ``name`` inside the model's folder, else in the working directory."""
    if output:
        return Path(output)
    return Path(model) / name if Path(model).is_dir() else Path(name)


def evaluate(cfg: RunConfig) -> dict[str, Any]:
    """Score ``cfg.eval.model`` on ``cfg.eval.task``; returns (and writes) the report."""
    e = cfg.eval
    if e.path is None:
        raise ConfigError(
            "eval.path is required: set it to a local .json/.jsonl test file or a hub dataset id"
        )
    model_path = e.model or cfg.training.output_dir
    task = TASKS[e.task]
    comparison = e.comparison or task.default_comparison
    if comparison not in task.comparisons:
        raise ConfigError(
            f"--eval.comparison={comparison} is not a comparison of task {e.task}; "
            f"choose from {', '.join(task.comparisons)}"
        )
    style = e.prompt or cfg.data.prompt
    records = load_records(e.path, e.name, e.split)
    shots: list[dict[str, Any]] = []
    if e.k_shot:
        if e.shots_path:
            shots = load_records(e.shots_path, max_samples=e.k_shot)
        else:
            shots, records = records[: e.k_shot], records[e.k_shot :]
    if e.max_samples is not None:
        records = records[: e.max_samples]

    started = time.time()
    model, tokenizer = load_model(model_path, e.base, cfg.model.dtype, cfg.model.trust_remote_code)
    model = merged_for_inference(model)
    fmt = detect_format(records[0])
    add_shots = few_shot_prefix(shots, fmt, style, tokenizer)
    prompts = [add_shots(make_prompt(r, fmt, style, tokenizer)) for r in records]
    generating = time.time()
    completions = generate(
        model,
        tokenizer,
        prompts,
        e.batch_size,
        e.max_new_tokens,
        stop_strings=STOP_STRINGS[style],
        add_special_tokens=style != "chat",  # the chat template writes its own special tokens
    )
    generate_s = time.time() - generating

    examples: list[dict[str, Any]] = []
    for record, prompt, completion in zip(records, prompts, completions):
        prediction, reference, correct = task.score_all(completion, record)
        examples.append(
            {
                "prompt": prompt,
                "completion": completion,
                "prediction": prediction,
                "reference": reference,
                "correct": correct[comparison],
                "correct_by": correct,
            }
        )
    n_correct = sum(x["correct"] for x in examples)
    by = {name: sum(x["correct_by"][name] for x in examples) for name in task.comparisons}
    report = {
        "task": e.task,
        "model": model_path,
        "comparison": comparison,
        "accuracy": n_correct / max(len(examples), 1),
        "correct": n_correct,
        "accuracy_by": {name: n / max(len(examples), 1) for name, n in by.items()},
        "total": len(examples),
        "wall_s": round(time.time() - started, 2),
        "generate_s": round(generate_s, 2),
        "problems_per_s": round(len(examples) / max(generate_s, 1e-9), 4),
        "config": to_dict(cfg),
        "examples": examples,
    }
    output = report_path(e.output, model_path, f"eval-{e.task}.json")
    atomic_write_text(output, json.dumps(report, indent=2, ensure_ascii=False))
    others = "".join(
        f"; by {name}: {report['accuracy_by'][name]:.4f} ({by[name]}/{len(examples)})"
        for name in task.comparisons
        if name != comparison
    )
    print(
        f"{e.task}: accuracy {report['accuracy']:.4f} ({n_correct}/{len(examples)}, by {comparison}){others}, "
        f"{report['problems_per_s']:.3g} problems/s; report: {output}"
    )
    return report


def main(argv: list[str]) -> int:
    cfg = config_from_argv("eval", argv)
    if isinstance(cfg, int):
        return cfg
    evaluate(cfg)
    sys.stdout.flush()
    return 0
