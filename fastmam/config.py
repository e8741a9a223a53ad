"""The one typed config of fastmam.

A run is described by one ``Config`` (pydantic, unknown keys rejected). It is read from a
YAML preset (``configs/<name>.yaml`` or any path), then ``key.sub=value`` overrides from the
command line are applied, then the whole is validated, cross-field rules included. The
DeepSpeed JSON is derived from it by ``deepspeed_config`` and nowhere else.

Defaults are the ViT-B MAM2 recipe at 16x224 (tubelet 2, patch 16, 90% tube masking,
AdamW 0.9/0.95, base lr 1.5e-4 per 256 clips); presets change only what differs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


def _preset_dir() -> Path:
    """``configs/`` of a source checkout or editable install, else the copy a wheel installs as fastmam/presets."""
    here = Path(__file__).resolve().parent
    source = here.parent / "configs"
    return source if (source / "tiny.yaml").is_file() else here / "presets"


#: folder of the shipped presets (``--config tiny`` means ``<PRESET_DIR>/tiny.yaml``)
PRESET_DIR = _preset_dir()

#: masking.decoder_ratio's default (VideoMAE V2's 0.5)
DEFAULT_DECODER_RATIO = 0.5

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message says which and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Encoder-regressor-decoder video ViT. ``regressor_depth: 0`` is VideoMAE's layout:
    the decoder sees visible latents and mask tokens together; ``> 0`` is MAM2's: a CAE-style
    cross-attention regressor predicts masked latents and the decoders see only those."""

    tubelet: int = Field(2, ge=1, description="frames per token (t)")
    patch: int = Field(16, ge=1, description="patch side in pixels (p)")
    embed_dim: int = Field(768, ge=1)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    qkv_bias: bool = True
    regressor_depth: int = Field(2, ge=0, description="cross-attention regressor layers; 0 = VideoMAE (none)")
    decoder_dim: int = Field(384, ge=1)
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(6, ge=1)
    shared_decoder: bool = Field(
        False, description="MME's layout: ONE decoder whose output feeds one Linear-GELU-Linear head per target "
        "(hidden width decoder_dim); false: a decoder per target (MAM2), each with a linear head"
    )
    activation_checkpointing: bool = False
    attention: Literal["sdpa", "flash_attn", "xformers"] = Field(
        "sdpa", description="attention op: PyTorch SDPA (flash kernel first on CUDA), or the flash-attn / xformers "
        "packages (CUDA only; checked when the model is built)"
    )


class MaskingConfig(_Section):
    """The encoder's mask (``kind``, ``ratio``) and VideoMAE V2's decoder masking (``decoder``, ``decoder_ratio``):
    the regressor and decoders, the targets and the loss then cover only ``ids_decode``, a subset of the masked
    tokens (``decoder_ratio`` of them dropped) chosen by a 2x2 ``running_cell`` that shifts every time slice
    (V2's pattern; ratio 0.25, 0.5 or 0.75 on an even patch grid) or at ``random``. Rules: ``fastmam.ops.masking``."""

    kind: Literal["tube", "random"] = "tube"
    ratio: float = Field(0.9, gt=0.0, lt=1.0, description="fraction of tokens hidden")
    decoder: Literal["none", "running_cell", "random"] = Field(
        "none", description="decoder masking: which masked tokens the decoders reconstruct (none = all of them)"
    )
    decoder_ratio: float = Field(
        DEFAULT_DECODER_RATIO, gt=0.0, lt=1.0, description="fraction of the masked tokens the decoders drop"
    )

    @model_validator(mode="after")
    def _decoder_rules(self):
        if self.decoder == "none" and self.decoder_ratio != DEFAULT_DECODER_RATIO:
            raise ValueError(
                f"masking.decoder_ratio={self.decoder_ratio} has no effect with masking.decoder='none'; set "
                "masking.decoder=running_cell (VideoMAE V2's pattern) or random, or drop masking.decoder_ratio"
            )
        if self.decoder == "running_cell" and self.decoder_ratio not in (0.25, 0.5, 0.75):
            raise ValueError(
                f"masking.decoder='running_cell' drops int(4 * ratio) of the 4 positions of a 2x2 cell, so "
                f"masking.decoder_ratio must be 0.25, 0.5 or 0.75 (got {self.decoder_ratio}); "
                "masking.decoder=random takes any ratio"
            )
        return self


class VQGANConfig(_Section):
    """A taming-transformers VQGAN (its ``VQModel``'s encoder, ``quant_conv`` and quantizer) as the
    appearance tokenizer. The architecture keys are taming's ``ddconfig`` / ``embed_dim`` / ``n_embed``
    and must match the checkpoint's (its ``configs/model.yaml``); the defaults are those of the published
    ImageNet f16 models, which differ only in ``n_embed`` (1024 or 16384). ``len(ch_mult) - 1``
    halvings give the downsampling factor f (16 here), which must equal ``model.patch``."""

    checkpoint: str = Field("", description="taming checkpoint (last.ckpt, or a bare state_dict) of this VQGAN")
    n_embed: int = Field(16384, ge=2, description="codebook size: the classes of the appearance head")
    embed_dim: int = Field(256, ge=1, description="codeword dimension")
    z_channels: int = Field(256, ge=1)
    ch: int = Field(128, ge=1, description="base channels (a multiple of 32: taming's GroupNorm has 32 groups)")
    ch_mult: tuple[int, ...] = Field((1, 1, 2, 2, 4), min_length=1)
    num_res_blocks: int = Field(2, ge=1)
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = Field(256, ge=1, description="taming's training resolution: decides which levels attend")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="encoder math: auto = bf16 autocast on GPU, fp32 on CPU; code distances are always fp32"
    )
    encode_chunk: int = Field(64, ge=0, description="frames per encoder call (bounds its activation memory); 0 = all")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @model_validator(mode="after")
    def _group_norm_channels(self):
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(
                f"channels {sorted(set(bad))} (ch={self.ch} x ch_mult) are not multiples of 32, which taming's "
                "GroupNorm(32 groups) needs; the published f16 models use ch=128"
            )
        return self


class TargetsConfig(_Section):
    """What the two decoders reconstruct.

    appearance: ``pixel`` (VideoMAE's normalized pixels, MSE), ``vqgan`` (codes of a taming-transformers
    VQGAN, ``targets.vqgan``; cross-entropy, MAM2's target) or ``random_codes`` (codes of a fixed random
    tokenizer with ``codebook_size`` codes; exercises the code path with no checkpoint).
    code_frame: which frames of each tubelet get codes: ``first``, ``middle``, or ``all`` (t codes per
    token, predicted from t learned projections of the appearance decoder's output).
    codes: ``online`` (the tokenizer runs inside the step) or ``cached`` (``vqgan`` only: codes precomputed by
    ``python -m fastmam.data.code_cache`` into ``code_cache``, read with the video through the same crop and flip).
    motion: ``rgb_diff`` (differences of consecutive frames inside each tubelet, MSE),
    ``rgb_diff_dense`` (each sampled frame minus the raw frame right after it, which the video
    loaders supply as ``next_video``), ``trajectory`` (MME: where the token's points on the 8-px grid move over the
    next ``trajectory_length`` frames, ``ops.trajectory_target`` normalized by ``trajectory_norm``, masked MSE
    ``ops.trajectory_loss`` over the valid points; the loader supplies the trajectories: the synthetic source from
    its shapes' true motion, the video source from ``trajectory_cache``, extracted once by ``python -m
    fastmam.data.trajectories`` and mapped through each clip's crop, resize and flip), or ``none``.
    appearance ``hog`` (MME's shape target): ``ops.hog_target`` of each tubelet's first frame -- 9 orientation bins x
    8-px cells x RGB, L2-normalized per token (108 values for p=16) -- regressed with MSE by a linear head.
    trajectory_norm: ``patch_std`` (MME's scripts' ``--traj_norm PatchStd``, the default: per-token z-score, removes
    the patch's common motion) or ``global`` (divide by 16 px per step, clipped: keeps the absolute motion).
    """

    appearance: Literal["pixel", "vqgan", "random_codes", "hog"] = "pixel"
    normalize_pixels: bool = True
    codebook_size: int = Field(
        8192, ge=2, description="random_codes' codebook; with vqgan the codebook is targets.vqgan.n_embed"
    )
    code_frame: Literal["first", "middle", "all"] = "first"
    codes: Literal["online", "cached"] = "online"
    code_cache: str = Field("", description="folder written by `python -m fastmam.data.code_cache` (codes: cached)")
    vqgan: VQGANConfig = VQGANConfig()
    motion: Literal["rgb_diff", "rgb_diff_dense", "trajectory", "none"] = "rgb_diff"
    normalize_motion: bool = False
    trajectory_length: int = Field(4, ge=1, description="trajectory: steps L each point is followed (MME: 4)")
    trajectory_norm: Literal["patch_std", "global"] = Field(
        "patch_std", description="trajectory: per-token z-score (MME's PatchStd) or a global bound of 16 px/step"
    )
    trajectory_cache: str = Field(
        "", description="folder written by `python -m fastmam.data.trajectories` (motion: trajectory, source: video)"
    )

    @property
    def uses_codes(self) -> bool:
        """Whether the appearance target is a code index per token (cross-entropy), not a float vector (MSE)."""
        return self.appearance in ("vqgan", "random_codes")

    @property
    def num_codes(self) -> int:
        """Classes of the appearance head: the VQGAN's codebook, or random_codes' ``codebook_size``."""
        return self.vqgan.n_embed if self.appearance == "vqgan" else self.codebook_size

    @model_validator(mode="after")
    def _code_rules(self):
        if self.appearance == "vqgan" and "codebook_size" in self.model_fields_set \
                and self.codebook_size != self.vqgan.n_embed:
            raise ValueError(
                f"targets.codebook_size={self.codebook_size} contradicts targets.vqgan.n_embed={self.vqgan.n_embed}: "
                "with appearance='vqgan' the codebook is the VQGAN's; drop targets.codebook_size"
            )
        if self.codes == "cached":
            if self.appearance != "vqgan":
                raise ValueError(f"targets.codes='cached' needs targets.appearance='vqgan' (got '{self.appearance}')")
            if not self.code_cache:
                raise ValueError(
                    "targets.codes='cached' needs targets.code_cache, a folder written by "
                    "`python -m fastmam.data.code_cache --config <this config> --out <folder>`"
                )
        return self


class LossConfig(_Section):
    appearance_weight: float = Field(1.0, ge=0.0)
    motion_weight: float = Field(1.0, ge=0.0)


class DataConfig(_Section):
    """Where clips come from and how they are sampled (DESIGN §7; semantics in ``fastmam.data.sampling``).

    source ``synthetic``: procedural moving shapes, no files. source ``video``: the videos of
    ``train_list`` (a VideoMAE-style list; ``fastmam.data.annotations`` names the formats), decoded
    by ``backend``: ``pyav`` / ``decord`` in DataLoader workers on the CPU, or ``dali`` (GPU decoding;
    its CPU mode reads only VP8/VP9/MJPEG)."""

    source: Literal["synthetic", "video"] = "synthetic"
    backend: Literal["pyav", "decord", "dali"] = Field("pyav", description="video decoder (source: video)")
    train_list: str = Field("", description="annotation list of the training videos (source: video)")
    data_root: str = Field("", description="folder the list's relative paths start from; '' = the list's folder")
    list_format: Literal["auto", "videomae", "ucf101", "hmdb51", "ssv2_json"] = "auto"
    hmdb51_split: int = Field(1, ge=1, le=3)
    num_frames: int = Field(16, ge=1)
    stride: int = Field(4, ge=1, description="frame stride s: T frames at stride s from a random start")
    img_size: int = Field(224, ge=1)
    crop: Literal["multiscale", "random_resized", "center"] = "multiscale"
    crop_scales: tuple[float, ...] = Field((1.0, 0.875, 0.75, 0.66), min_length=1)
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = Field(False, description="random horizontal flip; keep off where direction is the label (SSv2)")
    repeated_sampling: int = Field(1, ge=1, description="crops (and masks) per decoded video; divides batch_size")
    short_videos: Literal["clamp", "reduce_stride", "skip"] = Field(
        "clamp", description="videos shorter than num_frames*stride: repeat the last frame, lower the stride, or skip"
    )
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, description="stop when more of the list is unreadable")
    decode_threads: int = Field(1, ge=1, description="decoder threads per loader worker")
    batch_size: int = Field(32, ge=1, description="clips per rank per micro-step")
    num_samples: int = Field(100_000, ge=1, description="synthetic: clips per epoch")
    num_workers: int = Field(2, ge=0, description="DataLoader workers (pyav/decord); DALI's CPU threads (dali)")
    pin_memory: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @model_validator(mode="after")
    def _video_rules(self):
        if self.source == "video" and not self.train_list:
            raise ValueError("data.source='video' needs data.train_list (an annotation list of the videos)")
        if self.batch_size % self.repeated_sampling:
            raise ValueError(
                f"data.batch_size={self.batch_size} must be a multiple of data.repeated_sampling="
                f"{self.repeated_sampling} (each decoded video gives that many clips of the batch)"
            )
        if not all(0 < s <= 1 for s in self.crop_scales):
            raise ValueError(f"data.crop_scales must be in (0, 1], got {self.crop_scales}")
        if not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ValueError(f"data.rrc_scale must satisfy 0 < min <= max <= 1, got {self.rrc_scale}")
        if not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ValueError(f"data.rrc_ratio must satisfy 0 < min <= max, got {self.rrc_ratio}")
        return self


class OptimConfig(_Section):
    base_lr: float = Field(1.5e-4, gt=0, description="lr per 256 clips of global batch")
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables")

    @model_validator(mode="after")
    def _betas_in_range(self):
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {self.betas}")
        return self


class ScheduleConfig(_Section):
    steps: int = Field(100_000, ge=1, description="optimizer steps in the run")
    warmup_steps: int = Field(5_000, ge=0)


class DeepSpeedConfig(_Section):
    """ZeRO stage, precision and offload. ZeRO-1 partitions the optimizer state across ranks, ZeRO-2 also the
    gradients, ZeRO-3 also the weights; offloading moves the optimizer state (ZeRO >= 1) and the weights
    (ZeRO-3) to CPU memory, trading step time for GPU memory."""

    zero_stage: int = Field(0, ge=0, le=3)
    gradient_accumulation_steps: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    offload_optimizer: bool = Field(False, description="optimizer state and step on the CPU (ZeRO >= 1)")
    offload_params: bool = Field(False, description="weights in CPU memory between uses (ZeRO-3)")

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_optimizer and self.zero_stage < 1:
            raise ValueError(
                f"deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1 (got {self.zero_stage}): "
                "the optimizer state is offloaded partition by partition"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"deepspeed.offload_params needs deepspeed.zero_stage=3 (got {self.zero_stage}): "
                "only ZeRO-3 partitions the weights"
            )
        return self


class SafetyConfig(_Section):
    """What a non-finite loss or gradient does. Such an optimizer step is always skipped on the device (no
    host sync: the weights stay those of the last good step); at the next log interval ``stop`` ends the run
    with a message, ``skip`` logs the count (``skipped_steps``) and goes on, ending the run only when
    more than ``max_consecutive_skips`` steps in a row were skipped."""

    nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = Field(10, ge=1, description="skip: stop after more bad steps than this in a row")


class CheckpointConfig(_Section):
    every_steps: int = Field(1000, ge=1)
    keep_last: int = Field(2, ge=1)


class LoggingConfig(_Section):
    every_steps: int = Field(10, ge=1, description="host sync, metrics line and progress update interval")
    tensorboard: bool = True
    progress_bar: bool = True


class EvalConfig(_Section):
    """Frozen probes during pretraining (``fastmam.probe``): every ``every_steps`` optimizer steps, rank 0 fits a kNN
    and a linear probe on the features of the current encoder and logs ``probe_knn_top1`` / ``probe_linear_top1``.
    The data: ``train_list`` and ``val_list`` (annotation lists, centre view of each video), or else
    ``synthetic_train`` / ``synthetic_val`` held-out synthetic clips labelled by motion class."""

    every_steps: int = Field(0, ge=0, description="probe interval in optimizer steps; 0 = off")
    train_list: str = Field("", description="annotation list the probes are fit on ('' = synthetic clips)")
    val_list: str = Field("", description="annotation list the probes are scored on")
    data_root: str = Field("", description="folder the lists' relative paths start from; '' = each list's folder")
    list_format: Literal["auto", "videomae", "ucf101", "hmdb51", "ssv2_json"] = "auto"
    synthetic_train: int = Field(512, ge=1, description="held-out synthetic clips to fit on (no lists given)")
    synthetic_val: int = Field(256, ge=1, description="held-out synthetic clips to score on (no lists given)")
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    linear_epochs: int = Field(100, ge=1)
    linear_lr: float = Field(1e-3, gt=0)
    linear_optimizer: Literal["adamw", "sgd"] = "adamw"
    batch_size: int = Field(16, ge=1, description="clips per encoder call")
    seed: int = Field(0, description="the linear probe's initialization and batch order")

    @model_validator(mode="after")
    def _both_lists(self):
        if bool(self.train_list) != bool(self.val_list):
            raise ValueError("eval.train_list and eval.val_list go together: set both, or neither (synthetic clips)")
        return self


def check_encoder_geometry(m: ModelConfig, d: DataConfig) -> None:
    """The rules a clip and the encoder must satisfy together (pretraining and fine-tuning)."""
    if d.num_frames % m.tubelet:
        raise ValueError(f"data.num_frames={d.num_frames} must be a multiple of model.tubelet={m.tubelet}")
    if d.img_size % m.patch:
        raise ValueError(f"data.img_size={d.img_size} must be a multiple of model.patch={m.patch}")
    if m.embed_dim % m.num_heads:
        raise ValueError(f"model.embed_dim={m.embed_dim} must be divisible by model.num_heads={m.num_heads}")


class Config(_Section):
    """A pretraining run."""

    KIND: ClassVar[str] = "pretraining"
    #: top-level sections only a pretraining config has (``_check_kind``)
    MARKS: ClassVar[tuple[str, ...]] = ("targets", "masking", "loss", "eval")

    name: str = "mam2_vit_b"
    seed: int = 0
    output_dir: str = "runs/{name}"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "reference", "triton", "cuda"] = Field(
        "auto", description="fastmam.ops backend; FASTMAM_BACKEND overrides 'auto'"
    )
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    targets: TargetsConfig = TargetsConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    safety: SafetyConfig = SafetyConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _geometry(self):
        m, d = self.model, self.data
        check_encoder_geometry(m, d)
        if m.decoder_dim % m.decoder_heads:
            raise ValueError(
                f"model.decoder_dim={m.decoder_dim} must be divisible by model.decoder_heads={m.decoder_heads}"
            )
        if self.targets.motion == "rgb_diff" and m.tubelet < 2:
            raise ValueError("targets.motion='rgb_diff' needs model.tubelet >= 2 (differences inside a tubelet)")
        if self.targets.motion == "rgb_diff_dense" and d.source != "video":
            raise ValueError(
                "targets.motion='rgb_diff_dense' needs data.source='video' (the loader supplies the next frames)"
            )
        tg = self.targets
        if tg.appearance == "vqgan" and tg.vqgan.downsample != m.patch:
            raise ValueError(
                f"model.patch={m.patch} but the VQGAN downsamples by {tg.vqgan.downsample} "
                f"(2 ** (len(targets.vqgan.ch_mult) - 1), ch_mult={list(tg.vqgan.ch_mult)}): a code aligns with a "
                f"token only when the two are equal; set model.patch={tg.vqgan.downsample}, or use a VQGAN whose "
                "downsampling factor is model.patch"
            )
        if tg.codes == "cached" and d.source != "video":
            raise ValueError("targets.codes='cached' needs data.source='video' (a cache holds a video list's codes)")
        self._motion_target_rules()
        if self.loss.appearance_weight == 0 and (self.targets.motion == "none" or self.loss.motion_weight == 0):
            raise ValueError("nothing to learn: loss.appearance_weight is 0 and there is no motion term")
        s = (d.img_size // m.patch) ** 2
        n = s * (d.num_frames // m.tubelet)
        per = s if self.masking.kind == "tube" else n
        hidden = int(self.masking.ratio * per)
        if not 0 < hidden < per:
            raise ValueError(
                f"masking.ratio={self.masking.ratio} hides {hidden} of {per} positions; "
                "choose a ratio that hides at least one and keeps at least one"
            )
        self._decoder_masking_geometry(n, s, hidden)
        if self.schedule.warmup_steps > self.schedule.steps:
            raise ValueError(
                f"schedule.warmup_steps={self.schedule.warmup_steps} exceeds schedule.steps={self.schedule.steps}"
            )
        if self.optim.min_lr > self.optim.base_lr:
            raise ValueError(f"optim.min_lr={self.optim.min_lr} exceeds optim.base_lr={self.optim.base_lr}")
        return self

    def _motion_target_rules(self) -> None:
        """MME's targets: HOG cells and trajectory points lie on an 8-px grid; real videos' trajectories come from a
        cache (whose list and length the loader checks when it opens it)."""
        m, tg, d = self.model, self.targets, self.data
        if tg.appearance == "hog" and m.patch % 8:
            raise ValueError(
                f"targets.appearance='hog' describes each token by 8-px HOG cells: model.patch={m.patch} must be a "
                "multiple of 8 (MME: 16-px patches, 2x2 cells)"
            )
        if tg.motion == "trajectory":
            if m.patch % 8:
                raise ValueError(
                    f"targets.motion='trajectory' follows points on an 8-px grid (2x2 per 16-px patch): "
                    f"model.patch={m.patch} must be a multiple of 8"
                )
            if d.source == "video" and not tg.trajectory_cache:
                raise ValueError(
                    "targets.motion='trajectory' with data.source='video' needs targets.trajectory_cache, a folder "
                    f"written by `python -m fastmam.data.trajectories --list {d.train_list or 'LIST'} --out DIR "
                    f"--length {tg.trajectory_length}` (the trajectories of every frame of data.train_list)"
                )

    def _decoder_masking_geometry(self, tokens: int, spatial: int, hidden: int) -> None:
        mk, m = self.masking, self.model
        if mk.decoder == "none":
            return
        grid = self.data.img_size // m.patch
        if mk.decoder == "running_cell" and grid % 2:
            raise ValueError(
                f"masking.decoder='running_cell' tiles a 2x2 cell over the {grid}x{grid} patch grid "
                f"(data.img_size={self.data.img_size} / model.patch={m.patch}): it needs an even number of rows and "
                "columns, which VideoMAE V2's pattern is defined on; change the size or use masking.decoder=random"
            )
        masked = hidden * (tokens // spatial) if mk.kind == "tube" else hidden
        dropped = int(mk.decoder_ratio * masked)
        if not 0 < dropped < masked:
            raise ValueError(
                f"masking.decoder_ratio={mk.decoder_ratio} drops {dropped} of the {masked} masked tokens; "
                "choose a ratio that drops at least one and keeps at least one"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    @property
    def num_tokens(self) -> int:
        m, d = self.model, self.data
        return (d.num_frames // m.tubelet) * (d.img_size // m.patch) ** 2


# --------------------------------------------------------------------------- loading


def resolve_preset(name_or_path: str | Path) -> Path:
    """``tiny`` -> ``configs/tiny.yaml``; an existing path is returned as is."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a preset; presets: {', '.join(known) or 'none'}")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. optim.base_lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key part; expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
    return key.split("."), value


def _check_path(parts: list[str], root: type[BaseModel] | None = None) -> type | None:
    """Reject unknown keys (from the top level down) naming the allowed ones at that level.

    Returns the section class the path names, or None when it names a value."""
    cls: type[BaseModel] = root or Config
    for i, part in enumerate(parts):
        fields = cls.model_fields
        if part not in fields:
            where = "'" + ".".join(parts[:i]) + "'" if i else "the top level"
            raise ConfigError(
                f"unknown config key '{'.'.join(parts)}': '{part}' is not a key of {where}; "
                f"allowed: {', '.join(fields)}"
            )
        ann = fields[part].annotation
        is_section = isinstance(ann, type) and issubclass(ann, BaseModel)
        if i < len(parts) - 1 and not is_section:
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section")
        cls = ann if is_section else None
    return cls


def _check_tree(tree: dict, parts: list[str], root: type[BaseModel] | None = None) -> None:
    for key, value in tree.items():
        path = [*parts, str(key)]
        if _check_path(path, root) is not None and isinstance(value, dict):
            _check_tree(value, path, root)


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a rule across several keys: the message names them
            lines.append(msg)
            continue
        loc = ".".join(str(p) for p in err["loc"])
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"config key '{loc}': {msg}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(tree: dict | None = None, overrides: list[str] | tuple[str, ...] = (),
                 root: type[BaseModel] | None = None):
    """Validate a nested dict plus ``key=value`` overrides into a ``Config`` (or another ``root`` config class of
    the same kind: ``fastmam.finetuning.config.FinetuneConfig``)."""
    root = root or Config
    tree = copy.deepcopy(tree or {})
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(tree).__name__}")
    _check_kind(tree, root)
    _check_tree(tree, [], root)
    for item in overrides:
        parts, value = _parse_override(item)
        _check_path(parts, root)
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    try:
        return root.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def _check_kind(tree: dict, root: type[BaseModel]) -> None:
    """A pretraining config given to fine-tuning (or the reverse) is named as such, not as a list of unknown keys."""
    own = getattr(root, "KIND", "pretraining")
    for other in (Config, *_other_kinds()):
        kind = getattr(other, "KIND", "pretraining")
        if kind == own:
            continue
        marks = sorted(set(tree) & set(getattr(other, "MARKS", ())))
        if marks and not set(tree) & set(getattr(root, "MARKS", ())):
            raise ConfigError(
                f"this is a {kind} config (it has {', '.join(marks)}), not a {own} one; "
                f"{'fastmam/pretrain.py' if kind == 'pretraining' else 'fastmam/finetune.py'} reads it "
                f"(fine-tuning presets are named ft_*)"
            )


def _other_kinds() -> tuple[type[BaseModel], ...]:
    from .finetuning.config import FinetuneConfig

    return (FinetuneConfig,)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_tree(name_or_path: str | Path, chain: tuple[str, ...] = ()) -> dict:
    """A preset's YAML; a ``base: <preset>`` key layers it over that preset (recursively)."""
    path = resolve_preset(name_or_path)
    if str(path.resolve()) in chain:
        raise ConfigError(f"{path}: 'base' presets form a cycle ({' -> '.join(chain)})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must name one preset or YAML path, got {base!r}")
    if not Path(base).is_file() and (path.parent / base).is_file():
        base = path.parent / base  # a relative path next to the file that names it
    return _merge(_read_tree(base, (*chain, str(path.resolve()))), tree)


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                root: type[BaseModel] | None = None):
    """Load a preset name or YAML path (None: the defaults), apply overrides, validate (as ``root``, default
    ``Config``: pretraining).

    A file may start from another preset with ``base: <name or path>``; its own keys then override
    the base's, section by section."""
    tree = _read_tree(name_or_path) if name_or_path is not None else {}
    return build_config(tree, overrides, root)


# --------------------------------------------------------------------------- derived values


def resolve_precision(cfg: Config, device_type: str) -> str:
    """'fp32' or 'bf16' for this device. bf16 needs a GPU; CPU training runs fp32."""
    if cfg.deepspeed.precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if cfg.deepspeed.precision == "bf16" and device_type != "cuda":
        raise ConfigError("deepspeed.precision='bf16' needs a CUDA device; use 'auto' or 'fp32' on CPU")
    return cfg.deepspeed.precision


def global_batch_size(cfg: Config, world_size: int) -> int:
    return cfg.data.batch_size * cfg.deepspeed.gradient_accumulation_steps * world_size


def peak_lr(cfg: Config, world_size: int) -> float:
    """The linear scaling rule: lr = base_lr * global_batch / 256."""
    return cfg.optim.base_lr * global_batch_size(cfg, world_size) / 256


def deepspeed_config(cfg: Config, world_size: int, device_type: str) -> dict:
    """The DeepSpeed JSON, derived from ``cfg`` only (the optimizer and schedule are ours)."""
    precision = resolve_precision(cfg, device_type)
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # gather the full weights into the checkpoint so an exported encoder needs no ZeRO tools
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    pin = device_type == "cuda"  # pinned host buffers speed up the copies to and from a GPU
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    bf16: dict[str, Any] = {"enabled": precision == "bf16"}
    if precision == "bf16" and _deepspeed_has_bf16_overflow_check():
        # fastmam.optim.NonFiniteGuard skips non-finite steps on the device; DeepSpeed's own check would read
        # a flag on the host every step
        bf16["check_grad_overflow"] = False
    out = {
        "train_batch_size": global_batch_size(cfg, world_size),
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.deepspeed.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": bf16,
        "fp16": {"enabled": False},
        # our AdamW is a torch optimizer; ZeRO wraps it like its own
        "zero_allow_untested_optimizer": True,
        # our own logging prints at log intervals; DeepSpeed's per-step prints are off
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        # the offloaded step runs torch's fused AdamW on the CPU partitions (vectorized and multi-threaded), which
        # keeps one optimizer, and its on-device step skipping, for every configuration
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def _deepspeed_has_bf16_overflow_check() -> bool:
    """Whether the installed DeepSpeed knows ``bf16.check_grad_overflow`` (newer releases; older ones reject
    unknown keys)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return False
    return "check_grad_overflow" in DeepSpeedBF16Config.model_fields


def dump_config(cfg) -> str:
    """The config as YAML that ``build_config`` reads back to the same config."""
    return yaml.safe_dump(saved_tree(cfg), sort_keys=False)


def saved_tree(cfg) -> dict:
    """``cfg`` as a plain dict that validates back to it: with VQGAN targets ``targets.codebook_size`` is left out
    (the codebook is ``targets.vqgan.n_embed``; a written default would contradict it when read back)."""
    tree = cfg.model_dump(mode="json")
    return readable_tree(tree)


def readable_tree(tree: dict) -> dict:
    """A saved config tree as ``build_config`` takes it; also for files written before ``saved_tree`` left
    ``targets.codebook_size`` out of VQGAN configs."""
    targets = tree.get("targets")
    if isinstance(targets, dict) and targets.get("appearance") == "vqgan":
        targets.pop("codebook_size", None)
    return tree
