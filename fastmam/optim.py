"""AdamW with MAE's parameter groups, the warmup + cosine learning-rate schedule, and the guard that skips
optimizer steps whose loss or gradients are not finite."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
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
    # fused (CUDA, and CPU since torch 2.4): one kernel per step, and it honours ``found_inf`` (NonFiniteGuard)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=peak, betas=o.betas, eps=o.eps, fused=True)
    min_lr = peak * o.min_lr / o.base_lr  # scaled by global batch / 256 like the peak (VideoMAE)
    sched = cfg.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, peak, min_lr, sched.warmup_steps, sched.steps)
    )
    return optimizer, scheduler


class NonFiniteGuard:
    """Skips the optimizer steps whose loss or gradients hold NaN or inf, on the device, without a host sync.

    ``observe(loss)`` after each micro-step's forward records whether the loss is finite; a pre-step hook on the
    torch optimizer (which DeepSpeed calls on the full or partitioned fp32 weights, also when ZeRO shards them)
    adds whether every gradient is finite, agrees across ranks (MAX all-reduce: a partition's skip is everyone's)
    and hands the flag to fused AdamW as ``found_inf``, which then leaves weights, moments and step count as
    they were. ``end_step()`` closes the optimizer step (also when DeepSpeed skipped it itself, as its bf16
    path does for non-finite gradients). Counters stay on the device until ``read()``, at log intervals.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.device = device
        self._bad = torch.zeros((), device=device)  # this optimizer step: 1.0 once a micro-step's loss is bad
        self._skipped = torch.zeros((), device=device)  # skipped steps since the last read
        self._run = torch.zeros((), device=device)  # current run of consecutive skipped steps
        self._longest = torch.zeros((), device=device)  # longest run since the last read
        self._first = torch.full((), -1.0, device=device)  # first skipped step since the last read
        optimizer.register_step_pre_hook(self._before_step)

    def observe(self, loss: torch.Tensor) -> None:
        """loss: a scalar of this micro-step."""
        self._bad = torch.maximum(self._bad, (~torch.isfinite(loss.detach())).to(self._bad.dtype))

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = self._bad.to(grads[0].device if grads else self.device)
        if grads:
            # the sum of the per-tensor norms is finite iff every gradient element is
            norms = torch._foreach_norm(grads)
            bad = torch.maximum(bad, (~torch.isfinite(torch.stack(norms).sum())).to(bad.dtype))
        if dist.is_initialized() and dist.get_world_size() > 1:
            # offloaded partitions live on the CPU; nccl reduces device tensors
            reduced = bad.to(self.device)
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
            bad = reduced.to(bad.device)
        self._bad = bad.to(self.device)
        optimizer.found_inf = bad.float()

    def end_step(self, step: int) -> None:
        """After optimizer step number ``step`` (the last micro-step's ``engine.step()``)."""
        bad = self._bad
        self._skipped += bad
        self._run = (self._run + 1) * bad
        self._longest = torch.maximum(self._longest, self._run)
        self._first = torch.where((self._first < 0) & (bad > 0), torch.full_like(self._first, step), self._first)
        self._bad = torch.zeros_like(bad)

    def read(self) -> dict:
        """Host sync, collective: {skipped, longest_run, first_step (or None)} since the last read, the same on every
        rank; resets those counters (the current run of consecutive skips carries on)."""
        stats = torch.stack([self._skipped, self._longest, self._first])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # every rank then takes the same decision
        skipped, longest, first = (int(v) for v in stats.tolist())
        self._skipped.zero_()
        self._longest.copy_(self._run)
        self._first.fill_(-1)
        return {"skipped": skipped, "longest_run": longest, "first_step": first if first >= 0 else None}
