"""AdamW with MAE's parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config, peak_lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, mask tokens and other 1-D parameters (MAE's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """lr(step) / peak: linear warmup 0 -> peak over ``warmup`` steps, then cosine peak -> min_lr at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))) / peak


def build_optimizer(model: nn.Module, cfg: Config, world_size: int, device_type: str):
    """AdamW at the scaled peak lr and a LambdaLR that DeepSpeed steps once per optimizer step."""
    peak = peak_lr(cfg, world_size)
    o = cfg.optim
    kwargs = {"fused": True} if device_type == "cuda" else {}
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=peak, betas=o.betas, eps=o.eps, **kwargs)
    min_lr = peak * o.min_lr / o.base_lr  # scaled by global batch / 256 like the peak (VideoMAE)
    sched = cfg.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, peak, min_lr, sched.warmup_steps, sched.steps)
    )
    return optimizer, scheduler
