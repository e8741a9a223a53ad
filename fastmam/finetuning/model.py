"""The video classifier of fine-tuning: the pretrained encoder on every token, VideoMAE's mean-pooling head.

    pixels (B, T, H, W, C), uint8 or float in [0, 255]
      patchify + normalize (data.mean / data.std) -> (B, N, t*p*p*C)
      patch embed + positions (sinusoid table, or learned) -> ViT blocks (stochastic depth) -> tokens (B, N, D)
      fc_norm(mean over tokens; classifier.pool=max: their per-channel max) -> dropout -> head -> logits (B, classes)

The encoder's parameter names are those of ``MaskedVideoModel`` (``patch_embed``, ``blocks.N``), so a pretrained
state loads by name. The encoder's final ``norm`` of pretraining is not part of it: VideoMAE's mean-pooling classifier
replaces it with ``fc_norm`` over the mean of the last block's tokens (``modeling_finetune.py``: ``norm = Identity``
when ``use_mean_pooling``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import LN_EPS, Block, init_weights, sinusoid_table
from ..models.mam import _run_blocks, configured_attention
from ..ops import normalize_patches, patchify_reference
from .config import FinetuneConfig


def token_grid(num_frames: int, img_size: int, tubelet: int, patch: int) -> tuple[int, int, int]:
    """(T/t, H/p, W/p): the token grid of a clip; tokens are ordered (time, row, column)."""
    return num_frames // tubelet, img_size // patch, img_size // patch


def resize_pos_embed(pos: torch.Tensor, grid_from: tuple[int, int, int], grid_to: tuple[int, int, int]) -> torch.Tensor:
    """Learned positions (N0, D) on a (T0, H0, W0) token grid -> (N, D) on (T, H, W), trilinear (align_corners
    False), as ViT/VideoMAE V2 interpolate position tables for another resolution or frame count."""
    n0, d = pos.shape
    if n0 != grid_from[0] * grid_from[1] * grid_from[2]:
        raise ValueError(f"a position table of {n0} rows does not fit the token grid {grid_from}")
    if tuple(grid_from) == tuple(grid_to):
        return pos.clone()
    x = pos.float().T.reshape(1, d, *grid_from)
    x = F.interpolate(x, size=tuple(grid_to), mode="trilinear", align_corners=False)
    return x.reshape(d, -1).T.contiguous().to(pos.dtype)


class VideoClassifier(nn.Module):
    """Encoder (all tokens) + mean-pooling head. ``forward(pixels) -> logits``; see the module docstring."""

    def __init__(self, cfg: FinetuneConfig, in_chans: int = 3):
        super().__init__()
        m, d, c = cfg.model, cfg.data, cfg.classifier
        self.cfg = m
        self.mean, self.std, self.in_chans, self.pool = d.mean, d.std, in_chans, c.pool
        self.grid = token_grid(d.num_frames, d.img_size, m.tubelet, m.patch)
        self.num_tokens = cfg.num_tokens
        attend = configured_attention(cfg)
        self.patch_embed = nn.Linear(m.tubelet * m.patch * m.patch * in_chans, m.embed_dim)
        table = sinusoid_table(self.num_tokens, m.embed_dim)
        if c.pos_embed == "learned":
            self.pos_embed = nn.Parameter(table)
        else:
            self.register_buffer("pos_embed", table, persistent=False)
        rates = torch.linspace(0, c.drop_path, m.depth).tolist()  # VideoMAE: linear in depth
        self.blocks = nn.ModuleList(Block(m.embed_dim, m.num_heads, m.mlp_ratio, m.qkv_bias, attend, drop_path=r)
                                    for r in rates)
        self.fc_norm = nn.LayerNorm(m.embed_dim, eps=LN_EPS)
        self.head_dropout = nn.Dropout(c.head_dropout)
        self.head = nn.Linear(m.embed_dim, c.num_classes)

        self.apply(init_weights)
        nn.init.xavier_uniform_(self.patch_embed.weight)
        # VideoMAE's head: trunc_normal(std .02), then weight and bias scaled by init_scale (0.001)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        with torch.no_grad():
            self.head.weight.mul_(c.head_init_scale)
            self.head.bias.mul_(c.head_init_scale)

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, T, H, W, C) uint8 or float in [0, 255] -> normalized patch vectors (B, N, t*p*p*C)."""
        if pixels.dim() != 5 or pixels.shape[-1] != self.in_chans:
            raise ValueError(f"pixels of shape {tuple(pixels.shape)}: expected (B, T, H, W, {self.in_chans})")
        if pixels.dtype == torch.uint8:
            x = patchify_reference(pixels, self.cfg.tubelet, self.cfg.patch)
        else:  # augmented (mixed, erased) pixels: the op's float layout is (B, C, T, H, W); the patches are the same
            x = patchify_reference(pixels.permute(0, 4, 1, 2, 3), self.cfg.tubelet, self.cfg.patch, layout="BCTHW")
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"a clip of shape {tuple(pixels.shape)} gives {x.shape[1]} tokens; the classifier was "
                             f"built for {self.num_tokens} (data.num_frames, data.img_size)")
        return normalize_patches(x, self.mean, self.std, self.in_chans, self.patch_embed.weight.dtype)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, T, H, W, C) -> the last block's tokens (B, N, D)."""
        x = self.patch_embed(self.patches(pixels)) + self.pos_embed.to(self.patch_embed.weight.dtype)
        return _run_blocks(self.blocks, x, self.cfg.activation_checkpointing)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, T, H, W, C) -> logits (B, classes)."""
        tokens = self.forward_features(pixels)
        pooled = self.fc_norm(tokens.amax(1) if self.pool == "max" else tokens.mean(1))
        return self.head(self.head_dropout(pooled))

    def layer_id(self, name: str) -> int:
        """VideoMAE's ``get_num_layer_for_vit``: positions and patch embedding 0, block i -> i + 1, the rest
        (fc_norm, head) depth + 1."""
        if name.startswith(("patch_embed", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1


def layer_decay_groups(model: VideoClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups of ``model``: one per (layer, decay or not), with ``lr_scale = layer_decay ** (depth + 1 -
    layer)`` and no weight decay on 1-D parameters, biases and positions (VideoMAE's ``get_parameter_groups`` with
    ``LayerDecayValueAssigner``). Each group has ``params``, ``weight_decay``, ``lr_scale``, ``layer`` and ``names``."""
    top = len(model.blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or name == "pos_embed"
        layer = model.layer_id(name)
        g = groups.setdefault((layer, no_decay), {
            "params": [], "names": [], "layer": layer, "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (top - layer),
        })
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]
