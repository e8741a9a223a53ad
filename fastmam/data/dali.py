"""NVIDIA DALI loader: the same samples as the CPU loaders, decoded by DALI (GPU, or CPU for VP8/VP9/MJPEG).

Planning stays in Python and uses the dataset's own functions (``VideoDataset.plan``, ``crops``,
``replacement``), so DALI decodes exactly the frames and crops that ``dataset[(index, epoch)]`` would:
for every key of a micro-step, the replace loop tries attempts 0, 1, ... of ``video.MAX_ATTEMPTS``;
the frame count, frame size and codec come from the one prober (``decode.probe`` through
``VideoDataset.info``: the same rule for a bad file as the CPU loaders and ``prepare``); then
the k = ``repeated_sampling`` crop boxes are drawn from the plan's generator, after ``plan()``, as the
CPU path draws them after decoding. Cached codes and trajectories are read and mapped through those boxes on the
CPU at planning time, by the dataset's own ``cached_codes`` / ``cached_trajectories``, and travel with the batch.

DALI then runs, per sample: one decode of the planned frames (``fn.decoders.video``, ``frames=`` the
T indices, followed by the T next indices for dense motion), and for each of the k crops
``fn.slice`` (absolute pixels) -> ``fn.resize`` (bilinear, antialiased: ``sampling.apply_crop``'s
semantics) -> ``fn.flip``. Batches are fed with ``feed_input`` in sampler order, with one batch
decoding ahead of the one being consumed (``prefetch_queue_depth`` 2).

Bad data is never fatal. A file that fails planning (bad by ``decode.probe``'s rule, too short under
``short_videos: skip``) is replaced as on the CPU path, with the same reason. A file that passes planning but that
DALI fails to decode raises inside DALI for the whole batch: the loader then decodes the batch's
plans with PyAV to find the culprits (all of the batch's files when none fail there), reports and
replaces them, rebuilds the pipeline and decodes the batch again.

Colours: DALI converts YUV to RGB with its own kernels (BT.601 limited range, like PyAV/swscale for
untagged streams, but with a different rounding and chroma upsampling), so its pixels differ from
PyAV's by about 1-2 levels on average; the frames and crops are the same.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .decode import BadVideo, decode_pyav
from .loader import StepBatchSampler
from .sampling import TooShort
from .video import MAX_ATTEMPTS, SamplePlan, VideoDataset, all_attempts_failed

log = logging.getLogger(__name__)

#: batches fed to DALI ahead of the one being consumed (DALI's prefetch_queue_depth)
PREFETCH = 2

#: DALI failures in a row that PyAV does not reproduce before the loader gives up (not a data problem)
MAX_BLIND_FAILURES = 3

#: codecs DALI's CPU decoder reads (PyAV's decoder names; libvpx's own decoders included)
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "libvpx", "libvpx-vp9"})
#: codecs the GPU ("mixed") decoder reads in addition
GPU_CODECS = CPU_CODECS | {"h264", "hevc", "av1", "libdav1d", "libaom-av1", "mpeg4"}

_IMPORT_HINT = "data.backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or -cuda130)"
_CPU_CODEC_HINT = "DALI's CPU decoder reads only VP8, VP9 and MJPEG; use data.backend=pyav on CPU or a GPU"


class UnsupportedCodec(ValueError):
    """A configuration error: DALI's CPU decoder cannot read the codec of the listed videos."""


@dataclass
class _Item:
    """One planned sample: the key, the attempt that succeeded, and what DALI is fed for it."""

    index: int
    epoch: int
    attempt: int
    plan: SamplePlan
    frames: np.ndarray  # (T,) or (2T,) int32: the T indices, then the T next indices for dense motion
    encoded: np.ndarray  # (bytes,) uint8: the whole file
    codes: torch.Tensor | None  # (k, T, S/p, S/p) int32 cached codes through the plan's crops, or None
    # (k, T/t, S/8, S/8, L, 2) float32 and (k, T/t, S/8, S/8) bool cached trajectories through the crops, or None
    trajectories: tuple[torch.Tensor, torch.Tensor] | None
    bad: list[tuple[str, str]] = field(default_factory=list)  # failed attempts of this key, in order


@dataclass
class _Batch:
    items: list[_Item]


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{_IMPORT_HINT} ({exc})") from None


def _dali_reason(exc: BaseException) -> str:
    """DALI's multi-line error (operator traceback, C++ context) -> the line that says what went wrong."""
    text = str(exc)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines()]
    noise = ("Critical error in pipeline", "C++ context", "Current pipeline object", "Error in ", "which was used",
             "File \"", "[/opt/")
    useful = [ln for ln in lines if ln and not ln.startswith(noise)]
    reason = useful[0] if useful else (lines[0] if lines and lines[0] else type(exc).__name__)
    return reason[:300]


class DaliLoader:
    """Batches of micro-steps ``sampler`` decoded by a DALI pipeline (same format as ``video.collate_clips``).

    Each batch: ``video`` (B, T, S, S, C) uint8 with B = items x k (the k repeated crops of one decode
    are consecutive, item-major), ``next_video`` of the same shape for dense motion (frames j+1),
    ``codes`` (B, T, S/p, S/p) int32 CPU tensor with a code cache (``VideoDataset.cached_codes``),
    ``trajectories`` (B, T/t, S/8, S/8, L, 2) float32 and ``trajectory_valid`` (B, T/t, S/8, S/8) bool CPU tensors
    with a trajectory cache (``VideoDataset.cached_trajectories``, the CPU loaders' mapping),
    ``label`` and ``index`` (B,) int64 CPU tensors, ``bad``: the (path, reason) of every failed attempt.
    Videos are CUDA tensors on ``device`` when it is a CUDA device (DALI's buffers, handed over via
    DLPack), CPU tensors otherwise (DALI's CPU pipeline: VP8 / VP9 / MJPEG only).
    """

    def __init__(self, cfg, dataset: VideoDataset, sampler: StepBatchSampler, device: torch.device | None):
        _import_dali()
        if not isinstance(dataset, VideoDataset):
            raise TypeError(f"DaliLoader reads a VideoDataset (data.source=video), got {type(dataset).__name__}")
        self.cfg, self.dataset, self.sampler = cfg, dataset, sampler
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.gpu = self.device.type == "cuda"
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"DaliLoader runs on a CUDA device or the CPU, got device {self.device}")
        if self.gpu and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.spec = dataset.spec
        self.num_threads = max(1, cfg.data.num_workers)
        self.decode_threads = cfg.data.decode_threads
        self._pipe = None
        self._primed = False  # the pipeline has had its first (prefetching) run
        self._pending = 0  # batches fed but not yet run (only before the first run)
        self._dummies = 0  # repeats fed to complete the first prefetch of a loader shorter than PREFETCH
        self._last: _Batch | None = None
        self._blind = 0  # consecutive DALI failures that PyAV did not reproduce
        self._active: object | None = None  # token of the iteration that owns the pipeline's queue

    def __len__(self) -> int:
        return len(self.sampler)

    # ------------------------------------------------------------------ planning

    def _check_codec(self, path: str, codec: str) -> None:
        if not self.gpu and codec not in CPU_CODECS:
            # every file of such a dataset would fail: a configuration error, not bad data
            raise UnsupportedCodec(f"{path} is {codec}: {_CPU_CODEC_HINT}")
        if self.gpu and codec not in GPU_CODECS:
            raise BadVideo(f"codec {codec} is not decodable by DALI (it reads {', '.join(sorted(GPU_CODECS))})")

    def _plan_item(self, index: int, epoch: int, first_attempt: int, bad: list[tuple[str, str]]) -> _Item:
        """The replace loop of ``VideoDataset.__getitem__`` from ``first_attempt`` on; failures go to ``bad``."""
        ds = self.dataset
        for attempt in range(first_attempt, MAX_ATTEMPTS):
            path = ds.videos.paths[ds.replacement(index, epoch, attempt)]
            try:
                plan = ds.plan(index, epoch, attempt)
                head = ds.info(path)  # probed by plan(): cached
                self._check_codec(path, head.codec)
                plan.boxes = ds.crops(plan, head.height, head.width)  # exactly once, after plan(): CPU's stream
                codes = ds.cached_codes(plan, head.height, head.width)
                # mapped on the CPU here, with the crops; moved with the batch like the codes
                trajectories = ds.cached_trajectories(plan, head.height, head.width)
                try:
                    encoded = np.fromfile(path, dtype=np.uint8)
                except OSError as exc:
                    raise BadVideo(f"cannot read: {exc.strerror or exc}") from None
            except (BadVideo, TooShort) as exc:
                reason = str(exc)
                ds.remember_bad(path, reason)
                bad.append((path, reason))
                continue
            wanted = plan.indices if plan.next_indices is None else np.concatenate([plan.indices, plan.next_indices])
            return _Item(index, epoch, attempt, plan, wanted.astype(np.int32), encoded, codes, trajectories, bad)
        raise all_attempts_failed(index, bad)

    def _plan_batch(self, keys) -> _Batch:
        return _Batch([self._plan_item(int(i), int(e), 0, []) for i, e in keys])

    # ------------------------------------------------------------------ the pipeline

    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        size = self.spec.img_size
        pipe = Pipeline(
            batch_size=self.sampler.batch_size, num_threads=self.num_threads,
            device_id=self.device.index if self.gpu else None, prefetch_queue_depth=PREFETCH, seed=self.cfg.seed,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            # pad_mode none: an index past the end (truncated file, wrong count in the list) is an error,
            # which the recovery reports, instead of a silently black frame
            video = fn.decoders.video(encoded, frames=frames, device="mixed" if self.gpu else "cpu", pad_mode="none")
            clips = []
            for c in range(self.spec.repeated):
                anchor = fn.external_source(name=f"anchor{c}", dtype=types.INT32, ndim=1)  # (y, x)
                shape = fn.external_source(name=f"shape{c}", dtype=types.INT32, ndim=1)  # (h, w)
                flip = fn.external_source(name=f"flip{c}", dtype=types.INT32, ndim=0)
                x = fn.slice(video, anchor, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False)
                x = fn.resize(x, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
                clips.append(fn.flip(x, horizontal=flip))
            pipe.set_outputs(fn.stack(*clips, axis=0))  # per sample (k, F, S, S, C) uint8
        pipe.build()
        self._pipe, self._primed, self._pending, self._dummies = pipe, False, 0, 0
        return pipe

    def _feed(self, batch: _Batch) -> None:
        pipe, items = self._pipe, batch.items
        pipe.feed_input("encoded", [it.encoded for it in items])
        pipe.feed_input("frames", [it.frames for it in items])
        for c in range(self.spec.repeated):
            boxes = [it.plan.boxes[c] for it in items]
            pipe.feed_input(f"anchor{c}", [np.array([b.y, b.x], dtype=np.int32) for b in boxes])
            pipe.feed_input(f"shape{c}", [np.array([b.h, b.w], dtype=np.int32) for b in boxes])
            pipe.feed_input(f"flip{c}", [np.array(int(b.flip), dtype=np.int32) for b in boxes])
        self._last = batch

    def _submit(self, batch: _Batch) -> None:
        """Feed one batch and run it. A new pipeline's first run prefetches PREFETCH iterations, so it waits
        until that many batches are fed; later runs take one each, keeping sampler order."""
        if self._pipe is None:
            self._build()
        self._feed(batch)
        if self._primed:
            self._pipe.schedule_run()
            return
        self._pending += 1
        if self._pending == PREFETCH:
            self._pipe.schedule_run()
            self._primed, self._pending = True, 0

    def _flush(self) -> None:
        """End of data before the first run: repeat the last batch to complete the prefetch (outputs dropped)."""
        while not self._primed and self._pending:
            self._dummies += 1
            self._submit(self._last)

    def _to_torch(self, outputs) -> torch.Tensor:
        """DALI's output (N, k, F, S, S, C) uint8 -> a torch tensor on ``self.device``."""
        tensor = outputs[0].as_tensor()
        x = torch.from_dlpack(tensor)
        if not getattr(self._pipe, "exec_dynamic", False):
            # the legacy executor reuses its output buffers on the next run: copy out of them
            x = x.clone()
        # the dynamic executor (DALI's default) hands the buffer over: zero-copy
        if x.device != self.device:
            x = x.to(self.device)
        return x

    def _collate(self, batch: _Batch, clips: torch.Tensor) -> dict:
        """clips (N, k, F, S, S, C) uint8 -> the batch dict of ``collate_clips`` (F = T, or 2T for dense motion)."""
        k, t = self.spec.repeated, self.spec.num_frames
        clips = clips.flatten(0, 1)  # (items * k, F, S, S, C): the k crops of item i at rows i*k .. i*k+k-1
        out = {"video": clips if not self.spec.dense else clips[:, :t].contiguous()}
        if self.spec.dense:
            out["next_video"] = clips[:, t:].contiguous()
        if batch.items[0].codes is not None:  # cached codes, planned with the crops: (items * k, T, S/p, S/p)
            codes = torch.cat([it.codes for it in batch.items])
            # pinned: a copy from pageable memory would make the step's host-to-device copy wait for the stream
            out["codes"] = codes.pin_memory() if self.gpu else codes
        if batch.items[0].trajectories is not None:  # planned with the crops: (items * k, T/t, S/8, S/8, ...)
            for j, key in enumerate(("trajectories", "trajectory_valid")):
                v = torch.cat([it.trajectories[j] for it in batch.items])
                out[key] = v.pin_memory() if self.gpu else v
        out["label"] = torch.tensor([it.plan.label for it in batch.items], dtype=torch.int64).repeat_interleave(k)
        out["index"] = torch.tensor([it.plan.index for it in batch.items], dtype=torch.int64).repeat_interleave(k)
        out["bad"] = [b for it in batch.items for b in it.bad]
        return out

    # ------------------------------------------------------------------ recovery from DALI errors

    def _recover(self, batch: _Batch, exc: BaseException) -> None:
        """DALI failed on ``batch``: find the files PyAV cannot decode either (all of them if none), report
        and replace them in place (the next attempts of their keys)."""
        reason = _dali_reason(exc)
        failed = []
        for slot, it in enumerate(batch.items):
            try:
                decode_pyav(it.plan.path, it.frames, self.decode_threads)
            except BadVideo as err:
                failed.append((slot, str(err)))
        if not failed:
            self._blind += 1
            if self._blind >= MAX_BLIND_FAILURES:
                # failing on files that decode elsewhere, again and again: DALI itself is broken (GPU out of
                # memory, driver, installation), not the data; blaming more files would only hide that
                raise RuntimeError(
                    f"DALI failed {self._blind} times in a row on batches whose files PyAV decodes ({reason}); "
                    "this is not bad data: check the GPU memory, the driver and the DALI installation, or use "
                    "data.backend=pyav"
                ) from exc
            failed = [(slot, f"DALI could not decode the batch: {reason}") for slot in range(len(batch.items))]
        log.warning("DALI failed on a batch (%s); replacing %d of its %d files", reason, len(failed), len(batch.items))
        for slot, why in failed:
            it = batch.items[slot]
            self.dataset.remember_bad(it.plan.path, why)
            it.bad.append((it.plan.path, why))
            batch.items[slot] = self._plan_item(it.index, it.epoch, it.attempt + 1, it.bad)

    def _restart(self, inflight: deque[_Batch]) -> None:
        # After a failed run DALI may declare the pipeline no longer valid, and the runs queued behind the failed
        # one cannot be told apart from stale ones reliably: a fresh pipeline fed the in-flight batches again (the
        # failed one re-planned) keeps the sampler order exact, for the price of one pipeline build per error.
        self._pipe = None
        for batch in inflight:
            self._submit(batch)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        token = object()
        if self._active is not None:
            # an earlier iteration is still open (stopped early, not yet closed): its outputs are queued in DALI
            self._pipe = None
        self._active = token
        keys = iter(self.sampler)
        inflight: deque[_Batch] = deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(inflight) < PREFETCH:
                    step = next(keys, None)
                    if step is None:
                        exhausted = True
                        break
                    batch = self._plan_batch(step)
                    inflight.append(batch)
                    self._submit(batch)
                if not inflight:
                    break
                if exhausted:
                    self._flush()
                try:
                    clips = self._to_torch(self._pipe.share_outputs())
                    self._pipe.release_outputs()
                except (RuntimeError, IndexError, ValueError) as exc:  # what DALI raises for a failed iteration
                    self._recover(inflight[0], exc)
                    self._restart(inflight)
                    continue
                self._blind = 0
                yield self._collate(inflight.popleft(), clips)
            if self._dummies:
                try:  # drop the outputs of the prefetch repeats
                    for _ in range(self._dummies):
                        self._pipe.share_outputs()
                        self._pipe.release_outputs()
                    self._dummies = 0
                except (RuntimeError, IndexError, ValueError):
                    pass  # a repeat of a batch already delivered: the finally below discards the pipeline
        finally:
            if self._active is token:
                self._active = None
                if inflight or self._dummies:
                    # stopped early (or failed): outputs left in DALI's queue would come out of the next iteration
                    self._pipe = None
