"""One rank of the multi-view test over 7 synthetic videos, one of them unreadable (started by torchrun with 2
processes); tests/finetune/test_testing.py compares what the ranks return and write with a 1-rank run.

    python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/finetune/testing_worker.py OUT

Each rank writes ``OUT/rank<r>.json``: its metrics and the dataset indices it read; rank 0 writes the test files
into ``OUT/files``.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastmam.data.decode import BadVideo  # noqa: E402
from fastmam.data.sampling import SamplingSpec  # noqa: E402
from fastmam.finetuning.sources import SyntheticSource  # noqa: E402
from fastmam.finetuning.testing import run_test  # noqa: E402
from fastmam.finetuning.views import ViewDataset  # noqa: E402

NUM_VIDEOS = 7  # not divisible by 2 ranks
BAD = 5  # read by rank 1 of 2
NUM_CLASSES = 9  # SyntheticSource: motion classes
SPEC = SamplingSpec(num_frames=4, stride=3, img_size=12, crop="center")
CLIPS, CROPS = 2, 3


class LandscapeSource:
    """SyntheticSource's square 24 x 24 frames cut to 16 x 24 (so that the 3 crops differ); video ``bad`` unreadable."""

    def __init__(self, count: int = NUM_VIDEOS, bad: int = BAD):
        self.inner = SyntheticSource(first=1000, count=count, raw_frames=24, raw_size=24, seed=3)
        self.bad = bad

    def __len__(self) -> int:
        return len(self.inner)

    def label(self, i: int) -> int:
        return self.inner.label(i)

    def path(self, i: int) -> str:
        return self.inner.path(i)

    def num_frames(self, i: int) -> int:
        if i == self.bad:
            raise BadVideo("damaged: made unreadable by the test")
        return self.inner.num_frames(i)

    def read(self, i: int, indices: np.ndarray) -> torch.Tensor:
        return self.inner.read(i, indices)[:, 4:20].contiguous()


class Recorded(ViewDataset):
    """A ViewDataset that remembers which items this process read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_items: list[int] = []

    def __getitem__(self, i: int) -> dict:
        self.read_items.append(i)
        return super().__getitem__(i)


def build() -> Recorded:
    return Recorded(LandscapeSource(), SPEC, clips=CLIPS, crops=CROPS, sampling="dense")


_WEIGHT = torch.randn(NUM_CLASSES, SPEC.num_frames * SPEC.img_size**2 * 3, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)


def fake_predict(views: torch.Tensor) -> torch.Tensor:
    """views (M, T, S, S, C) uint8 -> logits (M, 9) float64: a fixed random linear map of the pixels, one view per
    row (a function of the view alone, whatever the batch)."""
    x = views.reshape(views.shape[0], -1).double() / 255.0 - 0.5
    return 3.0 * x @ _WEIGHT.T / _WEIGHT.shape[1] ** 0.5


def main() -> None:
    out = Path(sys.argv[1])
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dataset = build()
    metrics = run_test(fake_predict, dataset, NUM_CLASSES, batch_size=2, num_workers=0, device="cpu",
                       out_dir=out / "files", rank=rank, world_size=world, log=lambda s: print(f"[{rank}] {s}"))
    (out / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "read": dataset.read_items,
                                                      "pid": os.getpid()}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
