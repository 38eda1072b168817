"""``osora eval CONFIG.yaml [section.key=value ...]``: score a base model, an adapter dir or a merged model.

Prompts are built like the training prompts (``eval.prompt`` or ``data.prompt``), optionally preceded by
``eval.k_shot`` solved examples, generated greedily in left-padded batches, and scored by the task's pure scorer
(:mod:`osora.app.scoring`). The JSON report holds the config, the accuracy and every example's prompt,
completion, extracted answer, reference and verdict.

Example:
    osora eval configs/tiny/gsm8k-osora.yaml eval.model=runs/tiny-gsm8k-osora
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoints import check_not_partial_adapter
from .config import ConfigError, RunConfig, config_from_argv, to_dict
from .data import detect_format, few_shot_prefix, load_records, make_prompt
from .models import resolve
from .scoring import TASKS

ADAPTER_CONFIG = "adapter_config.json"


def load_model(
    path: str, base: str | None = None, dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) for a model dir / hub id, or for an adapter dir on top of its base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any

    torch_dtype: Any = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        dtype, "auto"
    )
    adapter_config = Path(path) / ADAPTER_CONFIG
    if adapter_config.is_file():
        from peft import PeftModel

        import osora  # noqa: F401  (registers OSoRA with peft)

        base = base or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}: adapter_config.json names no base model; pass eval.base")
        base = resolve(base).location  # paths are never sent to the Hub
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        model = PeftModel.from_pretrained(model, path)
        has_tokenizer = (Path(path) / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(path if has_tokenizer else base)
    else:
        check_not_partial_adapter(Path(path))
        path = resolve(path).location  # paths are never sent to the Hub
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[str], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy completions of ``prompts`` (the generated text only), in left-padded batches."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    completions: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch"):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # (batch, prompt + new)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return completions


def _cut(completion: str, style: str) -> str:
    # a base model keeps writing after its answer; with the paper prompt a new "Question:" starts a new problem
    return completion.split("Question:", 1)[0] if style == "paper" else completion


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
            f"eval.comparison={comparison} is not a comparison of task {e.task}; "
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
    fmt = detect_format(records[0])
    add_shots = few_shot_prefix(shots, fmt, style, tokenizer)
    prompts = [add_shots(make_prompt(r, fmt, style, tokenizer)) for r in records]
    completions = generate(model, tokenizer, prompts, e.batch_size, e.max_new_tokens)

    examples: list[dict[str, Any]] = []
    for record, prompt, completion in zip(records, prompts, completions):
        prediction, reference, correct = task.score_all(_cut(completion, style), record)
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
        "config": to_dict(cfg),
        "examples": examples,
    }
    output = (
        Path(e.output)
        if e.output
        else (
            Path(model_path) / f"eval-{e.task}.json"
            if Path(model_path).is_dir()
            else Path(f"eval-{e.task}.json")
        )
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    others = "".join(
        f"; by {name}: {report['accuracy_by'][name]:.4f} ({by[name]}/{len(examples)})"
        for name in task.comparisons
        if name != comparison
    )
    print(
        f"{e.task}: accuracy {report['accuracy']:.4f} ({n_correct}/{len(examples)}, by {comparison}){others}; "
        f"report: {output}"
    )
    return report


def main(argv: list[str]) -> int:
    cfg = config_from_argv("eval", "[CONFIG.yaml] [section.key=value ...]", argv)
    if isinstance(cfg, int):
        return cfg
    evaluate(cfg)
    sys.stdout.flush()
    return 0
