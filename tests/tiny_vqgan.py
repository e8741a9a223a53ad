"""A tiny randomly initialized VQGAN of taming's architecture (``vqgan.TINY_F8``: f = 8, the tiny presets'
patch), written as taming writes its checkpoints. Fast on a CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from fastmam.models.vqgan import TINY_F8, VQGANTokenizer


def vqgan_overrides(checkpoint: str | Path = "", **extra) -> list[str]:
    """Config overrides for ``targets.appearance=vqgan`` with the tiny VQGAN (and its checkpoint)."""
    keys = {**TINY_F8, **extra}
    return ["targets.appearance=vqgan", f"targets.vqgan.checkpoint={checkpoint}",
            *[f"targets.vqgan.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in keys.items()]]


def write_taming_checkpoint(path: str | Path, vqgan_cfg, seed: int = 0) -> Path:
    """A random VQGAN of ``vqgan_cfg``'s architecture as a taming ``last.ckpt``: ``{"state_dict": ...}`` with the
    decoder, post_quant_conv and loss weights that a tokenizer drops, and Lightning's bookkeeping keys."""
    torch.manual_seed(seed)
    tok = VQGANTokenizer.from_config(vqgan_cfg)
    with torch.no_grad():
        tok.quantize.embedding.weight.normal_()  # spread-out codewords: many distinct codes
    state = dict(tok.state_dict())
    z, e = vqgan_cfg.z_channels, vqgan_cfg.embed_dim
    state.update({"decoder.conv_in.weight": torch.randn(vqgan_cfg.ch, z, 3, 3), "decoder.conv_in.bias": torch.zeros(
        vqgan_cfg.ch), "post_quant_conv.weight": torch.randn(z, e, 1, 1), "post_quant_conv.bias": torch.zeros(z),
        "loss.logvar": torch.zeros(())})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0}, path)
    return path
