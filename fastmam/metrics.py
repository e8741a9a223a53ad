"""Metrics on rank 0: one JSON line per log interval (``metrics.jsonl``) and TensorBoard scalars
when the ``tensorboard`` package is installed and enabled."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    """``start_step``: the step a run starts or resumes from. Rows logged after it by an earlier
    attempt (between its last checkpoint and a crash) are dropped, so the file holds each step once."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self.file = open(self.path, "a")  # a resumed run continues the same file
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("fastmam: tensorboard is not installed; metrics go to metrics.jsonl only "
                      "(pip install tensorboard to get curves)")
            else:
                # purge_step drops events an interrupted attempt wrote after the resumed step
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
