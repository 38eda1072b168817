"""Ctrl-C an ``osora train`` run, then ``kill -9`` it at random moments and inside every file write and rename of a
checkpoint save and of the final save, restarting it each time with the same command: Ctrl-C leaves a complete
adapter, every restart resumes from the newest complete checkpoint, no incomplete checkpoint ever appears, and the
run ends with a complete adapter equal to the uninterrupted run's.

Each restart is a fresh process (~10-20 s on 2 shared cores), so the loop is ``slow``; the in-process cases of
``test_robust_train.py`` (a crash inside a save, a signal, exact resume) stay in the default suite.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from osora.app.checkpoints import checkpoint_step, incomplete_reason, newest_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "gsm8k-osora.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "gsm8k_tiny.jsonl"
MAX_STEPS = 6
RUN_TIMEOUT_S = 600
# Writes and renames of one checkpoint save (adapter, its config and README, tokenizer files, training_args.bin,
# optimizer, scheduler, RNG state, trainer_state.json, the rename) and of the final save (files, then renames);
# counted from the "save event" lines of a run that kills nothing (KILL_AT=...:999); a higher N hits a later save
CHECKPOINT_EVENTS = 10
FINAL_EVENTS = 11

# The child: osora train, optionally killing itself (SIGKILL) at the N-th file write or rename of a checkpoint save
# ("checkpoint:N") or of the final save ("final:N"), leaving a partial file as a kill mid-write does. Every file
# opened for writing (json files), every torch.save, every safetensors write and every os.replace counts (only the
# tokenizer.json that the Rust tokenizers library writes itself is not intercepted).
DRIVER = textwrap.dedent(
    """
    import builtins, os, signal, sys
    from pathlib import Path

    spec = os.environ.get("KILL_AT", "")
    if spec:
        import peft.peft_model, safetensors.torch, torch

        where, n = spec.split(":")
        marker, count = {"checkpoint": ".checkpoint-", "final": ".final.tmp"}[where], [0]
        real_open = builtins.open

        def hit(path, partial=True):
            if marker in str(path):
                count[0] += 1
                print(f"save event {count[0]}: {path}", file=sys.stderr, flush=True)
                if count[0] == int(n):
                    if partial:
                        with real_open(path, "wb") as f:
                            f.write(b"\\0" * 3)
                    os.kill(os.getpid(), signal.SIGKILL)

        def wrap(real, partial=True, position=1):
            def wrapped(*args, **kwargs):
                hit(args[position], partial)
                return real(*args, **kwargs)
            return wrapped

        def opened(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wxa"):
                hit(file)
            return real_open(file, mode, *args, **kwargs)

        builtins.open = opened
        torch.save = wrap(torch.save)  # its zip writer opens the file in C++
        safetensors.torch.save_file = wrap(safetensors.torch.save_file)
        peft.peft_model.safe_save_file = wrap(peft.peft_model.safe_save_file)
        os.replace = wrap(os.replace, partial=False, position=0)

    from osora.app.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def command(out: Path, driver: Path) -> list[str]:
    return [
        sys.executable,
        str(driver),
        "train",
        "--config",
        str(TINY),
        f"--training.output_dir={out}",
        f"--data.path={FIXTURE}",
        f"--training.max_steps={MAX_STEPS}",
        "--training.save_steps=1",
        "--training.save_total_limit=3",
        "--training.lr_scheduler_type=linear",
        "--training.resume_from_checkpoint=true",
    ]


def start(out: Path, driver: Path, kill_at: str = "") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "KILL_AT": kill_at, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command(out, driver), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def assert_consistent(out: Path) -> None:
    """No checkpoint-N folder is incomplete; a folder with adapter_config.json holds the adapter weights."""
    for folder in out.glob("checkpoint-*"):
        assert incomplete_reason(folder) is None, f"{folder}: {incomplete_reason(folder)}"
    if (out / "adapter_config.json").exists():
        load_file(out / "adapter_model.safetensors")


def resumed_from(output: str) -> str | None:
    for line in output.splitlines():
        if line.startswith("resuming from "):
            return line.removeprefix("resuming from ").split(" (")[0]
        if line.startswith("no complete checkpoint"):
            return ""
    return None


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_anywhere_then_restart_resumes_and_ends_with_the_uninterrupted_adapter(tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    straight = tmp_path / "straight"
    proc = start(straight, driver)
    assert proc.wait(RUN_TIMEOUT_S) == 0, proc.stdout.read() if proc.stdout else ""

    out = tmp_path / "crashy"
    # Ctrl-C after the second logged step: the step finishes, then a checkpoint and a complete adapter are saved
    proc = start(out, driver)
    assert proc.stdout is not None
    lines, steps = [], 0
    for line in proc.stdout:
        lines.append(line)
        steps += line.startswith("{'loss'")
        if steps == 2:
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stdout.readlines()
    output = "".join(lines)
    assert proc.wait(RUN_TIMEOUT_S) == 128 + signal.SIGINT, output[-3000:]
    assert "interrupted by SIGINT" in output and "Traceback" not in output, output[-3000:]
    assert_consistent(out)
    assert (out / "adapter_config.json").is_file() and newest_complete_checkpoint(out) is not None

    rng = random.Random(0)
    # (kill_at, random delay after the k-th logged step or None): each file of a checkpoint save, random moments,
    # then each file and rename of the final save
    plan: list[tuple[str, int | None]] = [(f"checkpoint:{n}", None) for n in range(1, CHECKPOINT_EVENTS + 1)]
    plan += [("", rng.randint(1, 3)) for _ in range(3)]
    plan += [(f"final:{n}", None) for n in range(1, FINAL_EVENTS + 1)]
    expected_resume: Path | None = None
    kills = 0
    for kill_at, after_steps in plan:
        newest_before = newest_complete_checkpoint(out)
        proc = start(out, driver, kill_at)
        lines: list[str] = []
        assert proc.stdout is not None
        if after_steps is not None:  # kill at a random moment after the k-th logged step of this process
            steps = 0
            for line in proc.stdout:
                lines.append(line)
                steps += line.startswith("{'loss'")
                if steps >= after_steps:
                    time.sleep(rng.uniform(0.0, 1.5))
                    proc.send_signal(signal.SIGKILL)
                    break
        lines += proc.stdout.readlines()
        code = proc.wait(RUN_TIMEOUT_S)
        output = "".join(lines)
        kills += code == -signal.SIGKILL
        # every restart says where it resumed from, and it is the newest complete checkpoint
        said = resumed_from(output)
        assert said is not None, output[-3000:]
        assert said == (str(newest_before) if newest_before else ""), output[-3000:]
        if expected_resume is not None:
            assert newest_before is not None and checkpoint_step(newest_before) >= checkpoint_step(
                expected_resume
            )
        assert code in (0, -signal.SIGKILL), output[-3000:]
        assert_consistent(out)
        expected_resume = newest_complete_checkpoint(out)
    assert kills >= len(plan) - 3, f"only {kills} of {len(plan)} runs were killed"

    proc = start(out, driver)
    output = proc.communicate(timeout=RUN_TIMEOUT_S)[0]
    assert proc.returncode == 0, output[-3000:]
    assert_consistent(out)
    assert not list(out.glob(".*.tmp*")), "stale staging folders are cleaned by the next run"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import osora  # noqa: F401

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out)
    assert model.peft_config["default"].peft_type == "OSORA"
    got, want = (
        load_file(out / "adapter_model.safetensors"),
        load_file(straight / "adapter_model.safetensors"),
    )
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
