"""``benchmarks/svd_init.py --quick`` (the README's smoke run) never overwrites the committed results."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
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


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_step_cost_quick_writes_under_tmpdir_and_a_full_run_to_the_committed_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _load("step_cost")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    quick = bench.parse_args(["--quick"])
    assert quick.out == tmp_path / "osora-bench-quick" / "step_cost.json" and quick.markdown is None
    full = bench.parse_args([])
    assert full.out == ROOT / "benchmarks" / "results" / "step_cost.json"
    assert full.markdown == ROOT / "benchmarks" / "README_step_cost.md"


def test_glue_quick_writes_under_tmpdir_and_a_full_run_to_the_committed_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _load("glue")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    quick = bench.parse_args(["--data-dir", "sst2", "--model", "m", "--quick"])
    assert Path(quick.out) == tmp_path / "osora-bench-quick"
    assert Path(quick.readme) == tmp_path / "osora-bench-quick" / "README_glue.md"
    assert (quick.train_size, quick.seeds, quick.grid_points) == (64, [0], 1)
    full = bench.parse_args(["--data-dir", "sst2", "--model", "m"])
    assert Path(full.out) == ROOT / "benchmarks" / "results"
    assert Path(full.readme) == ROOT / "benchmarks" / "README_glue.md"
    elsewhere = bench.parse_args(["--data-dir", "sst2", "--model", "m", "--out", str(tmp_path / "x")])
    assert Path(elsewhere.readme) == tmp_path / "x" / "README_glue.md"


def test_init_cost_names_its_results_by_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling svd_init
    bench = _load("init_cost")
    assert bench.result_name("cpu", "float32") == "init_cost"  # the committed CPU table keeps its name
    assert bench.result_name("cuda", "bfloat16") == "init_cost_cuda_bfloat16"
    entry = {"time_s": {"median": 1.5, "min": 1.25}, "load_1min": [0.5], "warnings": 0}
    result = {
        "provenance": {
            "hardware": {"cpu": "some cpu", "gpu": "NVIDIA H200", "torch_threads": 16, "cores": 16},
            "git": {"commit": "0123456789", "dirty": False},
        },
        "config": {"reps": 1, "device": "cuda", "dtype": "bfloat16", "layers_7b": 0},
        "models": {"smollm2": {"label": "SmolLM2", "by_r": {"8": {"lora": entry, "osora": entry}}}},
    }
    table = bench.markdown(result, ROOT / "benchmarks" / "results" / "init_cost_cuda_bfloat16.json")
    assert table.startswith("NVIDIA H200, bfloat16 weights; commit 01234567;")
    assert "from `benchmarks/results/init_cost_cuda_bfloat16.json`" in table and "| SmolLM2 | 8 |" in table
    elsewhere = bench.markdown(
        result, Path("/tmp/gpu-out/init_cost_smollm2.json")
    )  # the file it was read from
    assert "from `/tmp/gpu-out/init_cost_smollm2.json`" in elsewhere


def test_init_cost_background_load_stops_with_its_block_and_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("init_cost")
    with pytest.raises(KeyboardInterrupt), bench.busy_processes(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)  # running beside the block
        raise KeyboardInterrupt
    assert all(p.returncode is not None for p in procs)  # gone, even after an interrupted run
    entry = {"time_s": {"median": 1.0, "min": 1.0}, "load_1min": [4.1], "warnings": 0}
    result = {
        "provenance": {
            "hardware": {"cpu": "some cpu", "torch_threads": 2, "cores": 2},
            "git": {"commit": "0123456789", "dirty": False},
        },
        "config": {"reps": 1, "layers_7b": 0, "background_load": 2},
        "models": {"smollm2": {"label": "SmolLM2", "by_r": {"8": {"lora": entry, "osora": entry}}}},
    }
    assert "beside 2 busy processes" in bench.markdown(result, Path("/tmp/x.json"))
    result["config"]["background_load"] = 0
    assert "busy" not in bench.markdown(result, Path("/tmp/x.json"))


def test_svd_profile_writes_a_self_describing_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling svd_init
    bench = _load("svd_profile")
    out = tmp_path / "profile.txt"
    bench.main(["--shape", "96x64", "--r", "4", "--reps", "1", "--out", str(out)])
    report = out.read_text()
    assert report.startswith("osora.svd profile: 1 x 96x64 float32, r=4, method=randomized")
    assert "torch operations' CPU self time" in report and "aten::" in report
    assert "command: python benchmarks/svd_profile.py --shape 96x64 --r 4" in report
    with pytest.raises(SystemExit):
        bench.main(["--shape", "96x64", "--r", "65"])  # r beyond the smaller side: a usage error


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's reaper may be slow, or absent in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_init_cost_background_load_stops_when_the_benchmark_is_killed() -> None:
    import signal
    import subprocess
    import sys
    import time

    script = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import init_cost, time\n"
        "with init_cost.busy_processes(1) as procs:\n"
        "    print(procs[0].pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert bench.stdout is not None
    child = int(bench.stdout.readline())
    assert _running(child)
    bench.send_signal(signal.SIGKILL)  # no finally block runs
    bench.wait()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child), "the busy loop outlived the killed benchmark"
