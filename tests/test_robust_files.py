"""Temporary files and folders that killed saves and exports left behind are removed by the next write;
those of a write still in progress are kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from osora.checkpoint import atomic_directory, atomic_save_file


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_dir = tmp_path / f".export.tmp-{dead_pid}-abc"
        (stale_dir / "base").mkdir(parents=True)
        (stale_dir / "base" / "model.safetensors").write_bytes(b"\0" * 1024)
        old_style = tmp_path / ".export.tmp-x1y2z3"  # the name an earlier osora gave it (no pid)
        old_style.mkdir()
        in_progress = tmp_path / f".export.tmp-{live.pid}-def"
        in_progress.mkdir()
        with atomic_directory(tmp_path / "export") as tmp:
            (tmp / "a.txt").write_text("a")
        assert (tmp_path / "export" / "a.txt").read_text() == "a"
        assert not stale_dir.exists() and not old_style.exists()
        assert in_progress.is_dir()

        stale_file = tmp_path / f".w.safetensors.tmp-{dead_pid}-q"
        stale_file.write_bytes(b"partial")
        atomic_save_file({"x": torch.ones(2)}, tmp_path / "w.safetensors")
        assert not stale_file.exists() and (tmp_path / "w.safetensors").is_file()
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", in_progress.name, "w.safetensors"])


def test_an_atomically_written_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        atomic_save_file({"x": torch.ones(2)}, tmp_path / "w.safetensors")
        (tmp_path / "plain.txt").write_text("x")
        # not mkstemp's private 0600: the same mode as a file written the usual way beside it
        assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_processes_converting_the_same_gguf_at_once_convert_it_once(tmp_path: Path) -> None:
    """Two workers of one benchmark asked for the packaged GGUF model in a fresh cache at the same moment; the
    second one's clean-up deleted the first one's half-written folder and both runs failed. Now they take turns:
    one converts, the other waits and uses the result."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 4096)
    log = tmp_path / "conversions.log"
    worker = f"""
import os, sys, time
from pathlib import Path
import osora.app.models as models

def slow_conversion(path, target):  # stands in for the minute-long dequantisation, with its temporary folder
    with open({str(log)!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    tmp = target.parent / f".{{target.name}}.tmp-{{os.getpid()}}"
    tmp.mkdir()
    time.sleep(1.5)
    (tmp / "config.json").write_text("{{}}")
    os.replace(tmp, target)

models._convert_gguf = slow_conversion
print(models.gguf_to_folder({str(gguf)!r}))
"""
    env = {**os.environ, "OSORA_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    folders = {out.strip() for out, _ in results}
    assert len(folders) == 1 and (Path(folders.pop()) / "config.json").is_file()
    assert len(log.read_text().split()) == 1  # converted once
    assert not list((tmp_path / "cache" / "models").glob(".*.tmp-*"))
