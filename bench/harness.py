"""Benchmark harness: timing (median and quantiles), peak memory, and the environment of a row.

On CUDA, ``triton.testing.do_bench`` when triton is importable (it flushes L2 and synchronizes),
else CUDA events; on CPU, wall-clock ``perf_counter`` around each call.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

QUANTILES = (0.2, 0.5, 0.8)


def environment(device: torch.device) -> dict:
    """Device name, library versions and git commit: recorded with every row."""
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench():
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10,
            events: bool = False) -> dict:
    """Times ``fn`` -> {"ms_median", "ms_q20", "ms_q80", "peak_mem_mb"} (peak memory on CUDA only).

    ``events``: on CUDA, time exactly ``reps`` calls after ``warmup`` with CUDA events instead of
    ``do_bench`` (whole training steps: long enough that its 100 ms budget would time one or two)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        do_bench = None if events else _do_bench()
        if do_bench is not None:
            q20, med, q80 = do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES))
        else:
            times = []
            for _ in range(warmup):
                fn()
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            q20, med, q80 = _quantiles(times)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q20, med, q80 = _quantiles(times)
        peak = None
    return {"ms_median": med, "ms_q20": q20, "ms_q80": q80, "peak_mem_mb": peak}


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=10, method="inclusive")  # deciles: 20% is cuts[1], 80% cuts[7]
    return cuts[1], statistics.median(times), cuts[7]


def format_table(rows: list[dict]) -> str:
    cols = ["op", "impl", "pass", "shape", "ms_median", "ms_q20", "ms_q80", "gb_per_s", "pct_copy_bw", "tflops",
            "mfu_measured_pct", "mfu_datasheet_pct", "peak_mem_mb", "clips_per_s", "vs_peer", "tokenizer_share",
            "frames_per_s"]
    cols = cols[:4] + [c for c in cols[4:] if any(r.get(c) is not None for r in rows)]  # only what some row has
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 1000 else f"{v:.0f}"
    return str(v)
