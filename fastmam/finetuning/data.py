"""Training clips of fine-tuning: frames, crops and RandAugment of a labelled video, as a pure function of its key.

``ClipDataset[(index, epoch)]`` samples from video ``index`` of a ``VideoSource`` (an annotation list, or synthetic
raw videos): frame indices by ``data.sampling`` (``dense``: VideoMAE's ``num_frames`` at ``stride`` from a random
start, ``fastmam.data.sampling``; ``segment``: TSN, a random frame in each of ``num_frames`` segments,
``views.segment_indices``), then ``data.repeated_sampling`` crops of that decode (``data.crop``, flip by
``data.flip``), each with its own RandAugment draw. Every choice comes from (seed, index, epoch, attempt[, crop]).
A video that cannot serve (``decode.probe``'s rule, a failed decode, too short under ``short_videos: skip``) is
replaced by another one drawn from the same key, reported in ``"bad"`` and counted by the training loop
(``DataHealth``), as in pretraining.

Item: ``{"video": (k, T, S, S, C) uint8, "label": int, "index": int, "bad": [(path, reason)]}`` (``collate_clips``
flattens the k crops into the batch).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.decode import BadVideo
from ..data.sampling import SamplingSpec, TooShort, apply_crop, sample_crop, sample_frame_indices, sample_rng
from ..data.video import MAX_ATTEMPTS, all_attempts_failed
from .augment import ClipAugment, key_of
from .config import FinetuneConfig
from .sources import VideoSource


def train_spec(cfg: FinetuneConfig) -> SamplingSpec:
    d = cfg.data
    return SamplingSpec(num_frames=d.num_frames, stride=d.stride, img_size=d.img_size, crop=d.crop,
                        crop_scales=tuple(d.crop_scales), rrc_scale=tuple(d.rrc_scale), rrc_ratio=tuple(d.rrc_ratio),
                        flip=d.flip, repeated=d.repeated_sampling, short_videos=d.short_videos, seed=cfg.seed)


def eval_spec(cfg: FinetuneConfig) -> SamplingSpec:
    """The test and validation views: the training frames rule without randomness, centre crops, no flip."""
    return dataclasses.replace(train_spec(cfg), crop="center", flip=False, repeated=1)


class ClipDataset(Dataset):
    """See the module docstring. ``augment``: a ``ClipAugment`` or None."""

    def __init__(self, source: VideoSource, spec: SamplingSpec, sampling: str = "dense",
                 augment: ClipAugment | None = None):
        self.source, self.spec, self.sampling, self.augment = source, spec, sampling, augment
        self._bad: dict[int, str] = {}  # per process: videos already found bad

    def __len__(self) -> int:
        return len(self.source)

    @property
    def paths(self) -> list[str]:
        return [self.source.path(i) for i in range(len(self.source))]

    def replacement(self, index: int, epoch: int, attempt: int) -> int:
        """Video tried at ``attempt`` for sample ``index``: itself first, then others drawn from the key."""
        n = len(self.source)
        if attempt == 0 or n == 1:
            return index
        rng = np.random.default_rng([self.spec.seed, index, epoch, attempt, 1 << 20])
        return (index + int(rng.integers(1, n))) % n

    def frame_indices(self, num_video_frames: int, rng: np.random.Generator) -> np.ndarray:
        s = self.spec
        if self.sampling == "segment":
            from .views import segment_indices

            return segment_indices(num_video_frames, s.num_frames, rng)
        return sample_frame_indices(num_video_frames, s.num_frames, s.stride, rng, s.short_videos)

    def load(self, vid: int, index: int, epoch: int, attempt: int) -> torch.Tensor:
        """(k, T, S, S, C) uint8 clips of video ``vid`` for the key (index, epoch, attempt)."""
        rng = sample_rng(self.spec.seed, index, epoch, attempt)
        indices = self.frame_indices(self.source.num_frames(vid), rng)
        frames = self.source.read(vid, indices)
        clips = []
        for j in range(self.spec.repeated):
            box = sample_crop(rng, frames.shape[1], frames.shape[2], self.spec)
            clip = apply_crop(frames, box, self.spec.img_size)
            if self.augment is not None:
                clip = self.augment(clip, key_of(self.spec.seed, index, epoch, attempt, j))
            clips.append(clip)
        return torch.stack(clips)

    def __getitem__(self, key) -> dict:
        index, epoch = (key, 0) if isinstance(key, int) else (int(key[0]), int(key[1]))
        bad: list[tuple[str, str]] = []
        for attempt in range(MAX_ATTEMPTS):
            vid = self.replacement(index, epoch, attempt)
            if attempt and vid in self._bad:
                continue
            try:
                video = self.load(vid, index, epoch, attempt)
            except (BadVideo, TooShort) as exc:
                self._bad[vid] = str(exc)
                bad.append((self.source.path(vid), str(exc)))
                continue
            return {"video": video, "label": self.source.label(vid), "index": vid, "bad": bad}
        raise all_attempts_failed(index, bad)
