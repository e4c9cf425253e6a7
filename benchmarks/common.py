"""Shared by the benchmarks: machine description, table printing, JSON results."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "avx512_vnni"}),
        "python": platform.python_version(),
        "commit": _commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set inside the block (for the processes started there too);
    the previous values, or their absence, come back afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def temporary_home(prefix: str, parent: str | None = None) -> Iterator[Path]:
    """A new folder as CODELM_HOME inside the block (kernel rankings calibrated afresh, no
    weight cache kept), removed afterwards; the previous CODELM_HOME comes back."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        with environment({"CODELM_HOME": str(home)}):
            yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def in_fresh_process(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a new Python process (spawned): its peak RSS is its own, as a
    daemon loading one model has. fn and its arguments must be importable / picklable."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux; NaN elsewhere)."""
    from codelm.daemon.runtime import resident_mb

    resident = resident_mb()
    return float("nan") if resident is None else resident


def peak_rss_mb(pid: int | str = "self") -> float:
    """The most resident memory process `pid` has had so far, in MB; NaN where /proc does not
    say. VmHWM, not getrusage's ru_maxrss: a spawned process's ru_maxrss starts at its
    parent's resident size (Linux keeps the high-water mark across exec)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
    except (OSError, StopIteration, IndexError):
        return float("nan")
    return int(kib) * 1024 / 1e6


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def stderr(message: str) -> None:
    """A progress line, apart from the table on stdout."""
    print(message, file=sys.stderr, flush=True)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def print_kernels(rows: list[dict[str, Any]]) -> None:
    """Under a table: the kernels each codelm row ran and how its decode step ran."""
    for row in rows:
        if row.get("kernels"):
            step = f"; decode step {row['decode_step']}" if row.get("decode_step") else ""
            print(f"  {row['system']} {row['quant']}: {row['kernels']}{step}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value and abs(value) < 1e-2:
            return f"{value:.2e}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def write_json(name: str, payload: dict[str, Any], path: str | None = None) -> Path:
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return out
