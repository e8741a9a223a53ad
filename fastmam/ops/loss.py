"""The dual-decoder loss of MAM2: appearance (codes CE, or pixel MSE) plus motion (RGB-difference MSE).

``total = appearance_weight * appearance + motion_weight * motion``, each term a mean over masked
tokens (weighted by ``token_weight`` when given; codes equal to ``ignore_index`` left out of the appearance
term). A term with nothing to average is 0. The appearance head is applied inside the loss
(``h @ W.T + b``) so that fused backends can avoid materializing the (M x K) logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import check_in_range, check_same_device


class LossOutput(NamedTuple):
    """total, appearance, motion: fp32 scalars (motion is 0 when there is no motion term)."""

    total: torch.Tensor
    appearance: torch.Tensor
    motion: torch.Tensor


#: PyTorch's convention: a code equal to it is left out of the cross-entropy and of its mean
IGNORE_INDEX = -100


def token_scale(num_tokens: int, token_weight: torch.Tensor | None, counted: torch.Tensor | None = None,
                device=None) -> torch.Tensor:
    """(M,) fp32 d(mean)/d(per-token loss) of ``weighted_mean``: w_i [counted_i] / sum of those, 0 for every token
    when they sum to 0 (the fused kernels take it per row)."""
    w = torch.ones(num_tokens, device=device) if token_weight is None else token_weight.reshape(-1).float()
    if counted is not None:
        w = w * counted
    total = w.sum()
    return w / torch.where(total == 0, torch.ones_like(total), total)


def weighted_mean(per_token: torch.Tensor, token_weight: torch.Tensor | None = None,
                  counted: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i l_i / sum_i w_i over the tokens ``counted`` ((M,) bool, e.g. codes != ignore_index; their
    ``per_token`` must be 0 otherwise, as ``F.cross_entropy`` gives), w = 1 without ``token_weight``.

    A mean over nothing (no tokens, all weights 0, no token counted) is defined as 0 with zero gradients, on
    every backend (PyTorch's mean would give NaN)."""
    if token_weight is None:
        if counted is None:
            return per_token.sum() / max(1, per_token.numel())
        return per_token.sum() / counted.sum().clamp_min(1).to(torch.float32)
    w = token_weight.reshape(-1).to(torch.float32)
    if counted is not None:
        w = w * counted
    total = w.sum()
    return (per_token * w).sum() / torch.where(total == 0, torch.ones_like(total), total)


def motion_term(motion_pred, motion_target, num_tokens: int, token_weight, like: torch.Tensor) -> torch.Tensor:
    """Weighted mean over tokens of the per-token MSE (fp32); a zero scalar like ``like`` without motion."""
    if motion_pred is None:
        return like.new_zeros(())
    values = motion_pred.numel() // max(1, num_tokens)  # per token; the shapes are checked equal
    diff = motion_pred.reshape(num_tokens, values).to(torch.float32) - motion_target.reshape(num_tokens, values).float()
    return weighted_mean(diff.square().mean(dim=-1), token_weight)


def dual_decoder_loss_reference(
    appearance_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    appearance_target: torch.Tensor,
    motion_pred: torch.Tensor | None = None,
    motion_target: torch.Tensor | None = None,
    appearance_weight: float = 1.0,
    motion_weight: float = 1.0,
    token_weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> LossOutput:
    """The specification; logits and squared errors in fp32 whatever the input dtype, also under autocast."""
    _check_loss_inputs(appearance_hidden, head_weight, head_bias, appearance_target, motion_pred, motion_target,
                       token_weight, ignore_index)
    return _dual_decoder_loss_reference(appearance_hidden, head_weight, head_bias, appearance_target, motion_pred,
                                        motion_target, appearance_weight, motion_weight, token_weight, ignore_index)


def _dual_decoder_loss_reference(appearance_hidden, head_weight, head_bias, appearance_target, motion_pred,
                                 motion_target, appearance_weight, motion_weight, token_weight, ignore_index):
    # autocast would run the head's matmul in bf16/fp16: the logits of a large codebook need fp32
    with torch.autocast(appearance_hidden.device.type, enabled=False):
        h = appearance_hidden.reshape(-1, appearance_hidden.shape[-1]).to(torch.float32)
        m = h.shape[0]
        pred = h @ head_weight.to(torch.float32).t()
        if head_bias is not None:
            pred = pred + head_bias.to(torch.float32)
        if appearance_target.is_floating_point():
            per_token = (pred - appearance_target.reshape(pred.shape).to(torch.float32)).square().mean(dim=-1)
            counted = None
        else:
            codes = appearance_target.reshape(-1).long()
            per_token = F.cross_entropy(pred, codes, reduction="none", ignore_index=ignore_index)
            counted = codes != ignore_index
        appearance = weighted_mean(per_token, token_weight, counted)
        motion = motion_term(motion_pred, motion_target, m, token_weight, appearance)
    return LossOutput(appearance_weight * appearance + motion_weight * motion, appearance, motion)


_backend.register("dual_decoder_loss", "reference", _dual_decoder_loss_reference)


def _check_loss_inputs(h, w, b, target, motion_pred, motion_target, token_weight, ignore_index) -> None:
    if h.dim() < 2:
        raise ValueError(f"appearance_hidden must be (..., Da), got shape {tuple(h.shape)}")
    m, da = h.numel() // h.shape[-1], h.shape[-1]
    if w.dim() != 2 or w.shape[1] != da:
        raise ValueError(f"head_weight must be (K, Da={da}), got {tuple(w.shape)}")
    k = w.shape[0]
    if b is not None and tuple(b.shape) != (k,):
        raise ValueError(f"head_bias must be (K={k},), got {tuple(b.shape)}")
    if target.is_floating_point():
        if target.numel() != m * k:
            raise ValueError(
                f"a pixel appearance_target must hold M*K = {m}*{k} values, got shape {tuple(target.shape)}"
            )
    elif target.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if target.numel() != m:
            raise ValueError(f"appearance_target codes must hold one index per token ({m}), got {tuple(target.shape)}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if m:
            check_in_range(target, k, "appearance_target", "codes", ignore_index)
    else:
        raise TypeError(f"appearance_target must be integer codes or float pixels, got {target.dtype}")
    if (motion_pred is None) != (motion_target is None):
        raise ValueError("give both motion_pred and motion_target, or neither")
    if motion_pred is not None and (motion_pred.shape != motion_target.shape or (m and motion_pred.numel() % m)
                                    or (not m and motion_pred.numel())):
        raise ValueError(
            f"motion_pred {tuple(motion_pred.shape)} and motion_target {tuple(motion_target.shape)} must have "
            f"the same shape, a whole number of values per token (M={m})"
        )
    if token_weight is not None and token_weight.numel() != m:
        raise ValueError(f"token_weight must hold one weight per token ({m}), got {tuple(token_weight.shape)}")
    check_same_device(appearance_hidden=h, head_weight=w, head_bias=b, appearance_target=target,
                      motion_pred=motion_pred, motion_target=motion_target, token_weight=token_weight)


def dual_decoder_loss(
    appearance_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    appearance_target: torch.Tensor,
    motion_pred: torch.Tensor | None = None,
    motion_target: torch.Tensor | None = None,
    appearance_weight: float = 1.0,
    motion_weight: float = 1.0,
    token_weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    *,
    backend: str | None = None,
) -> LossOutput:
    """MAM2's dual-decoder loss over M masked tokens.

    appearance_hidden: (..., Da) decoder output (M tokens in all); head_weight: (K, Da);
    head_bias: (K,) or None. appearance_target: (...,) integer codes in [0, K) -> cross-entropy
    of ``h @ W.T + b``; or float (..., K) pixels -> MSE of ``h @ W.T + b``.
    motion_pred, motion_target: (..., Dm) float of one shape, or both None. token_weight: (...,) or None.
    ignore_index: codes equal to it count in neither the cross-entropy nor its mean, as in
    ``F.cross_entropy``. A term with nothing to average (no tokens, weights all 0, every code ignored) is 0.
    Everything is computed in fp32, also under ``torch.autocast``.
    Returns ``LossOutput(total, appearance, motion)``, fp32 scalars; gradients flow to
    appearance_hidden, head_weight, head_bias and motion_pred.
    """
    _check_loss_inputs(appearance_hidden, head_weight, head_bias, appearance_target, motion_pred, motion_target,
                       token_weight, ignore_index)
    _, impl = _backend.resolve("dual_decoder_loss", backend, appearance_hidden.device)
    return impl(appearance_hidden, head_weight, head_bias, appearance_target, motion_pred, motion_target,
                appearance_weight, motion_weight, token_weight, ignore_index)
