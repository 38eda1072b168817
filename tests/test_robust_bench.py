"""``benchmarks/svd_init.py --quick`` (the README's smoke run) never overwrites the committed results."""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = [
    ROOT / "benchmarks" / "results" / "svd_init.json",
    ROOT / "benchmarks" / "results" / "svd_init.png",
    ROOT / "benchmarks" / "README_svd_init.md",
]


def _digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_quick_run_writes_to_a_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("svd_init_bench", ROOT / "benchmarks" / "svd_init.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = _digest(COMMITTED)
    bench.main(["--quick", "--no-minilm", "--shapes", "96x64", "--ranks", "4"])
    assert _digest(COMMITTED) == before
    written = tmp_path / "osora-bench-quick"
    assert {p.name for p in written.iterdir()} == {"svd_init.json", "svd_init.png", "README_svd_init.md"}
