"""Where the raw videos of fine-tuning and testing come from: one interface for an annotation list and for
synthetic clips, so that frame sampling, crops, augmentation and multi-view testing are written once.

A ``VideoSource`` is a sequence of labelled raw videos. ``num_frames(i)`` and ``read(i, indices)`` raise
``fastmam.data.decode.BadVideo`` for a video that cannot serve (the loaders skip or replace it and count it).

- ``ListSource``: the videos of an annotation list (``fastmam.data.annotations``), probed and decoded by the CPU
  decoders (``decode.probe``'s rule for a bad file; PyAV or decord).
- ``SyntheticSource``: items ``first .. first + count - 1`` of ``SyntheticShapes`` rendered as raw videos of
  ``raw_frames`` frames at ``raw_size`` pixels, labelled by motion class. Frame sampling and crops then work on them
  as on real videos. Item i depends only on (seed, i): disjoint index ranges are disjoint clips.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..data.annotations import VideoList
from ..data.synthetic import MOTIONS, SyntheticShapes


class VideoSource(Protocol):
    def __len__(self) -> int: ...

    def label(self, i: int) -> int: ...

    def path(self, i: int) -> str: ...

    def num_frames(self, i: int) -> int: ...

    def read(self, i: int, indices: np.ndarray) -> torch.Tensor: ...


class ListSource:
    """The videos of a ``VideoList``; ``read`` -> (F, H, W, C) uint8 frames ``indices`` (decoded on the CPU)."""

    def __init__(self, videos: VideoList, backend: str = "pyav", decode_threads: int = 1):
        from ..data.decode import decoder

        self.videos = videos
        self.backend = "pyav" if backend == "dali" else backend  # DALI decodes training batches only
        self.decode_threads = decode_threads
        self._decode = decoder(self.backend)
        self._frames: dict[int, int] = {}  # per process: probed frame counts

    def __len__(self) -> int:
        return len(self.videos)

    def label(self, i: int) -> int:
        return self.videos.labels[i]

    def path(self, i: int) -> str:
        return self.videos.paths[i]

    def num_frames(self, i: int) -> int:
        from ..data.decode import probe

        if i not in self._frames:
            self._frames[i] = probe(self.videos.paths[i]).frames
        return self._frames[i]

    def read(self, i: int, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self._decode(self.videos.paths[i], indices, self.decode_threads))

    @property
    def num_classes(self) -> int:
        return max(self.videos.labels) + 1 if len(self.videos) else 0


class SyntheticSource:
    """``count`` synthetic raw videos from item ``first`` on; ``read`` renders the whole clip and takes ``indices``."""

    def __init__(self, first: int, count: int, raw_frames: int, raw_size: int, seed: int = 0):
        if count < 1:
            raise ValueError(f"a synthetic source needs at least one clip, got count={count}")
        self.first, self.count = first, count
        self.raw_frames = raw_frames
        self.shapes = SyntheticShapes(first + count, raw_frames, raw_size, raw_size, seed=seed)

    def __len__(self) -> int:
        return self.count

    def label(self, i: int) -> int:
        return self.shapes.trajectory(self.first + i).label

    def path(self, i: int) -> str:
        return f"synthetic:{self.first + i}"

    def num_frames(self, i: int) -> int:
        return self.raw_frames

    def read(self, i: int, indices: np.ndarray) -> torch.Tensor:
        video = self.shapes[self.first + i]["video"]
        return video[torch.as_tensor(np.asarray(indices), dtype=torch.long)].contiguous()

    num_classes = len(MOTIONS)
