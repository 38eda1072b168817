"""Every benchmark result file has one shape: the record of osora.app.provenance, then the benchmark's results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from osora.app.provenance import RECORD_KEYS, BenchmarkRecord, write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
PROVENANCE_KEYS = {"git", "python", "platform", "packages", "hardware", "date_utc"}


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_committed_results_share_one_shape(path: Path) -> None:
    result = json.loads(path.read_text())
    assert tuple(result)[: len(RECORD_KEYS)] == RECORD_KEYS
    prov = result["provenance"]
    assert set(prov) == PROVENANCE_KEYS
    assert set(prov["git"]) == {"commit", "dirty"} and len(prov["git"]["commit"]) == 40
    assert {"cpu", "cores", "torch_threads", "gpu"} <= set(prov["hardware"])
    assert prov["packages"]["torch"] and prov["packages"]["osora"]
    assert result["wall_s"] > 0 and result["peak_memory_bytes"] > 0


def test_record_measures_and_writes_atomically(tmp_path: Path) -> None:
    record = BenchmarkRecord(
        "unit", {"reps": 2}, command="python benchmarks/unit.py", extra_packages=["pyyaml"]
    )
    result = record.finish(rows=[1, 2])
    assert tuple(result) == (*RECORD_KEYS, "rows")
    assert result["config"] == {"reps": 2} and result["rows"] == [1, 2]
    assert result["provenance"]["git"]["commit"] is not None  # the test runs inside the checkout
    assert result["provenance"]["packages"]["pyyaml"] is not None
    assert result["peak_memory_bytes"] > 0 and result["wall_s"] >= 0
    assert len(result["provenance"]["hardware"]["load_average_end"]) == 3
    path = tmp_path / "out" / "unit.json"
    write_result(path, result)
    assert json.loads(path.read_text()) == result
    assert [p.name for p in path.parent.iterdir()] == ["unit.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="missing"):
        write_result(path, {"benchmark": "unit"})


def test_git_state_is_dirty_for_code_changes_not_for_benchmark_outputs(tmp_path: Path) -> None:
    import subprocess

    from osora.app.provenance import git_state

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    files = ["benchmarks/results/x.json", "benchmarks/README_x.md", "benchmarks/x.py"]
    for name in files:
        (tmp_path / name).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("1\n")  # a resumed benchmark's own output
    (tmp_path / "benchmarks" / "results" / "x.png").write_text("new\n")
    (tmp_path / "benchmarks" / "README_x.md").write_text("1\n")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "benchmarks" / "x.py").write_text("1\n")  # the code that measures
    assert git_state(tmp_path)["dirty"] is True


def test_versions_of_a_source_tree_come_from_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine where osora runs from ``PYTHONPATH=src`` (not installed), the record still names its
    version; a package neither installed nor imported stays None."""
    from importlib import metadata

    import osora
    from osora.app import provenance

    real = metadata.version

    def not_installed(name: str) -> str:
        if name in {"osora", "no-such-package"}:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(provenance.metadata, "version", not_installed)
    versions = provenance.package_versions(["no-such-package"])
    assert versions["osora"] == osora.__version__
    assert versions["no-such-package"] is None
    assert versions["torch"] == real("torch")
