"""The MAM2 encoder-regressor-decoder video ViT, and the pretraining objective around it.

Data flow of one step (DESIGN §4)::

    uint8 clip (B, T, H, W, C), noise
      tube_mask_gather  -> visible patches (B, Nv, t*p*p*C), ids_keep, ids_masked, mask
      forward_encoder   -> latents (B, Nv, D)          linear patch embed + sinusoid pos + ViT blocks
      decoder_masking   -> ids_decode (B, Nd)          VideoMAE V2's subset of ids_masked (masking.decoder), else
                                                       Nd = Nm and ids_decode = ids_masked
      forward_regressor -> masked latents (B, Nd, D)   mask queries cross-attend the latents (CAE)
      forward_decoders  -> appearance hidden (B, Nd, Da), motion prediction (B, Nd, Dm)
      targets           -> pixels or codes, RGB differences (ids_decode tokens only, from the same clip)
      dual_decoder_loss -> total, appearance, motion (means over the B * Nd decoded tokens)

Codes come from the tokenizer inside the step (``targets.codes: online``; a frozen VQGAN, kept out of
the module tree that DeepSpeed casts, partitions and checkpoints) or with the batch (``cached``).

With ``regressor_depth == 0`` the model is VideoMAE's: no regressor, and each decoder sees the
visible latents and mask tokens together and predicts the masked ones. The model predicts whichever masked tokens
it is given (``ids_masked`` of its methods): all of them, or ``ids_decode`` with decoder masking.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import Config, resolve_precision
from ..ops.loss import motion_term
from ..ops.motion_targets import HOG_BINS, HOG_CELL, hog_values, trajectory_values
from .attention import attention_function
from .layers import LN_EPS, Block, CrossBlock, init_weights, sinusoid_table
from .tokenizer import (
    AppearanceTokenizer,
    RandomTokenizer,
    clip_codes,
    codes_per_token,
    select_code_frames,
    token_codes,
)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, ckpt: bool, *extra: torch.Tensor) -> torch.Tensor:
    for blk in blocks:
        if ckpt and torch.is_grad_enabled():
            # recompute each block in backward: activations of one block at a time
            x = checkpoint(blk, x, *extra, use_reentrant=False)
        else:
            x = blk(x, *extra)
    return x


class Decoder(nn.Module):
    """One decoder: embed (D -> Dd) + sinusoid positions, blocks, norm -> hidden (B, Nm, Dd).

    ``full_sequence`` (VideoMAE): the input is the visible latents; mask tokens are appended at the positions of
    ``ids_masked`` (all masked tokens, or only ``ids_decode``) and their hidden states are returned. Otherwise (MAM2)
    the input is already one latent per token of ``ids_masked``.
    """

    def __init__(self, in_dim, dim, depth, num_heads, mlp_ratio, qkv_bias, num_tokens, full_sequence, ckpt, attend):
        super().__init__()
        self.full_sequence = full_sequence
        self.ckpt = ckpt
        self.embed = nn.Linear(in_dim, dim)
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, dim), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if full_sequence else None
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias, attend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        pos = self.pos_embed.to(x.dtype)
        x = self.embed(x)
        num_masked = ids_masked.shape[1]
        if self.full_sequence:
            masked = self.mask_token.to(x.dtype) + F.embedding(ids_masked, pos)
            x = torch.cat([x + F.embedding(ids_keep, pos), masked], dim=1)
        else:
            x = x + F.embedding(ids_masked, pos)
        x = _run_blocks(self.blocks, x, self.ckpt)
        return self.norm(x[:, -num_masked:])


def configured_attention(cfg: Config):
    """The attention function of ``model.attention``, checked against the device and precision of the run:
    a backend that cannot run there fails when the model is built, with the fix in the message."""
    device_type = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    dtype = torch.bfloat16 if device_type == "cuda" and resolve_precision(cfg, device_type) == "bf16" else torch.float32
    return attention_function(cfg.model.attention, device_type, dtype)


class ModelOutput(NamedTuple):
    """appearance_hidden: (B, Nm, Da) before the appearance head, (B, Nm, t, Da) with one row per code frame
    (``targets.code_frame: all``); motion_pred: (B, Nm, Dm) or None."""

    appearance_hidden: torch.Tensor
    motion_pred: torch.Tensor | None


class MaskedVideoModel(nn.Module):
    """Encoder (visible tokens only), optional CAE regressor, appearance and motion decoders -- or, with
    ``model.shared_decoder`` (MME), one ``decoder`` whose output feeds a Linear-GELU-Linear head per target
    (``appearance_hidden`` + ``appearance_head``; ``motion_head``).

    The appearance head (``appearance_head``: Da -> appearance_dim) is applied inside the loss so
    that fused backends never materialize the (M x codebook) logits; the motion head is applied here.
    With ``appearance_rows`` r > 1 (one code per frame of a tubelet), ``appearance_frames`` (Da -> r*Da)
    turns each masked token's hidden state into r rows, one per frame, that share the head.
    """

    def __init__(self, cfg: Config, appearance_dim: int, motion_dim: int | None, in_chans: int = 3,
                 appearance_rows: int = 1):
        super().__init__()
        m = cfg.model
        self.cfg = m
        self.num_tokens = cfg.num_tokens
        ckpt = m.activation_checkpointing
        attend = configured_attention(cfg)
        self.patch_embed = nn.Linear(m.tubelet * m.patch * m.patch * in_chans, m.embed_dim)
        self.register_buffer("pos_embed", sinusoid_table(self.num_tokens, m.embed_dim), persistent=False)
        self.blocks = nn.ModuleList(
            Block(m.embed_dim, m.num_heads, m.mlp_ratio, m.qkv_bias, attend) for _ in range(m.depth)
        )
        self.norm = nn.LayerNorm(m.embed_dim, eps=LN_EPS)

        self.has_regressor = m.regressor_depth > 0
        if self.has_regressor:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, m.embed_dim))
            self.regressor = nn.ModuleList(
                CrossBlock(m.embed_dim, m.num_heads, m.mlp_ratio, m.qkv_bias, attend) for _ in range(m.regressor_depth)
            )
            self.regressor_norm = nn.LayerNorm(m.embed_dim, eps=LN_EPS)

        def decoder():
            return Decoder(m.embed_dim, m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mlp_ratio, m.qkv_bias,
                           self.num_tokens, full_sequence=not self.has_regressor, ckpt=ckpt, attend=attend)

        def hidden_layer():  # MME's heads are Linear-GELU-Linear; this is their first Linear and the GELU
            return nn.Sequential(nn.Linear(m.decoder_dim, m.decoder_dim), nn.GELU())

        self.shared_decoder = m.shared_decoder
        if self.shared_decoder:
            # MME: one decoder; each target's head is Linear-GELU-Linear. The appearance head's last Linear stays
            # ``appearance_head``, applied inside the loss as in the separate-decoder layout
            self.decoder = decoder()
            self.appearance_decoder = None
            self.appearance_hidden = hidden_layer()
        else:
            self.appearance_decoder = decoder()
        self.appearance_frames = nn.Linear(m.decoder_dim, appearance_rows * m.decoder_dim) if appearance_rows > 1 \
            else None
        self.appearance_head = nn.Linear(m.decoder_dim, appearance_dim)
        self.motion_decoder = decoder() if motion_dim and not self.shared_decoder else None
        self.motion_head = None
        if motion_dim:
            last = nn.Linear(m.decoder_dim, motion_dim)
            self.motion_head = nn.Sequential(*hidden_layer(), last) if self.shared_decoder else last

        self.apply(init_weights)
        # patch embedding initialized like a flattened conv kernel (MAE)
        nn.init.xavier_uniform_(self.patch_embed.weight)
        for p in (getattr(self, "mask_token", None), getattr(self.appearance_decoder, "mask_token", None),
                  getattr(self.motion_decoder, "mask_token", None), getattr(getattr(self, "decoder", None),
                                                                           "mask_token", None)):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def forward_encoder(self, patches: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """patches: (B, Nv, t*p*p*C), ids_keep: (B, Nv) -> latents (B, Nv, D)."""
        x = self.patch_embed(patches) + F.embedding(ids_keep, self.pos_embed.to(patches.dtype))
        x = _run_blocks(self.blocks, x, self.cfg.activation_checkpointing)
        return self.norm(x)

    def forward_regressor(self, latents: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor):
        """Mask queries (mask token + position) cross-attend the latents -> (B, Nm, D)."""
        pos = self.pos_embed.to(latents.dtype)
        queries = self.mask_token.to(latents.dtype) + F.embedding(ids_masked, pos)
        context = latents + F.embedding(ids_keep, pos)
        x = _run_blocks(self.regressor, queries, self.cfg.activation_checkpointing, context)
        return self.regressor_norm(x)

    def forward_decoders(self, x: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor) -> ModelOutput:
        if self.shared_decoder:  # MME: one decoder, a head per target
            hidden = self.decoder(x, ids_keep, ids_masked)
            appearance = self.appearance_hidden(hidden)
            if self.appearance_frames is not None:
                appearance = self.appearance_frames(appearance).unflatten(-1, (-1, appearance.shape[-1]))
            motion = self.motion_head(hidden) if self.motion_head is not None else None
            return ModelOutput(appearance, motion)
        appearance = self.appearance_decoder(x, ids_keep, ids_masked)
        if self.appearance_frames is not None:  # (B, Nm, Da) -> (B, Nm, t, Da)
            appearance = self.appearance_frames(appearance).unflatten(-1, (-1, appearance.shape[-1]))
        motion = None
        if self.motion_decoder is not None:
            motion = self.motion_head(self.motion_decoder(x, ids_keep, ids_masked))
        return ModelOutput(appearance, motion)

    def forward(self, patches: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor) -> ModelOutput:
        x = self.forward_encoder(patches, ids_keep)
        if self.has_regressor:
            x = self.forward_regressor(x, ids_keep, ids_masked)
        return self.forward_decoders(x, ids_keep, ids_masked)


def appearance_values(cfg: Config, in_chans: int = 3) -> int:
    """Outputs of the appearance head per row: the codebook (codes), t*p*p*C normalized pixels, or MME's HOG
    descriptor ((p/8)^2 cells x 9 bins x C: 108 for p=16)."""
    m, tg = cfg.model, cfg.targets
    if tg.uses_codes:
        return tg.num_codes
    if tg.appearance == "hog":
        return hog_values(m.patch, HOG_CELL, HOG_BINS, in_chans)
    return m.tubelet * m.patch * m.patch * in_chans


def motion_values(cfg: Config, in_chans: int = 3) -> int:
    """Outputs of the motion head per token (0 without motion): RGB differences (t-1 consecutive pairs per tubelet;
    t for the dense variant) of p*p*C values, or MME's trajectories ((p/8)^2 points x L steps x (dx, dy))."""
    m, tg = cfg.model, cfg.targets
    if tg.motion == "trajectory":
        return trajectory_values(m.patch, tg.trajectory_length)
    frames = {"rgb_diff": m.tubelet - 1, "rgb_diff_dense": m.tubelet, "none": 0}[tg.motion]
    return frames * m.patch * m.patch * in_chans


def build_tokenizer(cfg: Config) -> AppearanceTokenizer | None:
    """The tokenizer that computes codes inside the step: None for pixel targets and for cached codes.

    ``appearance: vqgan`` reads ``targets.vqgan.checkpoint`` (strict; a missing file names where to get one)."""
    tg = cfg.targets
    if tg.appearance == "random_codes":
        return RandomTokenizer(tg.codebook_size, cfg.model.patch, seed=cfg.seed)
    if tg.appearance == "vqgan" and tg.codes == "online":
        from .vqgan import VQGANTokenizer

        return VQGANTokenizer.load(tg.vqgan)
    return None


def _device_of(module: nn.Module) -> torch.device | None:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


class Pretrainer(nn.Module):
    """The whole objective: uint8 clip + noise -> ``ops.LossOutput``. This is what DeepSpeed wraps.

    ``tokenizer``: the online code tokenizer; by default ``build_tokenizer(cfg)``. It is not a submodule:
    frozen weights that come from their own file at every start, so DeepSpeed neither casts them to bf16
    (the VQGAN keeps an fp32 codebook and uses autocast), nor partitions them (ZeRO-3), nor saves them in
    its checkpoints. It follows the clip to its device on first use.
    """

    def __init__(self, cfg: Config, in_chans: int = 3, tokenizer: AppearanceTokenizer | None = None):
        super().__init__()
        self.cfg = cfg
        m, tg = cfg.model, cfg.targets
        self.uses_codes = tg.uses_codes
        appearance_dim = appearance_values(cfg, in_chans)
        self.codes_per_token = codes_per_token(m.tubelet, tg.code_frame) if self.uses_codes else 1
        motion_dim = motion_values(cfg, in_chans) or None
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)  # first: a missing file fails fast
        if tokenizer is not None:
            if not self.uses_codes:
                raise ValueError("a tokenizer was given but targets.appearance='pixel' trains on pixels")
            if (tokenizer.codebook_size, tokenizer.downsample) != (appearance_dim, m.patch):
                raise ValueError(
                    f"the tokenizer has {tokenizer.codebook_size} codes on {tokenizer.downsample}-pixel cells; the "
                    f"config expects {appearance_dim} codes (targets) on model.patch={m.patch}-pixel tokens"
                )
            tokenizer.requires_grad_(False)
        object.__setattr__(self, "_tokenizer", tokenizer)  # not registered as a submodule (see the docstring)
        self.model = MaskedVideoModel(cfg, appearance_dim, motion_dim, in_chans, self.codes_per_token)
        self.backend = None if cfg.backend == "auto" else cfg.backend

    @property
    def tokenizer(self) -> AppearanceTokenizer | None:
        return self._tokenizer

    def noise_shape(self, batch: int) -> tuple[int, int]:
        """Shape of the masking noise: (B, S) for tube masking, (B, N) for per-token masking; with decoder masking
        ``decoder_noise_positions(N) = 1 + N`` more columns follow, the decoder's own (``split_noise``)."""
        s = (self.cfg.data.img_size // self.cfg.model.patch) ** 2
        positions = s if self.cfg.masking.kind == "tube" else self.cfg.num_tokens
        if self.cfg.masking.decoder != "none":
            positions += ops.decoder_noise_positions(self.cfg.num_tokens)
        return batch, positions

    def split_noise(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``noise_shape(B)`` noise -> (the encoder mask's (B, S) or (B, N), the decoder masking's (B, 1 + N) or
        None without decoder masking). One draw per step feeds both, so a resumed run masks exactly the same."""
        if self.cfg.masking.decoder == "none":
            return noise, None
        positions = self.noise_shape(1)[1]
        decoder = ops.decoder_noise_positions(self.cfg.num_tokens)
        if noise.dim() != 2 or noise.shape[1] != positions:
            raise ValueError(
                f"noise of shape {tuple(noise.shape)} does not match the config: with masking.decoder="
                f"'{self.cfg.masking.decoder}' it is noise_shape(B) = (B, {positions}): the encoder mask's "
                f"{positions - decoder} positions, then the decoder's {decoder} columns"
            )
        encoder = positions - decoder
        # contiguous copies: a few bytes per clip, and every backend's kernels take plain (B, P) rows
        return noise[:, :encoder].contiguous(), noise[:, encoder:].contiguous()

    def decoded_ids(self, ids_masked: torch.Tensor, decoder_noise: torch.Tensor | None) -> torch.Tensor:
        """The masked tokens the regressor, decoders, targets and loss cover: ``ids_decode`` (B, Nd) of VideoMAE V2's
        decoder masking (``masking.decoder``), or ``ids_masked`` itself (B, Nm) without it."""
        mk = self.cfg.masking
        if mk.decoder == "none":
            return ids_masked
        m, d = self.cfg.model, self.cfg.data
        grid = (d.num_frames // m.tubelet, d.img_size // m.patch, d.img_size // m.patch)
        # sorts of (B, N) values on the device; there is no fused kernel of it (nor a need: it touches no pixels)
        return ops.decoder_masking(decoder_noise, ids_masked, mk.decoder_ratio, grid, mk.decoder, backend="reference")

    def appearance_codes(self, clip: torch.Tensor, ids_masked: torch.Tensor,
                         frame_codes: torch.Tensor | None = None) -> torch.Tensor:
        """Code targets of the tokens of ``ids_masked`` (B, M) (all masked tokens, or ``ids_decode``): (B, M) int64,
        or (B, M, t) for ``code_frame: all``.

        frame_codes: (B, T, H/p, W/p) integer codes of every clip frame from the loader (cached codes); None:
        the tokenizer encodes the code frames of ``clip`` (B, T, H, W, C) uint8."""
        m, frame = self.cfg.model, self.cfg.targets.code_frame
        if frame_codes is not None:
            b, t, h, w = clip.shape[:4]
            if tuple(frame_codes.shape) != (b, t, h // m.patch, w // m.patch):
                raise ValueError(f"codes of shape {tuple(frame_codes.shape)} do not match the clip: expected "
                                 f"(B, T, H/p, W/p) = {(b, t, h // m.patch, w // m.patch)}")
            codes = token_codes(select_code_frames(frame_codes, m.tubelet, frame), m.tubelet, frame)
        elif self._tokenizer is not None:
            tok = self._tokenizer
            if _device_of(tok) != clip.device:
                tok.to(clip.device)  # once: the first step on this device
            codes = clip_codes(tok, clip, m.tubelet, frame)
        else:
            raise ValueError("targets.codes='cached' needs the batch's codes (the loader's 'codes'); none were given")
        k = self.codes_per_token
        index = ids_masked if k == 1 else ids_masked.unsqueeze(-1).expand(-1, -1, k)
        return torch.gather(codes, 1, index).long()

    def forward(self, clip: torch.Tensor, noise: torch.Tensor, next_clip: torch.Tensor | None = None,
                codes: torch.Tensor | None = None, *, trajectories: torch.Tensor | None = None,
                trajectory_valid: torch.Tensor | None = None) -> ops.LossOutput:
        """clip: (B, T, H, W, C) uint8; noise: ``noise_shape(B)`` float -> LossOutput (fp32 scalars).

        next_clip: (B, T, H, W, C) uint8, the raw frame after each frame of ``clip``; required for
        ``targets.motion: rgb_diff_dense``. codes: (B, T, H/p, W/p) integer, the loader's cached codes of
        every frame (``targets.codes: cached``). trajectories: (B, T/t, H/8, W/8, L, 2) float (dx, dy) px per step
        of the points of each tubelet's first frame, and trajectory_valid: (B, T/t, H/8, W/8) bool, the loader's
        ``trajectories`` / ``trajectory_valid`` (``targets.motion: trajectory``; format: ``ops.trajectory_target``).

        The loss has two terms, weighted by loss.appearance_weight / loss.motion_weight: appearance (CE over codes,
        or MSE of the head's output against normalized pixels or HOG descriptors; ``ops.dual_decoder_loss``) and
        motion (MSE against RGB differences, or ``ops.trajectory_loss``: MSE over the valid trajectory entries)."""
        cfg, m = self.cfg, self.cfg.model
        d, tg = cfg.data, cfg.targets
        expected = (d.num_frames, d.img_size, d.img_size)
        if clip.dim() != 5 or tuple(clip.shape[1:4]) != expected:
            raise ValueError(
                f"clip of shape {tuple(clip.shape)} does not match the config: expected (B, {d.num_frames}, "
                f"{d.img_size}, {d.img_size}, C) uint8 (data.num_frames, data.img_size)"
            )
        dense = tg.motion == "rgb_diff_dense"
        if dense and next_clip is None:
            raise ValueError("targets.motion='rgb_diff_dense' needs next_clip (the loader's 'next_video')")
        trajectory = tg.motion == "trajectory"
        if trajectory and (trajectories is None or trajectory_valid is None):
            raise ValueError("targets.motion='trajectory' needs trajectories= and trajectory_valid= (the loader's "
                             "'trajectories' and 'trajectory_valid')")
        be = self.backend
        noise, decoder_noise = self.split_noise(noise)
        vis = ops.tube_mask_gather(clip, noise, cfg.masking.ratio, m.tubelet, m.patch, cfg.data.mean, cfg.data.std,
                                   out_dtype=self.model.patch_embed.weight.dtype, masking=cfg.masking.kind, backend=be)
        # the tokens to reconstruct: every masked one, or VideoMAE V2's decoder subset; the targets are computed
        # for those alone
        ids = self.decoded_ids(vis.ids_masked, decoder_noise)
        out = self.model(vis.patches, vis.ids_keep, ids)
        with torch.no_grad():
            if self.uses_codes:
                target = self.appearance_codes(clip, ids, codes)
            elif tg.appearance == "hog":
                target = ops.hog_target(clip, ids, m.tubelet, m.patch, "first", backend=be)
            else:
                target = ops.pixel_target(clip, ids, m.tubelet, m.patch, tg.normalize_pixels, backend=be)
            motion_target = motion_weight = None
            if trajectory:
                motion_target, motion_weight = ops.trajectory_target(trajectories, trajectory_valid, ids, m.tubelet,
                                                                     m.patch, tg.trajectory_norm, backend=be)
            elif out.motion_pred is not None:
                motion_target = ops.rgb_diff_target(clip, ids, m.tubelet, m.patch, tg.normalize_motion,
                                                    next_clip=next_clip if dense else None, backend=be)
        head = self.model.appearance_head
        wa, wm = cfg.loss.appearance_weight, cfg.loss.motion_weight
        if self.codes_per_token == 1 and not trajectory:
            return ops.dual_decoder_loss(out.appearance_hidden, head.weight, head.bias, target, out.motion_pred,
                                         motion_target, wa, wm, backend=be)
        # the appearance term alone from dual_decoder_loss: code_frame 'all' has t appearance rows per masked token
        # (B*Nd*t rows through the same fused head + CE) but one motion row per token; trajectories have their own
        # masked MSE (over the valid entries only)
        appearance = ops.dual_decoder_loss(out.appearance_hidden, head.weight, head.bias, target, backend=be).appearance
        if trajectory:
            motion = ops.trajectory_loss(out.motion_pred, motion_target, motion_weight)
        else:
            motion = motion_term(out.motion_pred, motion_target, ids.numel(), None, appearance)
        return ops.LossOutput(wa * appearance + wm * motion, appearance, motion)
