"""A 2-process CPU (gloo) torchrun run of 2 steps ends with identical adapters on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "gsm8k-osora-2proc.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "gsm8k_tiny.jsonl"

# Each rank trains through the same entry point as `osora train`, then writes the adapter it holds.
RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch.distributed as dist
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from osora.app.config import load_config
    from osora.app.train import run

    out = sys.argv[1]
    trainer = run(load_config(sys.argv[2], sys.argv[3:]))
    assert dist.is_initialized() and dist.get_world_size() == 2, "not a 2-process run"
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, os.path.join(out, f"rank{dist.get_rank()}.safetensors"))
    trainer.accelerator.end_training()  # as `osora train` ends
    """
)


@pytest.mark.integration
def test_two_process_gloo_run_has_identical_adapters(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",  # a free port: a fixed one fails while another test run (or helper) holds it
        str(script),
        str(tmp_path),
        str(CONFIG),
        f"--training.output_dir={tmp_path / 'run'}",
        f"--data.path={FIXTURE}",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "terminate called without an active exception" in result.stderr:
        # Known, not yet explained: now and then (2 of 4 fresh-clone runs, 1 in ~90 repeated runs) a rank aborts
        # in C++ teardown at interpreter exit, after its work is done. Retried once, on that message only.
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert saved.keys() == rank0.keys()
    assert "'epoch'" in result.stdout or "loss" in result.stdout
