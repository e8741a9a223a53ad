"""The MAM2 encoder-regressor-decoder video ViT, and the pretraining objective around it.

Data flow of one step (DESIGN §4)::

    uint8 clip (B, T, H, W, C), noise
      tube_mask_gather  -> visible patches (B, Nv, t*p*p*C), ids_keep, ids_masked, mask
      forward_encoder   -> latents (B, Nv, D)          linear patch embed + sinusoid pos + ViT blocks
      forward_regressor -> masked latents (B, Nm, D)   mask queries cross-attend the latents (CAE)
      forward_decoders  -> appearance hidden (B, Nm, Da), motion prediction (B, Nm, Dm)
      targets           -> pixels or codes, RGB differences (masked tokens only, from the same clip)
      dual_decoder_loss -> total, appearance, motion

With ``regressor_depth == 0`` the model is VideoMAE's: no regressor, and each decoder sees the
visible latents and mask tokens together and predicts the masked ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import Config, resolve_precision
from .attention import attention_function
from .layers import LN_EPS, Block, CrossBlock, init_weights, sinusoid_table
from .tokenizer import AppearanceTokenizer, RandomTokenizer, clip_codes


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

    ``full_sequence`` (VideoMAE): the input is the visible latents; mask tokens are appended and the
    hidden states of the masked positions are returned. Otherwise (MAM2) the input is already one
    latent per masked token.
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
    """appearance_hidden: (B, Nm, Da) before the appearance head; motion_pred: (B, Nm, Dm) or None."""

    appearance_hidden: torch.Tensor
    motion_pred: torch.Tensor | None


class MaskedVideoModel(nn.Module):
    """Encoder (visible tokens only), optional CAE regressor, appearance and motion decoders.

    The appearance head (``appearance_head``: Da -> appearance_dim) is applied inside the loss so
    that fused backends never materialize the (M x codebook) logits; the motion head is applied here.
    """

    def __init__(self, cfg: Config, appearance_dim: int, motion_dim: int | None, in_chans: int = 3):
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

        self.appearance_decoder = decoder()
        self.appearance_head = nn.Linear(m.decoder_dim, appearance_dim)
        self.motion_decoder = decoder() if motion_dim else None
        self.motion_head = nn.Linear(m.decoder_dim, motion_dim) if motion_dim else None

        self.apply(init_weights)
        # patch embedding initialized like a flattened conv kernel (MAE)
        nn.init.xavier_uniform_(self.patch_embed.weight)
        for p in (getattr(self, "mask_token", None), self.appearance_decoder.mask_token,
                  getattr(self.motion_decoder, "mask_token", None)):
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
        appearance = self.appearance_decoder(x, ids_keep, ids_masked)
        motion = None
        if self.motion_decoder is not None:
            motion = self.motion_head(self.motion_decoder(x, ids_keep, ids_masked))
        return ModelOutput(appearance, motion)

    def forward(self, patches: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor) -> ModelOutput:
        x = self.forward_encoder(patches, ids_keep)
        if self.has_regressor:
            x = self.forward_regressor(x, ids_keep, ids_masked)
        return self.forward_decoders(x, ids_keep, ids_masked)


def build_tokenizer(cfg: Config) -> AppearanceTokenizer | None:
    if cfg.targets.appearance == "random_codes":
        return RandomTokenizer(cfg.targets.codebook_size, cfg.model.patch, seed=cfg.seed)
    return None


class Pretrainer(nn.Module):
    """The whole objective: uint8 clip + noise -> ``ops.LossOutput``. This is what DeepSpeed wraps."""

    def __init__(self, cfg: Config, in_chans: int = 3):
        super().__init__()
        self.cfg = cfg
        m, tg = cfg.model, cfg.targets
        pixels = m.tubelet * m.patch * m.patch * in_chans
        appearance_dim = pixels if tg.appearance == "pixel" else tg.codebook_size
        # consecutive differences: t-1 per tubelet; dense (each frame minus the next raw frame): t
        motion_frames = {"rgb_diff": m.tubelet - 1, "rgb_diff_dense": m.tubelet, "none": 0}[tg.motion]
        motion_dim = motion_frames * m.patch * m.patch * in_chans or None
        self.model = MaskedVideoModel(cfg, appearance_dim, motion_dim, in_chans)
        self.tokenizer = build_tokenizer(cfg)
        self.backend = None if cfg.backend == "auto" else cfg.backend
        if self.tokenizer is not None:
            self.tokenizer.requires_grad_(False)

    def noise_shape(self, batch: int) -> tuple[int, int]:
        """Shape of the masking noise: (B, S) for tube masking, (B, N) for per-token masking."""
        s = (self.cfg.data.img_size // self.cfg.model.patch) ** 2
        return (batch, s) if self.cfg.masking.kind == "tube" else (batch, self.cfg.num_tokens)

    def forward(self, clip: torch.Tensor, noise: torch.Tensor, next_clip: torch.Tensor | None = None) -> ops.LossOutput:
        """clip: (B, T, H, W, C) uint8; noise: ``noise_shape(B)`` float -> LossOutput (fp32 scalars).

        next_clip: (B, T, H, W, C) uint8, the raw frame after each frame of ``clip``; required for
        ``targets.motion: rgb_diff_dense``."""
        cfg, m = self.cfg, self.cfg.model
        d = cfg.data
        expected = (d.num_frames, d.img_size, d.img_size)
        if clip.dim() != 5 or tuple(clip.shape[1:4]) != expected:
            raise ValueError(
                f"clip of shape {tuple(clip.shape)} does not match the config: expected (B, {d.num_frames}, "
                f"{d.img_size}, {d.img_size}, C) uint8 (data.num_frames, data.img_size)"
            )
        dense = cfg.targets.motion == "rgb_diff_dense"
        if dense and next_clip is None:
            raise ValueError("targets.motion='rgb_diff_dense' needs next_clip (the loader's 'next_video')")
        be = self.backend
        vis = ops.tube_mask_gather(clip, noise, cfg.masking.ratio, m.tubelet, m.patch, cfg.data.mean, cfg.data.std,
                                   out_dtype=self.model.patch_embed.weight.dtype, masking=cfg.masking.kind, backend=be)
        out = self.model(vis.patches, vis.ids_keep, vis.ids_masked)
        with torch.no_grad():
            if self.tokenizer is None:
                target = ops.pixel_target(clip, vis.ids_masked, m.tubelet, m.patch, cfg.targets.normalize_pixels,
                                          backend=be)
            else:
                codes = clip_codes(self.tokenizer, clip, m.tubelet, cfg.targets.code_frame)
                target = torch.gather(codes, 1, vis.ids_masked)
            motion_target = None
            if out.motion_pred is not None:
                motion_target = ops.rgb_diff_target(clip, vis.ids_masked, m.tubelet, m.patch,
                                                    cfg.targets.normalize_motion,
                                                    next_clip=next_clip if dense else None, backend=be)
        head = self.model.appearance_head
        return ops.dual_decoder_loss(out.appearance_hidden, head.weight, head.bias, target, out.motion_pred,
                                     motion_target, cfg.loss.appearance_weight, cfg.loss.motion_weight, backend=be)
