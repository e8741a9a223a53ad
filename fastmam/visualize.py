"""See what a pretrained model learned: one clip, masked and reconstructed (VideoMAE's ``run_videomae_vis.py``).

    python -m fastmam.visualize runs/tiny --synthetic 3 [--gif]
    python -m fastmam.visualize runs/mam2_vit_b --video clip.mp4 [--out DIR] [--tag step_N] [--seed S] [--gif]

The run is what ``python -m fastmam.export`` takes (a run folder, its ``checkpoints/``, or one checkpoint; the newest
complete checkpoint without ``--tag``; any ZeRO stage). The clip: ``--video FILE``, the centre clip and centre crop at
the run's ``data.num_frames`` / ``data.stride`` / ``data.img_size`` (the frozen probes' view, ``fastmam.probe``); or
``--synthetic INDEX``, item INDEX of the run's own synthetic moving shapes (``data.num_samples`` clips, seed
``seed``). The masking noise is ``torch.rand`` of a CPU generator seeded with ``--seed`` (default 0): the same
command draws the same mask and gives the same picture. The model runs exactly as in a pretraining step
(``Pretrainer.forward``: ``ops.tube_mask_gather``, the encoder, the regressor if any, the decoders; targets from
``ops.pixel_target`` / ``ops.rgb_diff_target`` / the run's tokenizer), in fp32.

One PNG grid, rows top to bottom, one column per clip frame (and with ``--gif`` an animated GIF of the same rows, one
GIF frame per clip frame):

1. the input frames;
2. the masked input: the hidden patches greyed (what the encoder sees);
3. the predicted appearance. Pixel targets: the appearance head's output on the hidden patches, in [0, 1]
   pixels, with the visible patches pasted from the input (VideoMAE's visualization). With
   ``targets.normalize_pixels`` the head predicts per-patch normalized pixels: each predicted patch is
   un-normalized with the *true* patch's per-channel mean and std, as VideoMAE does (the caption says so: the
   patch's mean colour and contrast are then the input's, only its structure is predicted). Code targets
   (``vqgan``, ``random_codes``): a per-token map of top-1 code agreement of the predicted code (argmax of the
   head's logits) with the true code, green where right, red where wrong (a fraction of the t codes with
   ``code_frame: all``), over the input; the caption gives the fraction, chance (1 / codebook) and the clip's
   most frequent code's share;
4. the true motion: the RGB differences of ``ops.rgb_diff_target`` for every token (``rgb_diff``: frame f+1 minus
   frame f inside each tubelet, shown under frame f+1, so a tubelet's first frame has none; ``rgb_diff_dense``:
   the next raw frame minus frame f, under frame f);
5. the predicted motion: the motion head's output on the hidden tokens (un-normalized with the true difference
   patch's mean and std with ``targets.normalize_motion``), the true motion pasted on the visible ones.

Motion rows are drawn in offset grey (``0.5 + gain * difference`` per RGB channel; ``--motion-style grey``) or a
blue-white-red map of the channel mean (``diverging``); both rows share one gain, from the true motion's 99th
percentile of absolute value. ``targets.motion: none`` leaves them out. A JSON summary (losses on this clip and mask,
code agreement, the files) is written next to the PNG. Bad input (no run, an unreadable video, an index out of
range, a config this fastmam does not accept, a missing VQGAN checkpoint) ends with one line that says what to fix,
and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from . import ops
from .config import Config, ConfigError, build_config, readable_tree
from .export import ExportError, _model_states_file, consolidated_state, find_checkpoint
from .ops.targets import EPS

#: what the process's exit status means
EXIT_STATUSES = {0: "the files were written", 2: "bad input: the message says what to fix"}
MOTION_STYLES = ("grey", "diverging")
MASK_GREY = 0.5  # the fill of hidden patches in the masked-input row
BACKGROUND = (255, 255, 255)
EMPTY_CELL = (232, 232, 232)  # a motion cell with no difference to show (first frame of a tubelet)
RIGHT, WRONG = torch.tensor([0.10, 0.75, 0.20]), torch.tensor([0.85, 0.12, 0.10])  # code agreement colours


class VisualizeError(RuntimeError):
    """The input cannot be visualized (bad clip, index, device, option); the message says what to change."""


# --------------------------------------------------------------------------- patch geometry


def unpatchify(tokens: torch.Tensor, frames_per_token: int, grid: tuple[int, int, int], patch: int,
               channels: int = 3) -> torch.Tensor:
    """Inverse of ``ops.patchify_reference`` for any number of frames per token.

    tokens: (N, f*p*p*C), N = nt*nh*nw in (time, row, column) order, each vector laid out (f, p, p, C)
    -> (nt*f, nh*p, nw*p, C)."""
    nt, nh, nw = grid
    x = tokens.reshape(nt, nh, nw, frames_per_token, patch, patch, channels)
    x = x.permute(0, 3, 1, 4, 2, 5, 6)  # (nt, f, nh, p, nw, p, C)
    return x.reshape(nt * frames_per_token, nh * patch, nw * patch, channels)


def patch_stats(values: torch.Tensor, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and channel mean and unbiased std of patch vectors (M, K*C) -> two (M, 1, C) tensors: the statistics
    of the pixel / RGB-difference targets' per-patch normalization (``ops.targets.normalize_per_patch``)."""
    v = values.reshape(values.shape[0], -1, channels).double()
    return v.mean(dim=1, keepdim=True), v.std(dim=1, unbiased=True, keepdim=True)


def unnormalize(pred: torch.Tensor, true_values: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Predicted normalized patches (M, K*C) -> ``pred * (std + 1e-6) + mean`` with the mean and unbiased std of the
    true patches ``true_values`` (M, K*C) in [0, 1] units, per token and channel: VideoMAE's visualization."""
    mean, std = patch_stats(true_values, channels)
    v = pred.reshape(pred.shape[0], -1, channels).double()
    return (v * (std + EPS) + mean).reshape(pred.shape).float()


# --------------------------------------------------------------------------- the run and the clip


def run_tree(ckpt_dir: Path, tag: str, run_dir: Path | None) -> dict:
    """The run's config as a tree: ``config.yaml`` of the run folder, else the copy saved inside the checkpoint
    (``fastmam.export.load_run_config``'s sources, read without validating them yet)."""
    if run_dir is not None:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    else:
        client = torch.load(_model_states_file(ckpt_dir / tag), map_location="cpu", weights_only=False)
        if "config" not in client:
            raise ExportError(f"{ckpt_dir / tag} carries no config and has no run folder with config.yaml above it")
        tree = client["config"]
    if not isinstance(tree, dict):
        raise ExportError(f"the config of {ckpt_dir / tag} is not a mapping of config keys")
    return tree


def run_config(tree: dict, device: torch.device, vqgan_checkpoint: str | None = None) -> Config:
    """The run's config set up to run here: SDPA attention (a flash-attn run is viewed anywhere), fp32, ops
    dispatched by the device, ``device``; ``vqgan_checkpoint`` replaces ``targets.vqgan.checkpoint``."""
    tree = copy.deepcopy(tree)
    tree["device"] = device.type
    tree["backend"] = "auto"
    model, ds, targets = (tree.setdefault(k, {}) for k in ("model", "deepspeed", "targets"))
    model["attention"] = "sdpa"
    model["activation_checkpointing"] = False
    ds["precision"] = "fp32"
    if vqgan_checkpoint is not None:
        targets.setdefault("vqgan", {})["checkpoint"] = str(vqgan_checkpoint)
    return build_config(readable_tree(tree))


def load_pretrainer(cfg: Config, state: dict[str, torch.Tensor], device: torch.device):
    """A ``Pretrainer`` of ``cfg`` with the checkpoint's weights, fp32, eval mode, on ``device``; global RNGs untouched.

    Its tokenizer (codes targets) is built as pretraining builds it: ``random_codes`` from the run's seed, ``vqgan``
    from ``targets.vqgan.checkpoint`` (also for a run on cached codes: the codes of a new clip come from the VQGAN)."""
    from .models import Pretrainer, build_tokenizer

    tokenizer = None
    if cfg.targets.appearance == "vqgan" and cfg.targets.codes == "cached":
        from .models.vqgan import VQGANTokenizer

        tokenizer = VQGANTokenizer.load(cfg.targets.vqgan)
    elif cfg.targets.uses_codes:
        tokenizer = build_tokenizer(cfg)
    with torch.random.fork_rng(devices=[]):  # construction draws initial weights, which are replaced
        pre = Pretrainer(cfg, tokenizer=tokenizer)
    missing, unexpected = pre.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ExportError(f"the checkpoint does not fit the run's config (missing {', '.join(missing[:4]) or 'none'}; "
                          f"unexpected {', '.join(unexpected[:4]) or 'none'}); is config.yaml the one this run was "
                          "trained with?")
    return pre.to(device).eval().requires_grad_(False)


def synthetic_clip(cfg: Config, index: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Item ``index`` of the run's synthetic dataset -> (clip (T, H, W, C) uint8, next frames or None, description).

    For dense motion (``rgb_diff_dense``, whose runs train on videos) the item is drawn with T+1 frames: its frames
    1..T are the next frames of frames 0..T-1."""
    from .data.synthetic import SyntheticShapes

    d = cfg.data
    if not 0 <= index < d.num_samples:
        raise VisualizeError(f"--synthetic {index} is out of range: the run's synthetic dataset has data.num_samples="
                             f"{d.num_samples} clips; pass an index from 0 to {d.num_samples - 1}")
    dense = cfg.targets.motion == "rgb_diff_dense"
    frames = d.num_frames + (1 if dense else 0)
    video = SyntheticShapes(d.num_samples, frames, d.img_size, d.img_size, seed=cfg.seed)[index]["video"]
    if dense:
        return video[:-1].contiguous(), video[1:].contiguous(), f"synthetic clip {index} ({frames} frames drawn)"
    return video, None, f"synthetic clip {index}"


def video_clip(cfg: Config, path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The centre clip and centre crop of a video file at the run's frames, stride and size (``fastmam.probe``'s view)
    -> (clip (T, H, W, C) uint8, the next raw frames for ``rgb_diff_dense`` or None, description)."""
    from .data.decode import BadVideo, decoder, probe
    from .data.sampling import (
        TooShort,
        apply_crop,
        next_frame_indices,
        sample_crop,
        sample_frame_indices,
        spec_from_config,
    )
    from .probe import _Centre

    s = dataclasses.replace(spec_from_config(cfg), crop="center", flip=False, repeated=1)
    backend = "pyav" if cfg.data.backend == "dali" else cfg.data.backend
    try:
        n = probe(path).frames
        indices = sample_frame_indices(n, s.num_frames, s.stride, _Centre(), s.short_videos)
        wanted = np.concatenate([indices, next_frame_indices(indices, n)]) if s.dense else indices
        frames = torch.from_numpy(decoder(backend)(str(path), wanted, cfg.data.decode_threads))
    except (BadVideo, TooShort) as exc:
        raise VisualizeError(f"cannot read the video {path}: {exc}; pass a video file FFmpeg can decode") from None
    box = sample_crop(_Centre(), frames.shape[1], frames.shape[2], s)
    frames = apply_crop(frames, box, s.img_size)
    t = s.num_frames
    desc = f"{Path(path).name}, frames {int(indices[0])}..{int(indices[-1])} at stride {s.stride}, centre crop"
    return frames[:t].contiguous(), (frames[t:].contiguous() if s.dense else None), desc


def masking_noise(pre, seed: int) -> torch.Tensor:
    """The masking noise of one clip: ``torch.rand(pre.noise_shape(1))`` from a CPU generator seeded with ``seed``."""
    return torch.rand(pre.noise_shape(1), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- one clip through the model


@dataclass
class Reconstruction:
    """One clip through the model; every tensor on the CPU, fp32 in [0, 1] pixel units unless said otherwise.

    frames: (T, H, W, C) the input; mask: (N,) bool, True = hidden; masked_input: (T, H, W, C);
    appearance: (T, H, W, C) predicted pixels, not clipped (pixel targets; None for codes);
    agreement: (N,) per-token fraction of the predicted codes equal to the true ones, NaN on visible tokens;
    agreement_fraction: over every masked code (codes targets; None for pixels); pred_codes / true_codes: (Nm,) or
    (Nm, t) int64 of the masked tokens;
    true_motion / pred_motion: (F, H, W, C) RGB differences (None without motion); motion_columns: the clip frame
    each motion frame is shown under; losses: the run's loss terms on this clip and mask (``Pretrainer.forward``)."""

    frames: torch.Tensor
    mask: torch.Tensor
    masked_input: torch.Tensor
    appearance: torch.Tensor | None
    agreement: torch.Tensor | None
    agreement_fraction: float | None
    pred_codes: torch.Tensor | None
    true_codes: torch.Tensor | None
    true_motion: torch.Tensor | None
    pred_motion: torch.Tensor | None
    motion_columns: list[int]
    losses: dict[str, float]


def code_predictions(hidden: torch.Tensor, head: torch.nn.Linear, chunk: int = 1024) -> torch.Tensor:
    """Top-1 codes of the appearance head: hidden (..., Da) -> argmax of ``hidden @ W.T + b`` (...) int64, ``chunk``
    rows at a time (the (rows x codebook) logits of a whole clip are not materialized at once)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.cat([head(flat[i:i + chunk]).argmax(dim=-1) for i in range(0, flat.shape[0], chunk)])
    return out.reshape(hidden.shape[:-1])


@torch.no_grad()
def reconstruct(pre, clip: torch.Tensor, next_clip: torch.Tensor | None, seed: int = 0) -> Reconstruction:
    """clip: (T, H, W, C) uint8 (next_clip the same, for ``rgb_diff_dense``) -> ``Reconstruction`` of one mask."""
    cfg, m = pre.cfg, pre.cfg.model
    device = pre.model.patch_embed.weight.device
    t, p = m.tubelet, m.patch
    x = clip.unsqueeze(0).to(device)
    nxt = next_clip.unsqueeze(0).to(device) if next_clip is not None else None
    dense = cfg.targets.motion == "rgb_diff_dense"
    noise = masking_noise(pre, seed).to(device)

    # the step's own data flow (Pretrainer.forward), keeping what its loss consumes
    # the encoder mask's columns of the step's noise (with decoder masking the decoder's columns follow; the
    # reconstruction shows every masked token, which the model predicts as well as the decoded ones)
    vis = ops.tube_mask_gather(x, pre.split_noise(noise)[0], cfg.masking.ratio, t, p, cfg.data.mean, cfg.data.std,
                               out_dtype=pre.model.patch_embed.weight.dtype, masking=cfg.masking.kind,
                               backend=pre.backend)
    out = pre.model(vis.patches, vis.ids_keep, vis.ids_masked)
    loss = pre(x, noise, nxt)
    losses = {k: float(v) for k, v in zip(("total", "appearance", "motion"), loss, strict=True)}

    nframes, h, w, c = clip.shape
    grid = (nframes // t, h // p, w // p)
    n = grid[0] * grid[1] * grid[2]
    ids_m = vis.ids_masked[0]
    all_ids = torch.arange(n, device=device).unsqueeze(0)
    mask = vis.mask[0]
    frames = clip.float() / 255.0
    token_mask = mask.cpu().view(grid[0], 1, grid[1], 1, grid[2], 1).expand(-1, t, -1, p, -1, p)
    token_mask = token_mask.reshape(nframes, h, w, 1)
    masked_input = torch.where(token_mask, torch.full_like(frames, MASK_GREY), frames)

    appearance = agreement = pred_codes = true_codes = None
    fraction = None
    head = pre.model.appearance_head
    if not pre.uses_codes:
        pixels = ops.pixel_target(x, all_ids, t, p, False, backend=pre.backend)[0]  # (N, t*p*p*C) in [0, 1]
        pred = head(out.appearance_hidden)[0].float()  # (Nm, t*p*p*C)
        if cfg.targets.normalize_pixels:
            pred = unnormalize(pred, pixels[ids_m], c)
        pixels[ids_m] = pred
        appearance = unpatchify(pixels.cpu(), t, grid, p, c)
    else:
        true_codes = pre.appearance_codes(x, vis.ids_masked)[0]  # (Nm,) or (Nm, t)
        pred_codes = code_predictions(out.appearance_hidden[0], head)
        right = (pred_codes == true_codes).float()
        fraction = float(right.mean())
        agreement = torch.full((n,), float("nan"), device=device)
        agreement[ids_m] = right.mean(-1) if right.dim() == 2 else right
        agreement, pred_codes, true_codes = agreement.cpu(), pred_codes.cpu(), true_codes.cpu()

    true_motion = pred_motion = None
    columns: list[int] = []
    if out.motion_pred is not None:
        diffs = ops.rgb_diff_target(x, all_ids, t, p, False, next_clip=nxt if dense else None,
                                    backend=pre.backend)[0]  # (N, f*p*p*C)
        pred = out.motion_pred[0].float()
        if cfg.targets.normalize_motion:
            pred = unnormalize(pred, diffs[ids_m], c)
        f = t if dense else t - 1
        true_motion = unpatchify(diffs.cpu(), f, grid, p, c)
        pasted = diffs.clone()
        pasted[ids_m] = pred
        pred_motion = unpatchify(pasted.cpu(), f, grid, p, c)
        columns = list(range(nframes)) if dense else [i * t + k + 1 for i in range(grid[0]) for k in range(t - 1)]

    return Reconstruction(frames, mask.cpu(), masked_input, appearance, agreement, fraction, pred_codes, true_codes,
                          true_motion, pred_motion, columns, losses)


# --------------------------------------------------------------------------- pictures


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (..., C) -> uint8, clipped and rounded."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def motion_gain(true_motion: torch.Tensor) -> float:
    """One gain for both motion rows: the 99th percentile of |true difference| over the values that change (above one
    grey level) reaches the end of the range; never less than the gain that maps [-1, 1] onto [0, 1]. (Over all
    values the percentile of a clip where only a shape moves is 0.)"""
    flat = true_motion.abs().flatten()
    flat = flat[flat > 1.0 / 255.0]
    if flat.numel() > 1 << 24:  # quantile's input limit; a strided sample is plenty
        flat = flat[:: math.ceil(flat.numel() / (1 << 24))]
    if not flat.numel():
        return 0.5
    return 0.5 / max(float(torch.quantile(flat.float(), 0.99)), 1.0 / 255.0)


def motion_colours(diff: torch.Tensor, gain: float, style: str) -> torch.Tensor:
    """RGB differences (..., C) -> [0, 1] colours: ``0.5 + gain * diff`` per channel (grey), or the channel mean on a
    blue-white-red map, saturated at |mean| = 0.5 / gain (diverging)."""
    if style == "grey":
        return (0.5 + gain * diff).clamp(0, 1)
    v = (2 * gain * diff.mean(dim=-1, keepdim=True)).clamp(-1, 1)
    red, blue = torch.tensor([0.70, 0.05, 0.10]), torch.tensor([0.10, 0.25, 0.70])
    colour = torch.where(v >= 0, red, blue)
    return 1 - v.abs() * (1 - colour)


def agreement_colours(frames: torch.Tensor, agreement: torch.Tensor, grid: tuple[int, int, int], tubelet: int,
                      patch: int, alpha: float = 0.7) -> torch.Tensor:
    """The input frames (T, H, W, C) with each masked token (agreement not NaN) covered by red-to-green at ``alpha``."""
    nt, nh, nw = grid
    a = agreement.view(nt, 1, nh, 1, nw, 1).expand(-1, tubelet, -1, patch, -1, patch)
    a = a.reshape(nt * tubelet, nh * patch, nw * patch, 1)
    colour = WRONG + a.nan_to_num(0.0) * (RIGHT - WRONG)
    return torch.where(a.isnan(), frames, (1 - alpha) * frames + alpha * colour)


@dataclass(frozen=True)
class Layout:
    """Where things go in the grid: a header of ``header_lines``, ``rows`` x ``cols`` cells of ``cell`` pixels with
    a label column on the left, ``caption_lines`` under them."""

    rows: int
    cols: int
    cell: int
    header_lines: int
    caption_lines: int
    margin: int = 8
    gap: int = 4
    label_width: int = 130
    line: int = 14

    @property
    def top(self) -> int:
        return self.margin + (self.header_lines + 1) * self.line  # + the row of frame numbers

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image."""
        width = 2 * self.margin + self.label_width + self.cols * self.cell + (self.cols - 1) * self.gap
        height = self.top + self.rows * self.cell + (self.rows - 1) * self.gap + self.gap \
            + self.caption_lines * self.line + self.margin
        return width, height

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a cell, right and bottom exclusive."""
        x = self.margin + self.label_width + col * (self.cell + self.gap)
        y = self.top + row * (self.cell + self.gap)
        return x, y, x + self.cell, y + self.cell


@dataclass
class Panel:
    """One row: its label and one (H, W, C) [0, 1] image per clip frame (None: an empty cell)."""

    label: str
    frames: list[torch.Tensor | None]


def panels(rec: Reconstruction, cfg: Config, motion_style: str = "grey") -> tuple[list[Panel], float | None]:
    """The grid's rows as [0, 1] images, and the motion gain (None without motion)."""
    m = cfg.model
    nframes, h, w, _ = rec.frames.shape
    grid = (nframes // m.tubelet, h // m.patch, w // m.patch)
    rows = [Panel("input", list(rec.frames)), Panel("masked input", list(rec.masked_input))]
    if rec.appearance is not None:
        rows.append(Panel("predicted\nappearance", list(rec.appearance.clamp(0, 1))))
    else:
        rows.append(Panel("code agreement\n(green = right)",
                          list(agreement_colours(rec.frames, rec.agreement, grid, m.tubelet, m.patch))))
    gain = None
    if rec.true_motion is not None:
        gain = motion_gain(rec.true_motion)
        for label, motion in (("true motion", rec.true_motion), ("predicted motion", rec.pred_motion)):
            cells: list[torch.Tensor | None] = [None] * nframes
            for col, diff in zip(rec.motion_columns, motion_colours(motion, gain, motion_style), strict=True):
                cells[col] = diff
            rows.append(Panel(label, cells))
    return rows, gain


def captions(rec: Reconstruction, cfg: Config, gain: float | None, motion_style: str) -> list[str]:
    """What the rows show, in sentences (the normalization used, the code agreement, the motion scale, the losses)."""
    m, tg = cfg.model, cfg.targets
    out = []
    if rec.appearance is not None:
        if tg.normalize_pixels:
            out.append("Appearance: per-patch normalized pixel targets; each predicted patch is un-normalized with the "
                       "TRUE patch's per-channel mean and std (VideoMAE's visualization), so its mean colour and "
                       "contrast come from the input. Visible patches pasted from the input.")
        else:
            out.append("Appearance: raw [0, 1] pixel targets, predicted patches as the head outputs them (clipped); "
                       "visible patches pasted from the input.")
    else:
        k = tg.num_codes
        codes = rec.true_codes.flatten()
        top = float((codes == codes.mode().values).float().mean()) if codes.numel() else 0.0
        per = f", {m.tubelet} codes per token (code_frame all)" if rec.true_codes.dim() == 2 else \
            f", code of the {tg.code_frame} frame of each tubelet"
        out.append(f"Appearance: {tg.appearance} codes ({k} in the codebook{per}). Masked tokens coloured by top-1 "
                   f"agreement of the predicted code with the true one (green right, red wrong): "
                   f"{100 * rec.agreement_fraction:.1f}% of {codes.numel()} codes; chance {100 / k:.2f}%, the clip's "
                   f"most frequent code {100 * top:.1f}%.")
    if rec.true_motion is not None:
        what = "next raw frame minus frame f, under frame f" if tg.motion == "rgb_diff_dense" else \
            "frame f+1 minus frame f inside each tubelet, under frame f+1 (none for a tubelet's first frame)"
        norm = " Predicted differences un-normalized with the true difference patch's mean and std " \
               "(targets.normalize_motion)." if tg.normalize_motion else ""
        scale = f"grey = no change, 0.5 + {gain:.2f} x difference per RGB channel" if motion_style == "grey" else \
            f"channel mean, white = no change, red = brighter, blue = darker, saturated at +-{0.5 / gain:.3f}"
        out.append(f"Motion ({tg.motion}): {what}; {scale}, one scale for both rows. Visible tokens: the true motion "
                   f"pasted.{norm}")
    layout = f"MAM2 layout: encoder, {m.regressor_depth}-block regressor, decoders" if m.regressor_depth else \
        "VideoMAE layout: no regressor, decoders see visible latents and mask tokens"
    loss = ", ".join(f"{k} {v:.4f}" for k, v in rec.losses.items() if k != "motion" or rec.true_motion is not None)
    out.append(f"{layout}. Loss on this clip and mask: {loss}.")
    return out


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines = []
    for para in text.split("\n"):
        words, cur = para.split(), ""
        for word in words:
            trial = f"{cur} {word}".strip()
            if cur and draw.textlength(trial, font=font) > width:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        lines.append(cur)
    return lines


def _cell_image(img: torch.Tensor | None, cell: int):
    from PIL import Image

    if img is None:
        return Image.new("RGB", (cell, cell), EMPTY_CELL)
    scale = cell // img.shape[0]
    px = to_uint8(img).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return Image.fromarray(px.numpy())


def render_grid(rows: list[Panel], title: list[str], notes: list[str], cell: int):
    """The PNG's image: title lines, a label and a row of cells per panel, the notes wrapped under them.
    Returns (PIL image, ``Layout``)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cols = len(rows[0].frames)
    probe = Layout(len(rows), cols, cell, len(title), 0)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = probe.size[0] - 2 * probe.margin
    lines = [line for note in notes for line in _wrap(draw, note, font, text_width)]
    layout = dataclasses.replace(probe, caption_lines=len(lines))
    image = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = layout.margin
    for line in title:
        draw.text((layout.margin, y), line, fill=(0, 0, 0), font=font)
        y += layout.line
    for col in range(cols):
        x0, y0, _, _ = layout.cell_box(0, col)
        draw.text((x0, y0 - layout.line), f"frame {col}", fill=(60, 60, 60), font=font)
    for r, panel in enumerate(rows):
        x0, y0, _, _ = layout.cell_box(r, 0)
        draw.multiline_text((layout.margin, y0 + 2), panel.label, fill=(0, 0, 0), font=font, spacing=2)
        for col, img in enumerate(panel.frames):
            image.paste(_cell_image(img, cell), layout.cell_box(r, col)[:2])
    y = layout.cell_box(len(rows) - 1, 0)[3] + layout.gap
    for line in lines:
        draw.text((layout.margin, y), line, fill=(0, 0, 0), font=font)
        y += layout.line
    return image, layout


def render_gif(rows: list[Panel], title: str, cell: int, path: Path, frame_ms: int = 300) -> None:
    """An animated GIF (looping): the panels side by side, one GIF frame per clip frame."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    margin, gap, line = 6, 4, 14
    width = 2 * margin + len(rows) * cell + (len(rows) - 1) * gap
    height = margin + 3 * line + cell + margin
    images = []
    for col in range(len(rows[0].frames)):
        image = Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(image)
        draw.text((margin, margin), f"{title}  |  frame {col}", fill=(0, 0, 0), font=font)
        for r, panel in enumerate(rows):
            x = margin + r * (cell + gap)
            draw.multiline_text((x, margin + line), panel.label, fill=(0, 0, 0), font=font, spacing=0)
            image.paste(_cell_image(panel.frames[col], cell), (x, margin + 3 * line))
        images.append(image)
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0, optimize=False)


# --------------------------------------------------------------------------- the command


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VisualizeError("--device cuda was requested but no CUDA GPU is visible; use --device auto or cpu")
    return torch.device(name)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "clip"


def visualize(path: str | Path, *, video: str | Path | None = None, synthetic: int | None = None,
              out: str | Path | None = None, tag: str | None = None, seed: int = 0, gif: bool = False,
              device: str = "auto", scale: int | None = None, motion_style: str = "grey",
              vqgan_checkpoint: str | None = None) -> dict:
    """Write the PNG grid (and the GIF) of one clip of a run; returns the summary (also written as JSON).

    Exactly one of ``video`` (a file) and ``synthetic`` (an item index) names the clip. ``out``: default
    ``<run>/visualize``. ``scale``: cell side = scale x data.img_size (default: at least 128 pixels)."""
    if (video is None) == (synthetic is None):
        raise VisualizeError("name one clip: --video FILE or --synthetic INDEX")
    if motion_style not in MOTION_STYLES:
        raise VisualizeError(f"--motion-style {motion_style} is not one of {', '.join(MOTION_STYLES)}")
    if scale is not None and scale < 1:
        raise VisualizeError(f"--scale must be at least 1, got {scale}")
    ckpt_dir, tag, run_dir = find_checkpoint(path, tag)
    dev = _device(device)
    try:
        cfg = run_config(run_tree(ckpt_dir, tag, run_dir), dev, vqgan_checkpoint)
    except ConfigError as exc:
        raise ExportError(f"the config of {ckpt_dir / tag} does not validate with this fastmam: {exc}") from None
    if video is not None:
        clip, next_clip, desc = video_clip(cfg, video)
        source = f"video-{_slug(Path(video).stem)}"
    else:
        clip, next_clip, desc = synthetic_clip(cfg, synthetic)
        source = f"synthetic{synthetic}"
    pre = load_pretrainer(cfg, consolidated_state(ckpt_dir, tag), dev)
    rec = reconstruct(pre, clip, next_clip, seed)

    rows, gain = panels(rec, cfg, motion_style)
    size = cfg.data.img_size
    cell = size * (scale if scale is not None else max(1, math.ceil(128 / size)))
    hidden, n = int(rec.mask.sum()), rec.mask.numel()
    title = [f"run {cfg.name}  |  {tag}  |  {desc}",
             f"mask seed {seed}  |  {cfg.masking.kind} masking, {hidden} of {n} tokens hidden "
             f"({100 * hidden / n:.0f}%)"]
    notes = captions(rec, cfg, gain, motion_style)
    folder = Path(out) if out is not None else (run_dir or ckpt_dir.parent) / "visualize"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{tag}-{source}-seed{seed}"
    image, layout = render_grid(rows, title, notes, cell)
    png = folder / f"{stem}.png"
    image.save(png)
    files = {"png": str(png)}
    if gif:
        render_gif(rows, f"run {cfg.name}  |  {tag}  |  {source}  |  seed {seed}", cell, folder / f"{stem}.gif")
        files["gif"] = str(folder / f"{stem}.gif")
    summary = {"checkpoint": str((ckpt_dir / tag).resolve()), "tag": tag, "run": cfg.name, "clip": desc,
               "seed": seed, "hidden_tokens": hidden, "tokens": n, "losses": rec.losses,
               "appearance": cfg.targets.appearance, "motion": cfg.targets.motion,
               "code_agreement": rec.agreement_fraction, "motion_gain": gain, "grid": {
                   "rows": [p.label.replace("\n", " ") for p in rows], "columns": layout.cols, "cell": cell,
                   "size": list(layout.size)}, "captions": notes, "files": files}
    files["json"] = str(folder / f"{stem}.json")
    Path(files["json"]).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _one_line(exc: BaseException) -> str:
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmam.visualize", description=__doc__.splitlines()[0],
                                epilog="exit status: " + "; ".join(f"{k} {v}" for k, v in EXIT_STATUSES.items()))
    p.add_argument("path", help="run folder (output_dir), its checkpoints/ folder, or one checkpoint folder")
    clip = p.add_mutually_exclusive_group(required=True)
    clip.add_argument("--video", default=None, help="a video file: its centre clip and centre crop at the run's view")
    clip.add_argument("--synthetic", type=int, default=None, metavar="INDEX",
                      help="item INDEX of the run's synthetic clips (0 .. data.num_samples-1)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/visualize)")
    p.add_argument("--tag", default=None, help="checkpoint tag (step_<N>); default: the newest complete one")
    p.add_argument("--seed", type=int, default=0, help="masking noise seed: the same seed draws the same mask")
    p.add_argument("--gif", action="store_true", help="also an animated GIF of the rows")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--scale", type=int, default=None,
                   help="cell side in multiples of data.img_size (default: at least 128 pixels)")
    p.add_argument("--motion-style", choices=MOTION_STYLES, default="grey",
                   help="motion rows: offset grey per RGB channel, or a blue-white-red map of the channel mean")
    p.add_argument("--vqgan-checkpoint", default=None,
                   help="the VQGAN's taming checkpoint, if not where the run's targets.vqgan.checkpoint says")
    args = p.parse_args(argv)
    from .models.vqgan import CheckpointMismatch, MissingCheckpoint

    try:
        summary = visualize(args.path, video=args.video, synthetic=args.synthetic, out=args.out, tag=args.tag,
                            seed=args.seed, gif=args.gif, device=args.device, scale=args.scale,
                            motion_style=args.motion_style, vqgan_checkpoint=args.vqgan_checkpoint)
    except (VisualizeError, ExportError, ConfigError, MissingCheckpoint, CheckpointMismatch, yaml.YAMLError) as exc:
        print(f"fastmam.visualize: {_one_line(exc)}", file=sys.stderr)
        return 2
    for kind, file in summary["files"].items():
        print(f"fastmam.visualize: {kind} written to {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
