"""The Triton backend of the ops: input checks and masking as in the references, then the kernels of
``fastmam.kernels.patches`` for the memory-bound part (one read of each selected token's pixels).

Registered only when triton is importable; the kernels module is imported on first use, so
``TRITON_INTERPRET=1`` (CPU tests) only needs to be set before that first call.
"""

from __future__ import annotations

import importlib.util

import torch

from fastmam.kernels.launch import CE_BLOCK_K

from . import _backend
from ._checks import clip_geometry, stat_list
from .gather import GatherInputs, MaskedPatches, mask_clip
from .loss import LossOutput, _dual_decoder_loss_reference, motion_term, token_scale
from .motion_targets import TRAJECTORY_GRID, HogInputs, TrajectoryInputs, hog_values, trajectory_values
from .targets import Diff, TargetInputs, target_rows


def _kernels():
    from fastmam.kernels import patches

    return patches


#: tokens per chunk of the fused cross-entropy: 4096 x 8192 fp32 logits = 128 MiB at a time
CE_CHUNK_ROWS = 4096
# CE_BLOCK_K (codebook entries per step of the kernel's loop over K) is one of the kernels' launch parameters
# (fastmam.kernels.launch); read here at each call, so that tests can change it


# --------------------------------------------------------------------------- torch.library ops
# Each kernel launcher is a custom op with a fake (meta) implementation, so torch.compile(fullgraph=True)
# traces through it as one node instead of breaking the graph at the Triton launch.


@torch.library.custom_op("fastmam::gather_normalize", mutates_args=())
def _gather_normalize_op(clip: torch.Tensor, ids: torch.Tensor, tubelet: int, patch: int, mean: list[float],
                         std: list[float], out_dtype: torch.dtype, layout: str) -> torch.Tensor:
    geometry = clip_geometry(clip, layout, tubelet, patch)
    return _kernels().gather_normalize(clip, ids, tubelet, patch, mean, std, out_dtype, layout, geometry)


@_gather_normalize_op.register_fake
def _(clip, ids, tubelet, patch, mean, std, out_dtype, layout):
    c = clip.shape[-1] if layout == "BTHWC" else clip.shape[1]
    return clip.new_empty((ids.shape[0], ids.shape[1], tubelet * patch * patch * c), dtype=out_dtype)


@torch.library.custom_op("fastmam::masked_target", mutates_args=())
def _masked_target_op(clip: torch.Tensor, next_clip: torch.Tensor | None, ids: torch.Tensor, tubelet: int, patch: int,
                      normalize: bool, mean: list[float] | None, std: list[float] | None, layout: str,
                      diff: int) -> torch.Tensor:
    geometry = clip_geometry(clip, layout, tubelet, patch)
    return _kernels().masked_target(clip, next_clip, ids, tubelet, patch, normalize, mean, std, layout, geometry,
                                    diff, target_rows(tubelet, patch, Diff(diff)))


@_masked_target_op.register_fake
def _(clip, next_clip, ids, tubelet, patch, normalize, mean, std, layout, diff):
    c = clip.shape[-1] if layout == "BTHWC" else clip.shape[1]
    rows = target_rows(tubelet, patch, Diff(diff))
    return clip.new_empty((ids.shape[0], ids.shape[1], rows * c), dtype=torch.float32)


@torch.library.custom_op("fastmam::fused_linear_ce", mutates_args=())
def _fused_linear_ce_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, codes: torch.Tensor,
                        scale: torch.Tensor, chunk_rows: int, block_k: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_i scale_i * CE(h_i @ W.T + b, codes_i) over (M, Da) ``h`` and its fp32 gradients (dh, dW, db).

    Chunks of ``chunk_rows`` tokens: a matmul gives the chunk's fp32 logits, the kernel turns them into row
    losses and overwrites them with d(loss)/d(logits), two matmuls accumulate the gradients. The (M x K)
    logits never exist whole, and the gradients come out of the same sweep. Rows whose code is outside [0, K)
    (``ignore_index``) have loss 0 and gradient 0; give them scale 0 so that they leave the mean too."""
    from fastmam.kernels.cross_entropy import ce_fwd_grad_

    with torch.autocast(h.device.type, enabled=False):  # fp32 logits and gradients, also under autocast
        return _fused_linear_ce(h, weight, bias, codes, scale, chunk_rows, block_k, ce_fwd_grad_)


def _fused_linear_ce(h, weight, bias, codes, scale, chunk_rows, block_k, ce_fwd_grad_):
    h32, w32 = h.float(), weight.float()
    b32 = bias.float() if bias is not None else None
    # contiguous, as the fake implementation declares (empty_like would keep a transposed h's or weight's strides)
    grad_h = torch.empty(h32.shape, dtype=torch.float32, device=h.device)
    grad_w = torch.zeros(w32.shape, dtype=torch.float32, device=h.device)
    grad_b = torch.zeros_like(b32) if b32 is not None else h32.new_empty(0)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    for r0 in range(0, h.shape[0], chunk_rows):
        r1 = min(h.shape[0], r0 + chunk_rows)
        hc = h32[r0:r1]
        logits = hc @ w32.t()
        if b32 is not None:
            logits += b32
        rows = ce_fwd_grad_(logits, codes[r0:r1], scale[r0:r1], block_k)  # logits -> d(loss)/d(logits)
        loss += (rows * scale[r0:r1]).sum()
        grad_h[r0:r1] = logits @ w32
        grad_w.addmm_(logits.t(), hc)
        if b32 is not None:
            grad_b += logits.sum(0)
    return loss, grad_h, grad_w, grad_b


@_fused_linear_ce_op.register_fake
def _(h, weight, bias, codes, scale, chunk_rows, block_k):
    f32 = torch.float32
    grad_b = bias.new_empty(bias.shape, dtype=f32) if bias is not None else h.new_empty(0, dtype=f32)
    grad_w = weight.new_empty(weight.shape, dtype=f32)
    return h.new_empty((), dtype=f32), h.new_empty(h.shape, dtype=f32), grad_w, grad_b


def _ce_setup_context(ctx, inputs, output):
    h, weight, bias = inputs[:3]
    ctx.save_for_backward(*output[1:])
    ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)


def _ce_backward(ctx, grad_loss, *_unused_grads_of_grads):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    dh, dw, db = ctx.dtypes
    return ((grad_h * grad_loss).to(dh), (grad_w * grad_loss).to(dw),
            (grad_b * grad_loss).to(db) if db is not None else None, None, None, None, None)


_fused_linear_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


@torch.library.custom_op("fastmam::copy_rows", mutates_args=())
def _copy_rows_op(x: torch.Tensor, ids: torch.Tensor, num_out: int, scatter: bool) -> torch.Tensor:
    from fastmam.kernels.tokens import copy_rows

    return copy_rows(x, ids, num_out, scatter)


@_copy_rows_op.register_fake
def _(x, ids, num_out, scatter):
    return x.new_empty((x.shape[0], num_out, x.shape[-1]))


def _copy_rows_setup_context(ctx, inputs, output):
    x, ids, _, scatter = inputs
    ctx.save_for_backward(ids)
    ctx.num_in, ctx.scatter = x.shape[1], scatter


def _copy_rows_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    # gather's backward scatters the gradient rows back; scatter's backward gathers them
    return _copy_rows_op(grad, ids, ctx.num_in, not ctx.scatter), None, None, None


_copy_rows_op.register_autograd(_copy_rows_backward, setup_context=_copy_rows_setup_context)


def gather_tokens_triton(x, ids):
    return _copy_rows_op(x, ids, ids.shape[1], False)


def scatter_tokens_triton(x, ids, num_tokens):
    return _copy_rows_op(x, ids, num_tokens, True)


def fused_linear_cross_entropy(h, weight, bias, codes, token_weight=None, ignore_index=-100):
    """Token-weighted mean CE of ``h @ weight.T + bias`` against ``codes``: h (M, Da), weight (K, Da),
    bias (K,) or None, codes (M,) int in [0, K) or ``ignore_index``, token_weight (M,) or None -> fp32 scalar,
    differentiable in h, weight and bias; 0 when no token counts (the reference's ``weighted_mean``)."""
    codes = codes.reshape(-1).long()
    scale = token_scale(h.shape[0], token_weight, codes != ignore_index, h.device)
    return _fused_linear_ce_op(h, weight, bias, codes.contiguous(), scale, CE_CHUNK_ROWS, CE_BLOCK_K)[0]


def dual_decoder_loss_triton(appearance_hidden, head_weight, head_bias, appearance_target, motion_pred,
                             motion_target, appearance_weight, motion_weight, token_weight, ignore_index):
    """Codes: fused chunked cross-entropy (Triton); pixels: the reference's MSE. Motion: the reference's MSE."""
    if appearance_target.is_floating_point():
        return _dual_decoder_loss_reference(appearance_hidden, head_weight, head_bias, appearance_target, motion_pred,
                                            motion_target, appearance_weight, motion_weight, token_weight,
                                            ignore_index)
    h = appearance_hidden.reshape(-1, appearance_hidden.shape[-1])
    appearance = fused_linear_cross_entropy(h, head_weight, head_bias, appearance_target, token_weight, ignore_index)
    motion = motion_term(motion_pred, motion_target, h.shape[0], token_weight, appearance)
    return LossOutput(appearance_weight * appearance + motion_weight * motion, appearance, motion)


def tube_mask_gather_triton(clip, noise, tubelet, patch, out_dtype, layout, masking,
                            args: GatherInputs) -> MaskedPatches:
    m = mask_clip(noise, args, tubelet, masking)
    c = args.geometry[-1]
    # a BCTHW clip is only cast: its statistics are not used, the schema still takes a list
    mean, std = args.mean or (0.0,) * c, args.std or (1.0,) * c
    patches = _gather_normalize_op(clip, m.ids_keep, tubelet, patch, list(mean), list(std), out_dtype, layout)
    return MaskedPatches(patches, *m)


def target_triton(clip, next_clip, tubelet, patch, normalize, layout, diff: Diff, args: TargetInputs):
    """Both target ops (``diff`` as in ``targets.Diff``) on validated inputs."""
    return _masked_target_op(clip, next_clip, args.ids, tubelet, patch, normalize, stat_list(args.mean),
                             stat_list(args.std), layout, int(diff))


if importlib.util.find_spec("triton") is not None:
    _backend.register("tube_mask_gather", "triton", tube_mask_gather_triton)
    _backend.register("pixel_target", "triton", target_triton)
    _backend.register("rgb_diff_target", "triton", target_triton)
    _backend.register("dual_decoder_loss", "triton", dual_decoder_loss_triton)
    _backend.register("gather_tokens", "triton", gather_tokens_triton)
    _backend.register("scatter_tokens", "triton", scatter_tokens_triton)


# --------------------------------------------------------------------------- MME's motion targets (kernels/motion.py)


@torch.library.custom_op("fastmam::hog_target", mutates_args=())
def _hog_target_op(clip: torch.Tensor, ids: torch.Tensor, tubelet: int, patch: int, offset: int, cell: int,
                   bins: int, sobel: bool, normalize: bool, eps: float) -> torch.Tensor:
    from fastmam.kernels import motion

    geometry = clip_geometry(clip, "BTHWC", tubelet, patch)
    return motion.hog_target(clip, ids, tubelet, patch, offset, cell, bins, sobel, normalize, eps, geometry)


@_hog_target_op.register_fake
def _(clip, ids, tubelet, patch, offset, cell, bins, sobel, normalize, eps):
    return clip.new_empty((ids.shape[0], ids.shape[1], hog_values(patch, cell, bins, clip.shape[-1])),
                          dtype=torch.float32)


@torch.library.custom_op("fastmam::trajectory_target", mutates_args=())
def _trajectory_target_op(disp: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor, side: int, patch_std: bool,
                          bound: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from fastmam.kernels import motion

    return motion.trajectory_target(disp, valid, ids, side, patch_std, bound, eps)


@_trajectory_target_op.register_fake
def _(disp, valid, ids, side, patch_std, bound, eps):
    shape = (ids.shape[0], ids.shape[1], trajectory_values(side * TRAJECTORY_GRID, disp.shape[-2]))
    return disp.new_empty(shape, dtype=torch.float32), disp.new_empty(shape, dtype=torch.float32)


def hog_target_triton(clip, tubelet, patch, args: HogInputs):
    return _hog_target_op(clip, args.ids, tubelet, patch, args.offset, args.cell, args.bins, args.sobel,
                          args.normalize, args.eps)


def trajectory_target_triton(disp, valid, args: TrajectoryInputs):
    return _trajectory_target_op(disp, valid, args.ids, args.side, args.patch_std, args.bound, args.eps)


if importlib.util.find_spec("triton") is not None:
    _backend.register("hog_target", "triton", hog_target_triton)
    _backend.register("trajectory_target", "triton", trajectory_target_triton)
