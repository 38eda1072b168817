"""One record of where a benchmark result came from, in one JSON shape for every file in benchmarks/results.

Every result file is a JSON object that starts with the same keys::

    {
      "benchmark": "step_cost",                 # which runner wrote it
      "command": "python benchmarks/...",       # how to re-run it (None in files older than this record)
      "config": {...},                          # the runner's full configuration
      "provenance": {
        "git": {"commit": "...", "dirty": false},
        "python": "3.11.7", "platform": "Linux-...",
        "packages": {"osora": "0.1.0", "torch": "2.13.0+cpu", ...},
        "hardware": {"cpu": "AMD EPYC", "cores": 2, "torch_threads": 2, "gpu": null,
                     "load_average_start": [...], "load_average_end": [...]},
        "date_utc": "2026-12-01T20:00:00+00:00"
      },
      "wall_s": 697.6,                          # wall time of the whole run
      "peak_memory_bytes": 2291859456,          # peak CUDA allocation, or the process's peak resident set on CPU
      ...                                       # the benchmark's own results (runs, summary, rows, ...)
    }

Example:
    >>> record = BenchmarkRecord("demo", {"reps": 3}, command="python benchmarks/demo.py")
    >>> result = record.finish(rows=[1, 2, 3])
    >>> sorted(result)[:4]
    ['benchmark', 'command', 'config', 'peak_memory_bytes']
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

#: Packages recorded in every result (their versions, or None where not installed).
PACKAGES = ("osora", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy")

#: The keys every result file starts with, in this order.
RECORD_KEYS = ("benchmark", "command", "config", "provenance", "wall_s", "peak_memory_bytes")

_ROOT = Path(__file__).resolve().parents[3]  # the checkout (src/osora/app/provenance.py)


#: What the benchmarks themselves write (results, their tables and plots): a change there does not make the code
#: that measured them differ from its commit.
BENCHMARK_OUTPUTS = (":(exclude)benchmarks/results", ":(exclude,glob)benchmarks/README_*.md")


def git_state(root: Path = _ROOT) -> dict[str, Any]:
    """The commit checked out at ``root`` and whether the work tree differs from it outside
    :data:`BENCHMARK_OUTPUTS` (None outside git): a benchmark resumed from its own uncommitted results is clean."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".", *BENCHMARK_OUTPUTS) if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` and ``extra``; for a package imported from a source tree rather
    than installed (``PYTHONPATH=src``, as on a bare GPU machine), its module's ``__version__``."""
    versions: dict[str, str | None] = {}
    for name in (*PACKAGES, *extra):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            module = sys.modules.get(name.replace("-", "_"))
            versions[name] = getattr(module, "__version__", None)
    return versions


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """CPU, cores, torch threads, GPU, and the load average (other processes disturb timings)."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_start": list(os.getloadavg()),
    }


def provenance(extra_packages: Iterable[str] = (), root: Path = _ROOT) -> dict[str, Any]:
    """The ``provenance`` section of a result: git state, Python, platform, packages, hardware, date."""
    return {
        "git": git_state(root),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(extra_packages),
        "hardware": hardware(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# -- peak memory ------------------------------------------------------------------------------------------------


def reset_peak_memory(cuda: bool | None = None) -> None:
    """Start a new peak: CUDA's allocator peak, or on Linux the process's resident high-water mark (VmHWM).

    ``cuda``: measure the GPU (None: when one is present)."""
    if torch.cuda.is_available() if cuda is None else cuda:
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # writing 5 to clear_refs resets VmHWM (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(cuda: bool | None = None) -> int:
    """Peak since :func:`reset_peak_memory` (or process start): CUDA allocated bytes, or peak RSS on CPU."""
    if torch.cuda.is_available() if cuda is None else cuda:
        return int(torch.cuda.max_memory_allocated())
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(ln for ln in status if ln.startswith("VmHWM:")).split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the record -------------------------------------------------------------------------------------------------


class BenchmarkRecord:
    """A benchmark run from start to its result file: provenance taken at the start, time and peak at the end.

    Args:
        benchmark: The runner's name (``"glue"``, ``"step_cost"``, ...).
        config: Its full configuration, as plain data.
        command: The command line that re-runs it.
        extra_packages: Packages to record beside :data:`PACKAGES`.

    Example:
        >>> record = BenchmarkRecord("svd_init", {"ranks": [8]})
        >>> record.finish(devices={})["benchmark"]
        'svd_init'
    """

    def __init__(
        self,
        benchmark: str,
        config: dict[str, Any],
        command: str | None = None,
        extra_packages: Iterable[str] = (),
    ) -> None:
        self.benchmark = benchmark
        self.config = config
        self.command = command
        self.provenance = provenance(extra_packages)
        self.start = time.perf_counter()

    def finish(self, peak_memory: int | None = None, **results: Any) -> dict[str, Any]:
        """The result: the record's keys, then ``results``. ``peak_memory`` overrides this process's peak
        (for runners that measure in worker processes). May be called again as results grow."""
        prov = {**self.provenance, "hardware": {**self.provenance["hardware"]}}
        prov["hardware"]["load_average_end"] = list(os.getloadavg())
        return {
            "benchmark": self.benchmark,
            "command": self.command,
            "config": self.config,
            "provenance": prov,
            "wall_s": time.perf_counter() - self.start,
            "peak_memory_bytes": peak_memory_bytes() if peak_memory is None else peak_memory,
            **results,
        }


def shown_path(path: Path, root: Path = _ROOT) -> str:
    """``path`` as a table names its source: relative to the checkout when inside it, else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root) if resolved.is_relative_to(root) else path)


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as indented JSON, atomically (a temporary sibling, then ``os.replace``)."""
    missing = [k for k in RECORD_KEYS if k not in result]
    if missing:
        raise ValueError(f"a benchmark result needs the keys {RECORD_KEYS}; missing {missing}")
    from .checkpoints import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
