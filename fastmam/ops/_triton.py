"""The Triton backend of the ops: input checks and masking as in the references, then the kernels of
``fastmam.kernels.patches`` for the memory-bound part (one read of each selected token's pixels).

Registered only when triton is importable; the kernels module is imported on first use, so
``TRITON_INTERPRET=1`` (CPU tests) only needs to be set before that first call.
"""

from __future__ import annotations

import importlib.util

import torch

from . import _backend
from ._checks import check_same_device
from .gather import MaskedPatches, mask_clip
from .loss import LossOutput, dual_decoder_loss_reference, motion_term
from .targets import check_normalizable, check_rgb_diff_inputs, check_target_inputs


def _kernels():
    from fastmam.kernels import patches

    return patches


#: tokens per chunk of the fused cross-entropy: 4096 x 8192 fp32 logits = 128 MiB at a time
CE_CHUNK_ROWS = 4096
#: codebook entries per step of the kernel's loop over K
CE_BLOCK_K = 1024


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """mean_w CE(h @ W.T + b, codes) with the (M x K) logits computed and consumed chunk by chunk.

    Gradients are computed in the forward pass (one sweep over the logits instead of two) and
    scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, codes, token_weight, chunk_rows):
        from fastmam.kernels.cross_entropy import ce_fwd_grad_

        m = h.shape[0]
        h32, w32 = h.float(), weight.float()
        b32 = bias.float() if bias is not None else None
        if token_weight is None:
            scale = torch.full((m,), 1.0 / m, dtype=torch.float32, device=h.device)
        else:
            w = token_weight.reshape(-1).float()
            scale = w / w.sum()
        codes = codes.reshape(-1).long().contiguous()
        grad_h = torch.empty_like(h32)
        grad_w = torch.zeros_like(w32)
        grad_b = torch.zeros_like(b32) if b32 is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for r0 in range(0, m, chunk_rows):
            r1 = min(m, r0 + chunk_rows)
            hc = h32[r0:r1]
            logits = hc @ w32.t()
            if b32 is not None:
                logits += b32
            rows = ce_fwd_grad_(logits, codes[r0:r1], scale[r0:r1], CE_BLOCK_K)  # logits -> d(loss)/d(logits)
            loss += (rows * scale[r0:r1]).sum()
            grad_h[r0:r1] = logits @ w32
            grad_w.addmm_(logits.t(), hc)
            if grad_b is not None:
                grad_b += logits.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else grad_w.new_empty(0))
        ctx.has_bias = grad_b is not None
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh, dw, db = ctx.dtypes
        return ((grad_h * grad_out).to(dh), (grad_w * grad_out).to(dw),
                (grad_b * grad_out).to(db) if ctx.has_bias else None, None, None, None)


def dual_decoder_loss_triton(appearance_hidden, head_weight, head_bias, appearance_target, motion_pred=None,
                             motion_target=None, appearance_weight=1.0, motion_weight=1.0, token_weight=None,
                             chunk_rows=None):
    """Codes: fused chunked cross-entropy (Triton); pixels: the reference's MSE. Motion: the reference's MSE."""
    if appearance_target.is_floating_point():
        return dual_decoder_loss_reference(appearance_hidden, head_weight, head_bias, appearance_target, motion_pred,
                                           motion_target, appearance_weight, motion_weight, token_weight)
    h = appearance_hidden.reshape(-1, appearance_hidden.shape[-1])
    appearance = _FusedLinearCrossEntropy.apply(h, head_weight, head_bias, appearance_target, token_weight,
                                                chunk_rows or CE_CHUNK_ROWS)
    motion = motion_term(motion_pred, motion_target, h.shape[0], token_weight, appearance)
    return LossOutput(appearance_weight * appearance + motion_weight * motion, appearance, motion)


def tube_mask_gather_triton(clip, noise, ratio, tubelet, patch, mean, std, out_dtype=torch.float32,
                            layout="BTHWC", masking="tube") -> MaskedPatches:
    geometry, m = mask_clip(clip, noise, ratio, tubelet, patch, layout, masking)
    c = geometry[-1]
    if layout == "BTHWC":
        for name, values in (("mean", mean), ("std", std)):
            if torch.as_tensor(values).numel() != c:
                raise ValueError(f"{name} must have one value per channel ({c}), got {torch.as_tensor(values).numel()}")
    patches = _kernels().gather_normalize(clip, m.ids_keep, tubelet, patch, mean, std, out_dtype, layout, geometry)
    return MaskedPatches(patches, *m)


def pixel_target_triton(clip, ids_masked, tubelet, patch, normalize=True, mean=None, std=None, layout="BTHWC"):
    geometry = check_target_inputs(clip, ids_masked, tubelet, patch, layout, mean, std)
    check_normalizable(tubelet * patch * patch, normalize)
    return _kernels().masked_target(clip, None, ids_masked.long(), tubelet, patch, normalize, mean, std, layout,
                                    geometry, diff=0)


def rgb_diff_target_triton(clip, ids_masked, tubelet, patch, normalize=False, next_clip=None, mean=None, std=None,
                           layout="BTHWC"):
    check_rgb_diff_inputs(clip, tubelet, next_clip)
    geometry = check_target_inputs(clip, ids_masked, tubelet, patch, layout, mean, std)
    dense = next_clip is not None
    if dense:
        check_same_device(clip=clip, next_clip=next_clip)
    check_normalizable((tubelet - (0 if dense else 1)) * patch * patch, normalize)
    return _kernels().masked_target(clip, next_clip, ids_masked.long(), tubelet, patch, normalize, mean, std, layout,
                                    geometry, diff=2 if dense else 1)


if importlib.util.find_spec("triton") is not None:
    _backend.register("tube_mask_gather", "triton", tube_mask_gather_triton)
    _backend.register("pixel_target", "triton", pixel_target_triton)
    _backend.register("rgb_diff_target", "triton", rgb_diff_target_triton)
    _backend.register("dual_decoder_loss", "triton", dual_decoder_loss_triton)
