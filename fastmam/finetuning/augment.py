"""Fine-tuning augmentation, one random draw per clip (or per batch) applied to every frame alike.

In the loader workers, per clip (``ClipAugment``): RandAugment, ``torchvision.transforms.v2.RandAugment`` on a
``tv_tensors.Video`` (one set of ops and magnitudes for all frames of a clip). VideoMAE's default
``rand-m7-n4-mstd0.5-inc1`` maps to 4 ops at magnitude 7 of 10 (``num_magnitude_bins=101``, index 10 x m), with the
magnitude drawn per clip from N(m, mstd) and clipped to [0, 10]. Differences from timm's policy, which VideoMAE
calls frame by frame with shared parameters: torchvision's op set (Identity, ShearX/Y, TranslateX/Y, Rotate,
Brightness, Color, Contrast, Sharpness, Posterize, Solarize, AutoContrast, Equalize: the increasing kind, so
``inc1`` only) has no Invert and SolarizeAdd, and the magnitude noise is drawn per clip rather than per op.
Applied to the cropped clip (VideoMAE applies it before the crop); the fill is the mean colour.

On the device, per batch (``BatchAugment``), in VideoMAE's order:

- random erasing (probability ``augment.erasing``, one box per clip drawn by ``v2.RandomErasing``: area 2-33%,
  aspect 0.3-3.3), the same box in every frame -- VideoMAE calls timm's ``RandomErasing`` on a (T, C, H, W) clip,
  which draws a box per frame; ``pixel`` mode fills it with per-pixel N(0, 1) noise in normalized space;
- mixup / cutmix (timm's ``Mixup``, batch mode: one lambda per batch, each clip mixed with its mirror in the batch,
  ``switch_prob`` between the two) with label smoothing in the soft targets. timm cuts its box from the last two
  dims of a 4-D batch; VideoMAE passes (B, C, T, H, W), where that box lands on (T, H); here the clip is viewed as
  (B, T*C, H, W), so the box is spatial and the same in every frame.

Without mixup and cutmix the targets are the label-smoothed one-hot vectors. The loss is the soft-target
cross-entropy of timm either way. Every draw comes from a key (the worker's from (seed, index, epoch, attempt,
crop), the device's from (seed, step, micro-step, rank)), so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .config import AugmentConfig, FinetuneConfig


def key_of(*parts: int) -> int:
    """A 63-bit seed, a pure function of ``parts``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded_global_rngs(key: int):
    """torch's CPU generator and numpy's global one seeded by ``key`` inside, both restored after (torchvision's
    transforms draw from the former, timm's Mixup from the latter)."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        np.random.seed(key % 2**32)
        try:
            yield
        finally:
            np.random.set_state(state)


class ClipAugment:
    """RandAugment of one clip: ``(clip (T, H, W, C) uint8, key) -> (T, H, W, C) uint8``."""

    def __init__(self, cfg: AugmentConfig, mean: tuple[float, float, float]):
        from torchvision.transforms import v2

        params = cfg.randaug_params()
        if params is None:
            raise ValueError("augment.randaug is off")
        self.magnitude, self.std = params["magnitude"], params["magnitude_std"]
        fill = [round(255 * m) for m in mean]
        self.transform = v2.RandAugment(num_ops=params["num_ops"], magnitude=round(10 * self.magnitude),
                                        num_magnitude_bins=101, interpolation=v2.InterpolationMode.BILINEAR,
                                        fill=fill)

    def __call__(self, clip: torch.Tensor, key: int) -> torch.Tensor:
        from torchvision import tv_tensors

        rng = np.random.default_rng(key)
        m = self.magnitude if self.std <= 0 else float(np.clip(rng.normal(self.magnitude, self.std), 0, 10))
        self.transform.magnitude = round(10 * m)
        video = tv_tensors.Video(clip.permute(0, 3, 1, 2))  # (T, C, H, W): one draw for every frame
        with seeded_global_rngs(key):
            out = self.transform(video)
        return out.as_subclass(torch.Tensor).permute(0, 2, 3, 1).contiguous()


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """labels (B,) -> (B, classes) float32: 1 - smoothing + smoothing / classes on the label, smoothing / classes
    elsewhere (timm's ``mixup_target`` without a mix)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class BatchAugment:
    """Erasing and mixup / cutmix of a batch on the device:
    ``(clip (B, T, H, W, C) uint8, labels (B,), key) -> (pixels (B, T, H, W, C) float32 in pixel units, targets
    (B, classes) float32)``. Pixels stay in [0, 255] units (the classifier normalizes them); erased boxes hold
    noise that is N(0, 1) after that normalization."""

    def __init__(self, cfg: FinetuneConfig):
        a = cfg.augment
        self.cfg = a
        self.num_classes = cfg.classifier.num_classes
        self.mean = torch.tensor(cfg.data.mean) * 255
        self.std = torch.tensor(cfg.data.std) * 255
        self.eraser = None
        if a.erasing > 0:
            from torchvision.transforms import v2

            self.eraser = v2.RandomErasing(p=a.erasing, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value=0.0)
        self.mixup = None
        if a.mixes:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                               switch_prob=a.mixup_switch_prob, mode="batch", label_smoothing=a.label_smoothing,
                               num_classes=self.num_classes)

    def erase_masks(self, batch: int, height: int, width: int) -> torch.Tensor:
        """(B, H, W) bool, True inside each clip's erased box (none where the draw said no). Global RNGs."""
        ones = torch.ones(1, height, width)
        return torch.stack([self.eraser(ones)[0] == 0 for _ in range(batch)])

    def __call__(self, clip: torch.Tensor, labels: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, h, w, c = clip.shape
        x = clip.float()
        with seeded_global_rngs(key):
            if self.eraser is not None:
                boxes = self.erase_masks(b, h, w).to(clip.device)  # (B, H, W)
                if self.cfg.erasing_mode == "pixel":
                    g = torch.Generator(device=clip.device).manual_seed(key)
                    noise = torch.randn(x.shape, generator=g, device=clip.device)
                    fill = self.mean.to(x.device) + self.std.to(x.device) * noise
                else:
                    fill = self.mean.to(x.device).expand_as(x)
                x = torch.where(boxes[:, None, :, :, None], fill, x)
            if self.mixup is None:
                return x, smooth_one_hot(labels, self.num_classes, self.cfg.label_smoothing)
            # (B, T, H, W, C) -> (B, T*C, H, W): timm cuts its box from the last two dims
            flat = x.permute(0, 1, 4, 2, 3).reshape(b, t * c, h, w).contiguous()
            flat, targets = self.mixup(flat, labels.long())
            x = flat.reshape(b, t, c, h, w).permute(0, 1, 3, 4, 2).contiguous()
        return x, targets.float()


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits)): timm's ``SoftTargetCrossEntropy`` on fp32 logits."""
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy()(logits.float(), targets)
