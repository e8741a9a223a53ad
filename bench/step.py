"""Step mode of ``bench/throughput.py``: one full training step (forward, backward, AdamW) on in-memory uint8
clips (decoding excluded), for fastmam's model and, side by side in the same run, Hugging Face's
``VideoMAEForPreTraining`` at the same batch, dtype and pixel objective.

Both steps start from the uint8 clip on the device and the masking noise: ours runs its fused masking,
gather and targets (the ops the device picks); the peer's step converts the clip to the normalized float
``pixel_values`` its API takes (B, T, C, H, W), turns the noise into the same tube mask, and computes its
own normalized-pixel MSE. Both use the same AdamW (fused on CUDA) and hold weights in the run's dtype.
The peer's encoder is the preset's; its decoder has the preset's width and heads and the depth of our
VideoMAE config (``configs/videomae_vit_b.yaml``): VideoMAE's layout.

Each row: ms/step (median, 20/80% quantiles), clips/s, peak memory, model FLOPs by formula
(``fastmam.flops``), achieved TFLOP/s and MFU against two peaks: a dense matmul measured in the same run
in the same dtype, and the datasheet's dense bf16 peak where the GPU is known.

On a GPU each preset without decoder masking is timed twice, side by side: as it is, and with VideoMAE V2's
running-cell decoder masking at 0.5 (``masking.decoder``; the regressor, decoders, targets and loss on half of the
masked tokens), whose row gives ``vs_no_decoder_masking`` (its clips/s over the plain row's). The peer has no
decoder masking: both rows are compared with the same peer row.
"""

from __future__ import annotations

import gc
import json

import torch

from bench.harness import time_fn
from fastmam import ops
from fastmam.config import Config, load_config
from fastmam.flops import hf_videomae_flops, model_flops, token_counts
from fastmam.models import Pretrainer
from fastmam.ops import _backend

#: dense (no sparsity) bf16 tensor-core peaks, TFLOP/s; the first entry whose key is in the device name wins
DATASHEET_BF16_TFLOPS = [
    # NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 (SXM5) / 1,513 (PCIe) / 1,671 (NVL) TFLOPS "with
    # sparsity"; dense is half. torch names the SXM5 part "NVIDIA H100 80GB HBM3".
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),
    # NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 (SXM) / 1,671 (NVL) TFLOPS with sparsity.
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    # NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (SXM4 and PCIe).
    ("A100", 312.0),
]

#: presets of the step rows on a GPU; --quick runs the tiny one on the CPU
GPU_PRESETS = ("vit_s", "vit_b", "vit_l", "videomae_vit_b")
QUICK_PRESETS = ("tiny",)
#: the decoder masking of the paired rows: VideoMAE V2's running cell, half of the masked tokens decoded (with
#: videomae_vit_b this is configs/videomaev2_vit_b.yaml)
DECODER_MASKING = ("masking.decoder=running_cell", "masking.decoder_ratio=0.5")


def datasheet_peak(device: torch.device) -> float | None:
    """Dense bf16 TFLOP/s from the datasheet for a known GPU, else None (CPUs, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in DATASHEET_BF16_TFLOPS if key in name), None)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate in TFLOP/s: a square matmul large enough to saturate the device."""
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = time_fn(lambda: torch.mm(a, b, out=c), device)["ms_median"]
    return 2 * n**3 / (ms / 1e3) / 1e12


def _adamw(params) -> torch.optim.Optimizer:
    """The optimizer of both steps: AdamW as in training (fused, on every device)."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)


def _inputs(cfg: Config, batch: int, device: torch.device, noise_shape) -> tuple[torch.Tensor, torch.Tensor]:
    d = cfg.data
    g = torch.Generator(device=device).manual_seed(0)
    clip = torch.randint(0, 256, (batch, d.num_frames, d.img_size, d.img_size, 3), dtype=torch.uint8, device=device,
                         generator=g)
    return clip, torch.rand(noise_shape, device=device, generator=g)


def ours(cfg: Config, batch: int, device: torch.device, dtype: torch.dtype, tokenizer=None, cached_codes: bool = False):
    """(step function, FLOPs, implementation label) of fastmam's model on this preset. Code targets: a
    ``tokenizer`` (e.g. a VQGAN with any weights) runs inside the step, or (``cached_codes``) random codes of
    every frame come with the batch, as the code cache delivers them."""
    model = Pretrainer(cfg, tokenizer=tokenizer).to(device=device, dtype=dtype)
    opt = _adamw(model.parameters())
    clip, noise = _inputs(cfg, batch, device, model.noise_shape(batch))
    codes = None
    if cached_codes:
        d, p = cfg.data, cfg.model.patch
        codes = torch.randint(0, cfg.targets.num_codes, (batch, d.num_frames, d.img_size // p, d.img_size // p),
                              dtype=torch.int32, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        model(clip, noise, codes=codes).total.backward()
        opt.step()

    backend = _backend.resolve("tube_mask_gather", None if cfg.backend == "auto" else cfg.backend, device)[0]
    return step, model_flops(cfg, batch), f"fastmam[{backend},{cfg.model.attention}]"


def peer_config(cfg: Config):
    """The Hugging Face ``VideoMAEConfig`` matched to a preset: its encoder and pixel objective; the decoder
    at the preset's width and heads and our VideoMAE config's depth."""
    from transformers import VideoMAEConfig

    m, d = cfg.model, cfg.data
    return VideoMAEConfig(
        image_size=d.img_size, patch_size=m.patch, num_channels=3, num_frames=d.num_frames, tubelet_size=m.tubelet,
        hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(m.embed_dim * m.mlp_ratio), qv_bias=m.qkv_bias, layer_norm_eps=1e-6,
        decoder_hidden_size=m.decoder_dim, decoder_num_hidden_layers=load_config("videomae_vit_b").model.decoder_depth,
        decoder_num_attention_heads=m.decoder_heads, decoder_intermediate_size=int(m.decoder_dim * m.mlp_ratio),
        norm_pix_loss=cfg.targets.normalize_pixels, attn_implementation="sdpa",
    )


def peer(cfg: Config, batch: int, device: torch.device, dtype: torch.dtype):
    """(step function, FLOPs, label) of ``VideoMAEForPreTraining`` matched to the preset (``peer_config``)."""
    from transformers import VideoMAEForPreTraining

    config = peer_config(cfg)
    model = VideoMAEForPreTraining(config).to(device=device, dtype=dtype)
    opt = _adamw(model.parameters())
    d, m = cfg.data, cfg.model
    spatial, slices = (d.img_size // m.patch) ** 2, d.num_frames // m.tubelet
    clip, noise = _inputs(cfg, batch, device, (batch, spatial))
    mean = torch.tensor(d.mean, device=device).view(1, 1, 3, 1, 1)
    std = torch.tensor(d.std, device=device).view(1, 1, 3, 1, 1)

    def step():
        opt.zero_grad(set_to_none=True)
        pixel_values = ((clip.permute(0, 1, 4, 2, 3).float() / 255 - mean) / std).to(dtype).contiguous()
        mask = ops.tube_masking(noise, cfg.masking.ratio, slices).mask
        model(pixel_values, bool_masked_pos=mask).loss.backward()
        opt.step()

    return step, hf_videomae_flops(config, batch, token_counts(cfg)[2]), "hf_videomae[sdpa]"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(name: str, impl: str, shape: str, timing: dict, flops, batch: int, peaks: dict, dtype, env: dict) -> dict:
    sec = timing["ms_median"] / 1e3
    achieved = flops.train / sec / 1e12
    row = {"op": "train_step", "impl": impl, "pass": "fwd+bwd+opt", "shape": shape, "preset": name, **timing,
           "dtype": str(dtype).removeprefix("torch."), "clips_per_s": batch / sec,
           "model_tflop_per_step": flops.train / 1e12, "tflops": achieved,
           "peak_tflops_measured": peaks["measured"], "peak_tflops_datasheet": peaks["datasheet"],
           "mfu_measured_pct": 100 * achieved / peaks["measured"],
           "mfu_datasheet_pct": 100 * achieved / peaks["datasheet"] if peaks["datasheet"] else None, **env}
    return row


def _timed(make, cfg, batch, device, dtype):
    """Build a step, time it (warm-up included) and free it; None with a printed reason on out-of-memory."""
    try:
        step, flops, impl = make(cfg, batch, device, dtype)
        timing = time_fn(step, device, warmup=2, reps=10 if device.type == "cuda" else 3, events=True)
        return timing, flops, impl
    except torch.cuda.OutOfMemoryError as exc:
        print(f"step: {make.__name__} on {cfg.name} at batch {batch} ran out of memory ({str(exc).splitlines()[0]})")
        return None
    finally:
        step = None
        _free(device)


def step_configs(name: str, decoder_masking: bool) -> list[Config]:
    """The preset, then (``decoder_masking``, when the preset has none) the same preset with ``DECODER_MASKING``."""
    cfg = load_config(name)
    if decoder_masking and cfg.masking.decoder == "none":
        return [cfg, load_config(name, list(DECODER_MASKING))]
    return [cfg]


def step_shape(cfg: Config, batch: int) -> str:
    d, mk = cfg.data, cfg.masking
    shape = f"{cfg.name} B{batch} {d.num_frames}x{d.img_size} r{mk.ratio}"
    return shape + (f" decoder {mk.decoder} {mk.decoder_ratio}" if mk.decoder != "none" else "")


def step_rows(presets, batch: int | None, device: torch.device, dtype: torch.dtype, env: dict,
              with_peer: bool = True, decoder_masking: bool | None = None) -> list[dict]:
    """Rows for each preset: ours, ours with decoder masking (``decoder_masking``; None: on a GPU, where these rows
    are the point, not in the quick CPU run), then the peer matched to it (measured once per distinct peer
    config), with ``vs_peer`` = our clips/s / the peer's clips/s in each of our rows and ``vs_no_decoder_masking``
    = the decoder-masking row's clips/s / the plain row's."""
    if decoder_masking is None:
        decoder_masking = device.type == "cuda"
    peaks = {"measured": matmul_peak(device, dtype), "datasheet": datasheet_peak(device)}
    print(f"step: dense {str(dtype).removeprefix('torch.')} matmul measured at {peaks['measured']:.3g} TFLOP/s; "
          f"datasheet bf16 peak: {peaks['datasheet'] or 'unknown for this device'}")
    if with_peer:
        try:
            import transformers  # noqa: F401
        except ImportError as exc:
            print(f"step: Hugging Face peer skipped: transformers is not importable ({exc}); pip install transformers")
            with_peer = False
    rows, peer_rows = [], {}
    for name in presets:
        mine = []
        for cfg in step_configs(name, decoder_masking):
            b = batch or cfg.data.batch_size
            got = _timed(ours, cfg, b, device, dtype)
            if got is None:
                continue
            row = _row(name, got[2], step_shape(cfg, b), got[0], got[1], b, peaks, dtype, env)
            row["decoder_masking"] = "none" if cfg.masking.decoder == "none" else \
                f"{cfg.masking.decoder} {cfg.masking.decoder_ratio}"
            if mine and mine[0]["decoder_masking"] == "none" and cfg.masking.decoder != "none":
                row["vs_no_decoder_masking"] = row["clips_per_s"] / mine[0]["clips_per_s"]
            mine.append(row)
        rows.extend(mine)
        if not with_peer or not mine:
            continue
        cfg = load_config(name)
        b = batch or cfg.data.batch_size
        if cfg.masking.kind != "tube":
            print(f"step: no peer row for {name}: the peer is timed with tube masking only")
            continue
        key = (json.dumps(peer_config(cfg).to_dict(), sort_keys=True, default=str), b)
        if key not in peer_rows:
            theirs = _timed(peer, cfg, b, device, dtype)
            peer_rows[key] = theirs and _row(name, theirs[2], f"peer of {step_shape(cfg, b)}", theirs[0], theirs[1],
                                             b, peaks, dtype, env)
            if peer_rows[key]:
                rows.append(peer_rows[key])
        if peer_rows[key]:
            for row in mine:
                row["vs_peer"] = row["clips_per_s"] / peer_rows[key]["clips_per_s"]
    return rows
