"""Trains the same tiny model once per ZeRO configuration in one process group (started by
``deepspeed --num_gpus 2``), each into ``<out>/<name>``; tests/train/test_zero_stages.py compares them.

    deepspeed --num_gpus 2 --master_port P tests/train/zero_stages_worker.py OUT NAME=OVERRIDES ...

Each run argument is ``name=override,override``, e.g. ``z2o=deepspeed.zero_stage=2,deepspeed.offload_optimizer=true``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastmam.config import load_config  # noqa: E402
from fastmam.pretrain import train  # noqa: E402

BASE = ["model.depth=2", "data.num_workers=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "data.batch_size=4", "schedule.steps=4", "schedule.warmup_steps=1", "logging.every_steps=1",
        "checkpoint.every_steps=4", "deepspeed.gradient_accumulation_steps=2"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = ap.parse_args()
    for run in args.runs:
        name, _, overrides = run.partition("=")
        extra = [o for o in overrides.split(",") if o]
        train(load_config("tiny", [*BASE, f"output_dir={args.out / name}", *extra]))


if __name__ == "__main__":
    main()
