"""Real-video dataset for the CPU loaders (PyAV, decord), with bad files replaced, never fatal.

An item is keyed by ``(index, epoch)`` (the loader's sampler passes both) and is a pure function of
(seed, index, epoch): frame indices and crops come from ``sampling``. Every file is probed once per
process before its first use (``decode.probe``: the one rule for a bad file, shared with ``prepare``,
DALI and the code cache; its frame count is the one sampled from). When a video cannot give its frames
(bad by that rule, failing to decode, too short under ``short_videos: skip``), the attempt is recorded
and the sample is replaced by another video drawn from (seed, index, epoch, attempt), so the batch
stays full and resumed runs stay exact. Items report in ``"bad"``, as
``(path, reason)`` pairs, their own file when it failed and replacements newly found bad; the
training loop (``DataHealth``) logs each file once, counts them in the metrics and stops the run
past ``data.max_bad_fraction``.

Item: ``{"video": (k, T, S, S, C) uint8, "label": int, "index": int, "bad": [(path, reason)]}``
with k = ``repeated_sampling`` crops of one decode (``"next_video"`` too for dense motion, and
``"codes"`` (k, T, S/p, S/p) int32 with a code cache: each frame's cached codes seen through the same
crop and flip, ``code_cache.CodeCache.clip_codes``; a video the cache lacks is replaced as a bad one; and
``"trajectories"`` (k, T/t, S/8, S/8, L, 2) float32 / ``"trajectory_valid"`` (k, T/t, S/8, S/8) bool with a
trajectory cache: the cached trajectories of each tubelet's first frame through the same crop, resize and flip,
``trajectories.TrajectoryCache.clip_trajectories``; a video without them -- recorded bad in the cache, absent, or
too short for L frames after its last tubelet's first frame -- is found when planning and replaced as a bad one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import VideoList
from .code_cache import CodeCache
from .decode import BadVideo, VideoInfo, decoder, probe
from .health import BadDataError
from .sampling import (
    CropBox,
    SamplingSpec,
    TooShort,
    apply_crop,
    next_frame_indices,
    sample_crop,
    sample_frame_indices,
    sample_rng,
)
from .trajectories import TrajectoryCache

#: consecutive failed attempts for one item before the loader gives up (every file tried was bad)
MAX_ATTEMPTS = 32


@dataclass
class SamplePlan:
    """What to read for one sample: frames ``indices`` (and ``next_indices`` for dense motion) of
    ``path``, then one crop per repeated sample."""

    index: int
    path: str
    label: int
    num_video_frames: int
    indices: np.ndarray
    next_indices: np.ndarray | None
    boxes: list[CropBox] | None  # None until the frame size is known (after decoding)
    rng: np.random.Generator


class VideoDataset(Dataset):
    """Map-style dataset over a ``VideoList``; ``dataset[(index, epoch)]`` (or ``dataset[index]``, epoch 0)."""

    def __init__(self, videos: VideoList, spec: SamplingSpec, backend: str = "pyav", decode_threads: int = 1,
                 codes: CodeCache | None = None, trajectories: TrajectoryCache | None = None):
        self.videos, self.spec, self.backend = videos, spec, backend
        self.decode_threads = decode_threads
        self.codes = codes
        self.trajectories = trajectories  # starts: frames [0::spec.tubelet]; L: spec.trajectory_length
        if trajectories is not None and (trajectories.params.length != spec.trajectory_length
                                         or spec.num_frames % spec.tubelet):
            raise ValueError(
                f"a trajectory cache of L={trajectories.params.length} needs a SamplingSpec with trajectory_length="
                f"{trajectories.params.length} (got {spec.trajectory_length}) and a tubelet dividing num_frames "
                f"(got tubelet={spec.tubelet}, num_frames={spec.num_frames}); spec_from_config(cfg) sets both")
        # DALI decodes on its own; PyAV re-checks the files DALI failed on
        self._decode = decoder("pyav" if backend == "dali" else backend)
        self._info: dict[str, VideoInfo] = {}  # per process: files probed good so far
        self._bad: dict[str, str] = {}  # per process: files already found bad (skipped at once)

    def __len__(self) -> int:
        return len(self.videos)

    # ------------------------------------------------------------------ planning (shared with DALI)

    def info(self, path: str) -> VideoInfo:
        """``decode.probe(path)``, once per process; ``BadVideo`` for a bad file."""
        got = self._info.get(path)
        if got is None:
            got = self._info[path] = probe(path)
        return got

    def replacement(self, index: int, epoch: int, attempt: int) -> int:
        """The video tried at ``attempt`` for sample ``index``: attempt 0 is the video itself, then distinct
        other videos in an order drawn from (seed, index, epoch) -- the same in every process."""
        n = len(self.videos)
        if attempt == 0 or n == 1:
            return index
        rng = np.random.default_rng([self.spec.seed, index, epoch, 1 << 20])
        seen, vid, a = {index}, index, 0
        while a < attempt:
            vid = (index + int(rng.integers(1, n))) % n
            if vid in seen and len(seen) < n:
                continue
            seen.add(vid)
            a += 1
        return vid

    def plan(self, index: int, epoch: int, attempt: int) -> SamplePlan:
        """Frame indices of one attempt; raises ``BadVideo`` / ``TooShort`` for a file that cannot serve."""
        vid = self.replacement(index, epoch, attempt)
        path = self.videos.paths[vid]
        if path in self._bad:
            raise BadVideo(self._bad[path])
        n = self.info(path).frames
        if self.codes is not None:
            self.codes.entry(path)  # a video without cached codes is bad data here, found before decoding
        rng = sample_rng(self.spec.seed, index, epoch, attempt)
        s = self.spec
        indices = sample_frame_indices(n, s.num_frames, s.stride, rng, s.short_videos, s.tubelet, s.trajectory_length)
        if self.trajectories is not None:  # likewise a video without these starts' trajectories
            self.trajectories.check(path, self.trajectory_starts(indices))
        nxt = next_frame_indices(indices, n) if s.dense else None
        return SamplePlan(vid, path, self.videos.labels[vid], n, indices, nxt, None, rng)

    def crops(self, plan: SamplePlan, height: int, width: int) -> list[CropBox]:
        return [sample_crop(plan.rng, height, width, self.spec) for _ in range(self.spec.repeated)]

    def cached_codes(self, plan: SamplePlan, height: int, width: int) -> torch.Tensor | None:
        """(k, T, S/p, S/p) int32: the cached codes of the plan's frames through its crops (None without a cache)."""
        if self.codes is None:
            return None
        return self.codes.clip_codes(plan.path, plan.indices, plan.boxes, (height, width), self.spec.img_size)

    def trajectory_starts(self, indices: np.ndarray) -> np.ndarray:
        """(T/t,) the frames whose trajectories a clip of frames ``indices`` (T,) gets: each tubelet's first."""
        return indices[:: self.spec.tubelet]

    def cached_trajectories(self, plan: SamplePlan, height: int,
                            width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(k, T/t, S/8, S/8, L, 2) float32 and (k, T/t, S/8, S/8) bool: the cached trajectories of the plan's
        tubelets' first frames through each of its crops of the height x width frames (None without a cache)."""
        if self.trajectories is None:
            return None
        return self.trajectories.clip_trajectories(plan.path, self.trajectory_starts(plan.indices), plan.boxes,
                                                   (height, width), self.spec.img_size)

    def remember_bad(self, path: str, reason: str) -> None:
        self._bad[path] = reason

    # ------------------------------------------------------------------ CPU decoding

    def load(self, plan: SamplePlan) -> dict:
        """Decode and augment one plan -> item tensors."""
        wanted = plan.indices if plan.next_indices is None else np.concatenate([plan.indices, plan.next_indices])
        frames = torch.from_numpy(self._decode(plan.path, wanted, self.decode_threads))
        plan.boxes = self.crops(plan, frames.shape[1], frames.shape[2])
        size = self.spec.img_size
        clips = torch.stack([apply_crop(frames, box, size) for box in plan.boxes])  # (k, F, S, S, C)
        t = self.spec.num_frames
        item = {"video": clips[:, :t].contiguous()}
        if plan.next_indices is not None:
            item["next_video"] = clips[:, t:].contiguous()
        codes = self.cached_codes(plan, frames.shape[1], frames.shape[2])
        if codes is not None:
            item["codes"] = codes
        traj = self.cached_trajectories(plan, frames.shape[1], frames.shape[2])
        if traj is not None:
            item["trajectories"], item["trajectory_valid"] = traj
        return item

    def __getitem__(self, key) -> dict:
        index, epoch = (key, 0) if isinstance(key, int) else (int(key[0]), int(key[1]))
        bad: list[tuple[str, str]] = []
        for attempt in range(MAX_ATTEMPTS):
            path = self.videos.paths[self.replacement(index, epoch, attempt)]
            if attempt and path in self._bad:
                continue  # a replacement already known bad here: skip it quietly (it would fail the same way)
            try:
                plan = self.plan(index, epoch, attempt)
                item = self.load(plan)
            except (BadVideo, TooShort) as exc:
                reason = str(exc)
                self.remember_bad(path, reason)
                bad.append((path, reason))
                continue
            item.update(label=plan.label, index=plan.index, bad=bad)
            return item
        raise all_attempts_failed(index, bad)


def all_attempts_failed(index: int, bad: list[tuple[str, str]]) -> BadDataError:
    """The error of a sample for which ``MAX_ATTEMPTS`` videos in a row were bad (``bad``: their paths, reasons)."""
    examples = "\n  ".join(f"{p}: {r}" for p, r in bad[:8])
    return BadDataError(
        f"{MAX_ATTEMPTS} videos in a row could not be read for sample {index}; the list or the files are "
        f"broken:\n  {examples}\ncheck data.train_list and data.data_root, or rebuild the list with "
        "`python -m fastmam.data.prepare`"
    )


def collate_clips(items: list[dict]) -> dict:
    """Stack items into a batch; repeated samples (k per item) are flattened into the batch dimension.

    ``video``: (B, T, H, W, C) with B = items x k; ``codes`` (cached codes): (B, T, H/p, W/p); ``trajectories``:
    (B, T/t, H/8, W/8, L, 2) float32 and ``trajectory_valid``: (B, T/t, H/8, W/8) bool (trajectory cache);
    ``label`` / ``index``: (B,); ``bad``: all failed attempts of the batch as a list of (path, reason)."""
    out: dict = {}
    for key, dims in (("video", 6), ("next_video", 6), ("codes", 5), ("trajectories", 7), ("trajectory_valid", 5)):
        if key in items[0]:
            v = torch.stack([it[key] for it in items])
            out[key] = v.flatten(0, 1) if v.dim() == dims else v
    k = out["video"].shape[0] // len(items)
    out["label"] = torch.tensor([it["label"] for it in items]).repeat_interleave(k)
    out["index"] = torch.tensor([it["index"] for it in items]).repeat_interleave(k)
    out["bad"] = [b for it in items for b in it.get("bad", ())]
    return out
