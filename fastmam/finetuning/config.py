"""The typed config of a fine-tuning run (``fastmam/finetune.py``): the same system as pretraining's ``Config``.

Presets ``configs/ft_*.yaml``, ``key.sub=value`` overrides, unknown keys rejected, cross-field rules checked, the
DeepSpeed JSON derived by ``fastmam.config.deepspeed_config``. Sections shared with pretraining keep their meaning
(``model``: the encoder's architecture, which must match the pretrained checkpoint; ``deepspeed``, ``checkpoint``,
``logging``, ``safety``); the others are fine-tuning's own.

Defaults are VideoMAE's ViT-B fine-tuning recipe (``run_class_finetuning.py`` and its ViT-B scripts): AdamW
(0.9, 0.999), weight decay 0.05 (none on 1-D parameters and biases), layer-wise lr decay 0.75 (patch embedding at
layer 0), drop path 0.1, head = LayerNorm over the mean of all tokens + Linear initialised at scale 0.001,
lr = base_lr x global batch / 256, 5 warmup epochs + cosine to min_lr, label smoothing 0.1, mixup 0.8 / cutmix 1.0
(soft-target cross-entropy), RandAugment ``rand-m7-n4-mstd0.5-inc1`` and random erasing 0.25, the same draw on every
frame of a clip, random resized crops, no gradient clipping.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..config import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    SafetyConfig,
    _Section,
    check_encoder_geometry,
)


class InitConfig(_Section):
    """The pretrained encoder the classifier starts from.

    ``checkpoint``: a fastmam pretraining run (its folder, ``checkpoints/`` or one checkpoint; any ZeRO stage; the
    newest complete checkpoint unless ``tag``), a folder written by ``python -m fastmam.export`` (either format), or a
    file of the VideoMAE repository (``.pth`` with ``model`` / ``module``, ``encoder.`` / ``backbone.`` prefixes,
    or ``.safetensors`` / ``.bin`` with Hugging Face ``VideoMAEModel`` names). '' = random initialisation (training
    from scratch; a warning says so). Loading is strict: missing, unexpected and misshaped keys are named.
    ``finetuned``: what a checkpoint that already has a classifier head (a fine-tuned one) does: ``error`` (default:
    it was probably passed by mistake), or ``drop_head`` (start from its encoder, a new head; e.g. K400 -> UCF101)."""

    checkpoint: str = Field("", description="pretrained encoder: run folder, exported folder or VideoMAE file")
    tag: str = Field("", description="checkpoint tag of a fastmam run (step_<N>); '' = the newest complete one")
    finetuned: Literal["error", "drop_head"] = "error"


class ClassifierConfig(_Section):
    """VideoMAE's fine-tuning head: ``fc_norm`` (LayerNorm) over the mean of all tokens, dropout, Linear.
    ``pool: max`` takes the per-channel maximum over the tokens instead of the mean."""

    num_classes: int = Field(400, ge=2, description="classes of the head; the lists' labels must be below it")
    drop_path: float = Field(0.1, ge=0.0, lt=1.0, description="stochastic depth, rising linearly to this at the end")
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the Linear (VideoMAE fc_drop_rate)")
    head_init_scale: float = Field(0.001, gt=0.0, description="scale of the Linear's initial weights and bias")
    pool: Literal["mean", "max"] = Field(
        "mean", description="how the tokens become one vector before fc_norm: mean (VideoMAE's use_mean_pooling, the "
        "default) or max (per channel over all tokens: a small moving object on a large varying background, e.g. the "
        "synthetic clips of ft_tiny, where a mean-pooled ViT stays at chance for thousands of steps)"
    )
    pos_embed: Literal["sinusoid", "learned"] = Field(
        "sinusoid", description="sinusoid: the fixed table, rebuilt for this geometry; learned: a parameter, from the "
        "checkpoint's pos_embed (interpolated to this geometry) or the sinusoid table when it has none"
    )


RANDAUG_PATTERN = re.compile(r"^rand(-(m\d+(\.\d+)?|n\d+|mstd\d+(\.\d+)?|inc[01]))*$")


class AugmentConfig(_Section):
    """Training augmentation. RandAugment and erasing draw once per clip and act identically on every frame
    (``torchvision.transforms.v2`` on a ``tv_tensors.Video``); mixup / cutmix (timm's ``Mixup``) draw once per
    batch and cut the same box out of every frame."""

    randaug: str = Field("rand-m7-n4-mstd0.5-inc1", description="timm-style RandAugment spec; '' = off")
    erasing: float = Field(0.25, ge=0.0, le=1.0, description="probability of random erasing (one box per clip)")
    erasing_mode: Literal["pixel", "const"] = Field(
        "pixel", description="pixel: the box gets per-pixel normal noise in normalized space (timm's 'pixel'); const: 0"
    )
    mixup: float = Field(0.8, ge=0.0, description="mixup Beta(alpha, alpha); 0 = off")
    cutmix: float = Field(1.0, ge=0.0, description="cutmix Beta(alpha, alpha); 0 = off")
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0, description="probability of mixup or cutmix per batch")
    mixup_switch_prob: float = Field(0.5, ge=0.0, le=1.0, description="probability of cutmix when both are on")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _randaug_spec(self):
        if self.randaug and not RANDAUG_PATTERN.match(self.randaug):
            raise ValueError(
                f"augment.randaug='{self.randaug}' is not a RandAugment spec like 'rand-m7-n4-mstd0.5-inc1' "
                "(m: magnitude 0-10, n: ops per clip, mstd: magnitude noise, inc1: increasing ops); '' turns it off"
            )
        if self.randaug and "inc0" in self.randaug.split("-"):
            raise ValueError("augment.randaug: inc0 is not supported: torchvision's RandAugment ops grow stronger with "
                             "the magnitude (timm's inc1 set); drop '-inc0'")
        return self

    def randaug_params(self) -> dict | None:
        """{'num_ops', 'magnitude', 'magnitude_std'} of the spec (timm's defaults n=2, m=10, mstd=0), None when off."""
        if not self.randaug:
            return None
        out = {"num_ops": 2, "magnitude": 10.0, "magnitude_std": 0.0}
        for part in self.randaug.split("-")[1:]:
            if part.startswith("mstd"):
                out["magnitude_std"] = float(part[4:])
            elif part.startswith("m"):
                out["magnitude"] = float(part[1:])
            elif part.startswith("n"):
                out["num_ops"] = int(part[1:])
        return out

    @property
    def mixes(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


class FinetuneDataConfig(DataConfig):
    """Pretraining's data keys (frames, stride, crops, lists, loader) plus fine-tuning's: the validation and test
    lists, TSN segment sampling, and the synthetic stand-in (moving shapes labelled by their motion class).

    ``source: synthetic``: raw clips of ``synthetic_frames`` frames at ``synthetic_size`` pixels (``SyntheticShapes``),
    items 0 .. num_samples-1 for training, the next ``synthetic_val`` for validation and the next ``synthetic_test``
    for the test; frames and crops are then sampled from them as from real videos."""

    crop: Literal["multiscale", "random_resized", "center"] = "random_resized"
    val_list: str = Field("", description="annotation list of the validation videos ('' = none)")
    test_list: str = Field("", description="annotation list of the test videos (multi-view test)")
    sampling: Literal["dense", "segment"] = Field(
        "dense", description="dense: num_frames at stride (K400, UCF101, HMDB51); segment: TSN, one frame per "
        "segment of the whole video (SSv2)"
    )
    repeated_sampling: int = Field(1, ge=1, description="augmented clips per decoded video (VideoMAE num_sample)")
    synthetic_frames: int = Field(24, ge=1, description="raw frames of a synthetic video (source: synthetic)")
    synthetic_size: int = Field(80, ge=8, description="raw side of a synthetic video (source: synthetic)")
    synthetic_val: int = Field(256, ge=0, description="held-out synthetic videos for validation")
    synthetic_test: int = Field(512, ge=0, description="held-out synthetic videos for the multi-view test")


class FinetuneOptimConfig(OptimConfig):
    base_lr: float = Field(1e-3, gt=0, description="lr per 256 clips of global batch")
    min_lr: float = Field(1e-6, ge=0, description="final lr per 256 clips")
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(0.0, ge=0, description="max global grad norm; 0 disables (VideoMAE: none)")
    layer_decay: float = Field(0.75, gt=0.0, le=1.0, description="lr x layer_decay ** (depth + 1 - layer)")


class FinetuneScheduleConfig(_Section):
    epochs: float = Field(75.0, gt=0, description="passes over the training list")
    warmup_epochs: float = Field(5.0, ge=0)
    steps: int = Field(0, ge=0, description="optimizer steps; 0 = epochs x steps per epoch")


class TestConfig(_Section):
    """The multi-view test at the end of training (and ``--test-only``), and the validation pass during it.

    Test: ``clips`` temporal clips x ``crops`` spatial crops per video, softmax per view, then the mean; every video
    counted once across ranks. Validation: one centre view per video, every ``val_every_epochs``: logged as
    ``val_centre_top1`` -- not the final multi-view number."""

    clips: int = Field(5, ge=1, description="temporal clips per test video (VideoMAE: 5 K400, 2 SSv2)")
    crops: int = Field(3, ge=1, description="spatial crops per clip")
    batch_size: int = Field(4, ge=1, description="videos per forward pass (each with clips x crops views)")
    val_every_epochs: float = Field(1.0, ge=0.0, description="validation interval in epochs; 0 = off")
    at_end: bool = Field(True, description="run the multi-view test when training ends")


class FinetuneConfig(_Section):
    """A fine-tuning run."""

    KIND: ClassVar[str] = "fine-tuning"
    MARKS: ClassVar[tuple[str, ...]] = ("init", "classifier", "augment", "test")

    name: str = "ft_vit_b"
    seed: int = 0
    output_dir: str = "runs/{name}"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = ModelConfig()
    init: InitConfig = InitConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    augment: AugmentConfig = AugmentConfig()
    data: FinetuneDataConfig = FinetuneDataConfig()
    optim: FinetuneOptimConfig = FinetuneOptimConfig()
    schedule: FinetuneScheduleConfig = FinetuneScheduleConfig()
    test: TestConfig = TestConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    safety: SafetyConfig = SafetyConfig()

    @model_validator(mode="after")
    def _rules(self):
        m, d = self.model, self.data
        check_encoder_geometry(m, d)
        if self.augment.mixes and d.batch_size % 2:
            raise ValueError(f"data.batch_size={d.batch_size} must be even with mixup/cutmix (each clip is mixed with "
                             "its mirror in the batch); or set augment.mixup=0 augment.cutmix=0")
        if d.source == "synthetic" and d.synthetic_frames < d.num_frames:
            raise ValueError(f"data.synthetic_frames={d.synthetic_frames} is shorter than data.num_frames="
                             f"{d.num_frames}")
        if d.source == "synthetic" and d.synthetic_size < d.img_size:
            raise ValueError(f"data.synthetic_size={d.synthetic_size} is smaller than data.img_size={d.img_size}")
        if self.schedule.warmup_epochs > self.schedule.epochs:
            raise ValueError(f"schedule.warmup_epochs={self.schedule.warmup_epochs} exceeds schedule.epochs="
                             f"{self.schedule.epochs}")
        if self.optim.min_lr > self.optim.base_lr:
            raise ValueError(f"optim.min_lr={self.optim.min_lr} exceeds optim.base_lr={self.optim.base_lr}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    @property
    def num_tokens(self) -> int:
        m, d = self.model, self.data
        return (d.num_frames // m.tubelet) * (d.img_size // m.patch) ** 2


def schedule_steps(cfg: FinetuneConfig, train_videos: int, world_size: int) -> tuple[int, int, int]:
    """(steps per epoch, total optimizer steps, warmup steps). An epoch is one pass over the training videos:
    ``train_videos // (videos per optimizer step)``, each video giving ``repeated_sampling`` clips (VideoMAE's
    ``len(dataset) // total_batch_size`` counts its ``num_sample`` clips of a video as one sample too)."""
    d = cfg.data
    videos_per_step = d.batch_size // d.repeated_sampling * cfg.deepspeed.gradient_accumulation_steps * world_size
    per_epoch = train_videos // videos_per_step
    if per_epoch < 1:
        from ..config import ConfigError

        raise ConfigError(f"{train_videos} training videos make less than one optimizer step of {videos_per_step} "
                         "videos; add videos or lower data.batch_size")
    total = cfg.schedule.steps or max(1, math.ceil(cfg.schedule.epochs * per_epoch))
    warmup = min(total, round(cfg.schedule.warmup_epochs * per_epoch))
    return per_epoch, total, warmup
