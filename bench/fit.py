"""Which presets train on this GPU: a few real optimizer steps of each, in its own process, and the peak memory.

    python bench/fit.py                                   # vit_b, vit_l, vit_h, vit_g with ZeRO-3 + checkpointing
    python bench/fit.py --presets vit_g --batch 4 8 16    # the largest batch that fits
    python bench/fit.py --presets tiny --steps 2          # the harness itself, on CPU (what CI runs)

Each (preset, batch) runs ``fastmam/pretrain.py`` on synthetic clips with the overrides given (default
``deepspeed.zero_stage=3 model.activation_checkpointing=true``) in a subprocess, so that running out of
memory ends only that run. A row: preset, batch, parameters, whether it fit, the measured peak of
allocated GPU memory (``torch.cuda.max_memory_allocated``; none on CPU), the estimate the run printed at
start, clips/s of its last log interval, device, versions and commit. ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
if os.path.dirname(_here) not in sys.path:
    sys.path.append(os.path.dirname(_here))

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.harness import _fmt, environment  # noqa: E402
from fastmam.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OVERRIDES = ["deepspeed.zero_stage=3", "model.activation_checkpointing=true"]
#: what a run that ran out of GPU memory prints (torch's OutOfMemoryError, or CUDA's own message)
OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|CUBLAS_STATUS_ALLOC_FAILED")


def run_one(preset: str, batch: int | None, steps: int, overrides: list[str], folder: Path, timeout: int) -> dict:
    """Train ``steps`` steps of ``preset`` in a subprocess; the row describing what happened."""
    out = folder / f"{preset}_b{batch}"
    args = [sys.executable, str(REPO / "fastmam/pretrain.py"), "--config", preset, f"output_dir={out}",
            f"schedule.steps={steps}", "schedule.warmup_steps=1", f"logging.every_steps={max(1, steps // 2)}",
            f"checkpoint.every_steps={10 * steps}", "data.source=synthetic", "logging.progress_bar=false",
            "logging.tensorboard=false", *overrides]
    if batch is not None:
        args.append(f"data.batch_size={batch}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    log = proc.stdout + proc.stderr
    row = {"op": "fit", "impl": "fastmam", "pass": "train", "shape": f"{preset} B{batch or 'preset'}",
           "preset": preset, "batch": batch, "overrides": " ".join(overrides), "exit_status": proc.returncode,
           "seconds": round(time.perf_counter() - start, 1)}
    params = re.search(r": ([\d.]+) M parameters", log)
    row["params_m"] = float(params.group(1)) if params else None
    estimate = re.search(r"estimated memory per \w+: ([\d.]+) GiB", log)
    row["estimate_gib"] = float(estimate.group(1)) if estimate else None
    if proc.returncode == 0:
        last = read_metrics(out)[-1]
        row.update(fits=True, peak_mem_gib=last.get("peak_mem_gib"), clips_per_s=last.get("clips_per_s"))
    else:
        row.update(fits=False if OOM.search(log) else None, peak_mem_gib=None, clips_per_s=None,
                   error=log.strip().splitlines()[-1][-300:] if log.strip() else "")
    return row


COLUMNS = ("preset", "batch", "params_m", "fits", "peak_mem_gib", "estimate_gib", "clips_per_s", "seconds")


def table(rows: list[dict]) -> str:
    cells = [[_fmt(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(COLUMNS)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in [COLUMNS, *cells])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["vit_b", "vit_l", "vit_h", "vit_g"])
    ap.add_argument("--batch", nargs="+", type=int, default=[None], help="batch sizes per rank [the preset's]")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run [4]")
    ap.add_argument("--overrides", nargs="*", default=DEFAULT_OVERRIDES, help="config overrides for every run")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run [1800]")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON rows")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastmam_fit_") as tmp:
        for preset in args.presets:
            for batch in args.batch:
                row = {**run_one(preset, batch, args.steps, args.overrides, Path(tmp), args.timeout), **env}
                rows.append(row)
                status = {True: "fits", False: "out of memory", None: f"failed: {row.get('error')}"}[row["fits"]]
                print(f"{preset} batch {batch or 'preset'}: {status}", flush=True)
    print(table(rows))
    fitting = [r for r in rows if r["fits"]]
    if fitting:
        best = max(fitting, key=lambda r: (r["params_m"] or 0, r["batch"] or 0))
        print(f"largest that trains here: {best['preset']} ({best['params_m']} M parameters) at {best['shape']}, "
              f"peak {best['peak_mem_gib']} GiB, with {' '.join(args.overrides)}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"fit_{env['device_type']}_{time.strftime('%Y%m%d_%H%M%S')}.json"
        path.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {path}")
    return 0 if all(r["fits"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
