"""The dataset interface and the resumable, rank-sharded loader.

A dataset is any map-style ``torch.utils.data.Dataset`` whose items are dicts::

    {"video": uint8 tensor (T, H, W, C), "label": int, "index": int}

(optionally ``"next_video"`` of the same shape for the dense RGB-difference target, and ``"trajectories"`` /
``"trajectory_valid"`` for MME's trajectory target). Real-video
datasets (``fastmam.data.video``) take ``(index, epoch)`` keys so that their random crops and frame
starts are a pure function of (seed, index, epoch), and report replaced bad files in ``"bad"``.

Data order is a pure function of (seed, micro-step): micro-step ``u`` reads, on rank ``r``, the
slice ``[(j * world + r) * B, +B)`` of epoch ``u // steps_per_epoch``'s permutation (drawn from
``seed + epoch``), ``j = u % steps_per_epoch``. A resumed run therefore continues with exactly the
batches it would have seen, with no loader state to save; the incomplete tail of each epoch is
dropped so that every rank sees whole batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import Config


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's index batches for micro-steps ``start .. end - 1`` (deterministic by seed)."""

    def __init__(self, dataset_len: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start: int, end: int, with_epoch: bool = False):
        per_step = batch_size * world_size
        if dataset_len < per_step:
            raise ValueError(
                f"the dataset has {dataset_len} clips, fewer than one global batch "
                f"({batch_size} per rank x {world_size} ranks); add data or lower data.batch_size"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start, self.end = start, end
        self.with_epoch = with_epoch  # yield (index, epoch) keys instead of indices
        self.steps_per_epoch = dataset_len // per_step

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def batch_indices(self, micro_step: int, perm: torch.Tensor | None = None) -> list:
        epoch, j = divmod(micro_step, self.steps_per_epoch)
        if perm is None:
            perm = self.permutation(epoch)
        first = (j * self.world_size + self.rank) * self.batch_size
        indices = perm[first : first + self.batch_size].tolist()
        return [(i, epoch) for i in indices] if self.with_epoch else indices

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = None, None
        for u in range(self.start, self.end):
            if u // self.steps_per_epoch != epoch:
                epoch = u // self.steps_per_epoch
                perm = self.permutation(epoch)
            yield self.batch_indices(u, perm)


def build_dataset(cfg: Config) -> Dataset:
    """The configured dataset (the synthetic moving shapes are the embedded default)."""
    d = cfg.data
    if d.source == "synthetic":
        from .synthetic import SyntheticShapes

        # MME's trajectory target: the shapes' true trajectories ride with each clip
        tg, tubelet = cfg.targets, cfg.model.tubelet
        traj = (tubelet, tg.trajectory_length) if tg.motion == "trajectory" else None
        return SyntheticShapes(d.num_samples, d.num_frames, d.img_size, d.img_size, seed=cfg.seed, trajectories=traj)
    if d.source == "video":
        from .annotations import read_list
        from .sampling import spec_from_config
        from .video import VideoDataset

        videos = read_list(d.train_list, d.data_root, d.list_format, d.hmdb51_split)
        codes = None
        if cfg.targets.codes == "cached":
            from .code_cache import CodeCache

            codes = CodeCache.for_config(cfg)
        trajectories = None
        if cfg.targets.motion == "trajectory":  # MME's target: the cache of `python -m fastmam.data.trajectories`
            from .trajectories import TrajectoryCache

            trajectories = TrajectoryCache.for_config(cfg)  # refused now, not in hour 40, if it does not match
        return VideoDataset(videos, spec_from_config(cfg), d.backend, d.decode_threads, codes, trajectories)
    raise ValueError(f"data.source='{d.source}' has no dataset builder")


def build_loader(cfg: Config, dataset: Dataset, rank: int, world_size: int, start_micro_step: int,
                 end_micro_step: int, pin_memory: bool, device: torch.device | None = None):
    """Batches for micro-steps [start, end) on this rank: dicts with ``video`` (B, T, H, W, C) uint8
    (B = data.batch_size), ``label``, ``index``, ``bad`` (and ``next_video`` for dense motion, ``codes``
    (B, T, H/p, W/p) for cached codes, ``trajectories`` (B, T/t, H/8, W/8, L, 2) float32 and ``trajectory_valid``
    (B, T/t, H/8, W/8) bool for trajectory targets: the true ones of the synthetic shapes, or a video's cached
    ones through each clip's crop, resize and flip).

    CPU decoders run in DataLoader workers; ``data.backend: dali`` returns DALI's GPU pipeline,
    fed by the same sampler and sampling plans."""
    from .video import VideoDataset, collate_clips

    video = isinstance(dataset, VideoDataset)
    per_item = cfg.data.repeated_sampling if video else 1
    sampler = StepBatchSampler(len(dataset), cfg.data.batch_size // per_item, rank, world_size, cfg.seed,
                               start_micro_step, end_micro_step, with_epoch=video)
    if video and cfg.data.backend == "dali":
        from .dali import DaliLoader

        return DaliLoader(cfg, dataset, sampler, device)
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_clips if video else None,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
    )
