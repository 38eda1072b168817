"""Training-step cost of OSoRA against PEFT LoRA and VeRA: time and peak memory per forward + backward.

On a Llama-style model of ~100M parameters with random weights (every linear of every block adapted), measures
for the base model alone (all weights frozen, embedding output requiring grad) and for each method and rank:

* step time: forward + backward of one batch (mean ± std over ``--reps`` steps after ``--warmup``);
* peak memory of the step: process peak RSS on CPU (``VmHWM``, reset after warm-up), or
  ``torch.cuda.max_memory_allocated`` on GPU; "adds" is that peak minus the base model's;
* bytes saved for backward (deterministic, counted once per storage with ``saved_tensors_hooks``);
* trainable parameters, and the bytes of those parameters plus their AdamW state after one optimizer step;
* inference: a no-grad forward, unmerged and merged.

Each configuration runs in a fresh subprocess so that peaks do not mix. On CPU the workers run with a fixed glibc
mmap threshold, so freed tensors go back to the OS and RSS follows live memory instead of the allocator's cache.

Usage::

    python benchmarks/step_cost.py                        # full run, ~10 min on 2 CPU cores
    python benchmarks/step_cost.py --quick                # smoke test: 2 blocks, r=32, 1 rep, to $TMPDIR
    python benchmarks/step_cost.py --ranks 32 --reps 5
    python benchmarks/step_cost.py --markdown-only        # rewrite the README table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from osora.app.provenance import (
    BenchmarkRecord,
    peak_memory_bytes,
    reset_peak_memory,
    shown_path,
    write_result,
)

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("osora", "lora", "vera")


def opt(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Setup:
    """What one run measures; each field is a CLI flag whose help is its metadata."""

    ranks: list[int] = opt([8, 32, 128], "adapter ranks")
    methods: list[str] = opt(list(METHODS), f"adapters beside the base model: {', '.join(METHODS)}")
    reps: int = opt(3, "timed steps per configuration")
    warmup: int = opt(1, "untimed steps before them (the first also counts the bytes saved for backward)")
    infer_reps: int = opt(2, "timed no-grad forwards, unmerged and merged")
    batch: int = opt(4, "sequences per step")
    seq: int = opt(512, "tokens per sequence")
    hidden: int = opt(768, "model width")
    intermediate: int = opt(2048, "MLP width")
    layers: int = opt(12, "transformer blocks")
    heads: int = opt(12, "attention heads")
    vocab: int = opt(16384, "vocabulary size (embeddings tied)")
    dtype: str = opt("float32", "model dtype; the adapters' trained vectors stay float32, as peft casts them")
    device: str = opt("auto", "cpu, cuda or auto")
    threads: int = opt(0, "torch CPU threads; 0: torch's default")
    seed: int = opt(0, "seed of the random weights")


def build_model(setup: Setup, method: str, r: int) -> Any:
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from osora.app.methods import peft_config

    torch.manual_seed(setup.seed)
    cfg = LlamaConfig(
        hidden_size=setup.hidden, intermediate_size=setup.intermediate, num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads, num_key_value_heads=setup.heads, vocab_size=setup.vocab,
        max_position_embeddings=setup.seq, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(getattr(torch, setup.dtype))
    model.requires_grad_(False)
    if method == "base":
        return model
    extra = {"lora_alpha": r} if method == "lora" else {}
    return get_peft_model(model, peft_config(method, r=r, target_modules=list(TARGETS), **extra))


def measure(setup: Setup, method: str, r: int) -> dict[str, Any]:
    import torch

    if setup.threads:
        torch.set_num_threads(setup.threads)
    cuda = setup.device == "cuda"
    dev = torch.device(setup.device)
    t0 = time.perf_counter()
    model = build_model(setup, method, r).to(dev)
    build_s = time.perf_counter() - t0
    ids = torch.randint(
        0, setup.vocab, (setup.batch, setup.seq), generator=torch.Generator().manual_seed(1)
    ).to(dev)
    embed = model.get_input_embeddings()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> None:
        for p in trainable:
            p.grad = None
        x = (
            embed(ids).detach().requires_grad_()
        )  # (batch, seq, hidden): the backward runs down to the embedding
        model(inputs_embeds=x, labels=ids).loss.backward()

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    saved_bytes = sum(storages.values())
    state_bytes = 0
    if trainable:
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        opt.step()
        state_bytes = sum(
            t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()
        )
        state_bytes += sum(p.nbytes for p in trainable)
    for _ in range(max(setup.warmup - 1, 0)):
        step()
    sync()
    reset_peak_memory(cuda)
    times = []
    for _ in range(setup.reps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    peak = peak_memory_bytes(cuda)

    def infer() -> list[float]:
        out = []
        with torch.inference_mode():
            for _ in range(setup.infer_reps + 1):  # the first forward is a warm-up
                t = time.perf_counter()
                model(input_ids=ids)
                sync()
                out.append(time.perf_counter() - t)
        return out[1:]

    model.eval()
    infer_unmerged = infer()
    infer_merged = None
    if method != "base":
        model.merge_adapter()
        infer_merged = infer()
    return {
        "method": method,
        "r": r,
        "build_s": build_s,
        "step_s": times,
        "peak_bytes": peak,
        "saved_for_backward_bytes": saved_bytes,
        "trainable_params": sum(p.numel() for p in trainable),
        "params_plus_adamw_state_bytes": state_bytes,
        "adapter_buffer_bytes": sum(
            b.nbytes for n, b in model.named_buffers() if any(k in n for k in METHODS)
        ),
        "total_params": sum(p.numel() for p in model.parameters()),
        "infer_unmerged_s": infer_unmerged,
        "infer_merged_s": infer_merged,
    }


def run_worker(setup: Setup, method: str, r: int) -> dict[str, Any]:
    # A fixed mmap threshold turns off glibc's dynamic one: tensors above 1 MiB are unmapped when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    cmd = [sys.executable, __file__, "--worker", json.dumps([asdict(setup), method, r])]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means, stds and the ratios against the base model and against LoRA at the same rank."""
    base = next(x for x in rows if x["method"] == "base")
    lora = {x["r"]: x for x in rows if x["method"] == "lora"}
    out = []
    for x in rows:
        s = {
            "method": x["method"],
            "r": x["r"],
            "step_s_mean": mean(x["step_s"]),
            "step_s_std": stdev(x["step_s"]) if len(x["step_s"]) > 1 else 0.0,
            "peak_mb": x["peak_bytes"] / 2**20,
            "adds_mb": (x["peak_bytes"] - base["peak_bytes"]) / 2**20,
            "saved_adds_mb": (x["saved_for_backward_bytes"] - base["saved_for_backward_bytes"]) / 2**20,
            "trainable_params": x["trainable_params"],
            "state_mb": x["params_plus_adamw_state_bytes"] / 2**20,
            "infer_unmerged_s": mean(x["infer_unmerged_s"]),
            "infer_merged_s": mean(x["infer_merged_s"]) if x["infer_merged_s"] else None,
        }
        ref = lora.get(x["r"])
        if ref is not None and x["method"] != "base":
            s["step_vs_lora"] = s["step_s_mean"] / mean(ref["step_s"])
            ref_adds = ref["peak_bytes"] - base["peak_bytes"]
            s["adds_vs_lora"] = (x["peak_bytes"] - base["peak_bytes"]) / ref_adds if ref_adds > 0 else None
            s["state_vs_lora"] = x["params_plus_adamw_state_bytes"] / ref["params_plus_adamw_state_bytes"]
            s["infer_vs_lora"] = s["infer_unmerged_s"] / mean(ref["infer_unmerged_s"])
        out.append(s)
    return out


def markdown(result: dict[str, Any], source: Path) -> str:
    """The table of ``result``, read from (or written to) ``source``."""
    st, prov = result["config"], result["provenance"]
    dev = (
        prov["hardware"].get("gpu")
        or f"{prov['hardware']['cpu']}, {prov['hardware']['torch_threads']} threads"
    )
    lines = [
        f"Llama-style model, {result['model_params'] / 1e6:.0f}M parameters, random weights, {st['dtype']}; "
        f"batch {st['batch']} × sequence {st['seq']}; targets {', '.join(TARGETS)}; {dev}; "
        f"{st['reps']} timed steps per row; osora {prov['packages']['osora']} at {prov['git']['commit'][:8]}"
        f"{' (dirty)' if prov['git']['dirty'] else ''}. Generated by `benchmarks/step_cost.py` from "
        f"`{shown_path(source)}`.",
        "",
        "| method | r | step (s) | step × LoRA | peak (MiB) | adds (MiB) | adds × LoRA | saved for bwd, adds (MiB) "
        "| trainable | params + AdamW (MiB) | × LoRA | infer unmerged (s) | × LoRA | merged (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for s in result["summary"]:
        lines.append(
            f"| {s['method']} | {s['r'] or '–'} | {s['step_s_mean']:.2f} ± {s['step_s_std']:.2f} "
            f"| {f(s.get('step_vs_lora'), '.2f')} | {s['peak_mb']:.0f} | {s['adds_mb']:.0f} "
            f"| {f(s.get('adds_vs_lora'), '.3f')} | {s['saved_adds_mb']:.0f} | {s['trainable_params']:,} "
            f"| {s['state_mb']:.2f} | {f(s.get('state_vs_lora'), '.4f')} | {s['infer_unmerged_s']:.2f} "
            f"| {f(s.get('infer_vs_lora'), '.2f')} | {f(s['infer_merged_s'], '.2f')} |"
        )
    lines += [
        "",
        "*step*: forward + backward, mean ± std. *peak*: "
        + ("`torch.cuda.max_memory_allocated`" if prov["hardware"].get("gpu") else "process peak RSS (VmHWM)")
        + " during the timed steps; *adds*: peak − the base model's peak (all weights frozen, embedding output "
        "requiring grad). *saved for bwd*: bytes autograd keeps for backward, minus the base model's. "
        "*params + AdamW*: trainable parameters and their AdamW moments. *infer*: one no-grad forward.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``--out``/``--markdown`` resolved (a ``--quick`` run writes under $TMPDIR)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Setup):
        default = getattr(Setup(), f.name)
        kind = type(default[0]) if isinstance(default, list) else type(default)
        nargs = "+" if isinstance(default, list) else None
        flag = f"--{f.name.replace('_', '-')}"
        p.add_argument(flag, type=kind, nargs=nargs, help=f"{f.metadata['help']} (default: {default})")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 blocks, r=32, 1 rep, no warm-up step")
    p.add_argument(
        "--out",
        type=Path,
        help="result JSON (default: the committed results/step_cost.json; --quick: $TMPDIR)",
    )
    p.add_argument("--markdown", type=Path, help="table (default README_step_cost.md; none with --quick)")
    p.add_argument("--markdown-only", action="store_true", help="only regenerate --markdown from --out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # a smoke run never writes into the committed results (CI checks that the README matches them)
    quick_dir = Path(tempfile.gettempdir()) / "osora-bench-quick"
    args.out = args.out or (
        quick_dir / "step_cost.json" if args.quick else HERE / "results" / "step_cost.json"
    )
    args.markdown = args.markdown or (None if args.quick else HERE / "README_step_cost.md")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        st, method, r = json.loads(args.worker)
        print(json.dumps(measure(Setup(**st), method, r)))
        return
    if args.markdown_only:
        args.markdown.write_text(markdown(json.loads(args.out.read_text()), args.out))
        return
    setup = Setup(
        **({"layers": 2, "ranks": [32], "reps": 1, "warmup": 1, "infer_reps": 1} if args.quick else {})
    )
    for name in asdict(setup):
        if getattr(args, name) is not None:
            setattr(setup, name, getattr(args, name))
    if setup.device == "auto":
        import torch

        setup.device = "cuda" if torch.cuda.is_available() else "cpu"
    command = " ".join(["python", "benchmarks/step_cost.py", *sys.argv[1:]])
    record = BenchmarkRecord("step_cost", asdict(setup), command=command)
    configs = [("base", 0)] + [(m, r) for r in setup.ranks for m in setup.methods]
    rows = []
    for method, r in configs:
        rows.append(run_worker(setup, method, r))
        x = rows[-1]
        print(
            f"{method:6s} r={r:<4d} step {mean(x['step_s']):6.2f} s  peak {x['peak_bytes'] / 2**20:7.0f} MiB  "
            f"trainable {x['trainable_params']:>10,}  infer {mean(x['infer_unmerged_s']):.2f} s",
            flush=True,
        )
    result = record.finish(
        peak_memory=max(x["peak_bytes"] for x in rows),  # the largest of the workers' peaks
        model_params=rows[0]["total_params"],
        rows=rows,
        summary=summarize(rows),
    )
    write_result(args.out, result)
    if args.markdown:
        args.markdown.write_text(markdown(result, args.out))
    print(markdown(result, args.out))


if __name__ == "__main__":
    main()
