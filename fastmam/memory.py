"""Parameter counts and an estimate of memory per GPU, printed when a run starts.

Model states follow the accounting of the ZeRO paper (Rajbhandari et al., 2020) for Adam: with bf16
mixed precision each parameter costs 2 bytes of bf16 weight, 2 of bf16 gradient and 12 of optimizer state
(fp32 master weight, first and second moment); in fp32, 4 + 4 + 8 (no master copy), plus a 4-byte fp32 copy
of the partition once ZeRO partitions the optimizer. ZeRO-1 divides the optimizer state by the number of
ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights (and gathers one block's full weights at a time).
Offloading moves the optimizer state and the gradient partition (``offload_optimizer``) or the weight
partition (``offload_params``) to CPU memory.

Activations are what autograd saves for backward, counted per layer in elements (``block_elements``,
``cross_block_elements``: tests/test_memory.py checks them against the bytes a CPU forward really saves):
a pre-norm self-attention block over n tokens of width d saves (8 + 2 r) n d values (its input, the two norm
outputs, q, k, v, the attention output, the second residual input, and the MLP's two hidden activations of
width r d) plus per-row statistics; with activation checkpointing only each block's input stays, and one block
at a time is recomputed. Attention is counted as a fused kernel (flash / memory-efficient SDPA, as on GPUs and
in PyTorch's CPU kernel): no (n x n) score matrix is kept. Allocator fragmentation, workspaces and the CUDA
context (about 0.5 GiB) come on top: read the estimate as a floor.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import Config, resolve_precision
from .flops import decoded_tokens, token_counts
from .models.mam import appearance_values, motion_values
from .models.tokenizer import codes_per_token

GiB = 2**30


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per part of a ``MaskedVideoModel``: encoder, regressor, decoder (shared), appearance,
    motion, other (any module not named here), total."""
    parts = {"encoder": ("patch_embed", "blocks", "norm"), "regressor": ("mask_token", "regressor", "regressor_norm"),
             "decoder": ("decoder",),  # model.shared_decoder: the one decoder of every target
             "appearance": ("appearance_decoder", "appearance_hidden", "appearance_frames", "appearance_head"),
             "motion": ("motion_decoder", "motion_head")}
    counts = dict.fromkeys((*parts, "other"), 0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            top = name.split(".")[0]
            counts[next((part for part, names in parts.items() if top in names), "other")] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def block_elements(tokens: int, dim: int, heads: int, mlp_ratio: float) -> float:
    """Values a self-attention ``Block`` saves for backward, per sample: (8 + 2 r) n d, plus two LayerNorms'
    mean and rstd per row and the attention's logsumexp per head and row."""
    return (8 + 2 * int(dim * mlp_ratio) / dim) * tokens * dim + 4 * tokens + heads * tokens


def cross_block_elements(queries: int, context: int, dim: int, heads: int, mlp_ratio: float) -> float:
    """Values a regressor ``CrossBlock`` saves, per sample: the concatenated context and its norm, keys and values
    (4 c d), and for the queries their norm, q, the attention output, the residual and the MLP ((6 + 2 r) m d)."""
    hidden = int(dim * mlp_ratio)
    return (4 * context * dim + (6 + 2 * hidden / dim) * queries * dim
            + 2 * context + 4 * queries + heads * queries)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (``*_bytes``) and in host memory (``cpu_bytes``); see the module docstring for what is counted."""

    params: int
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    cpu_bytes: float

    @property
    def gpu_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def summary(self, cfg: Config, world_size: int, precision: str, device_type: str = "cuda") -> str:
        ds, m = cfg.deepspeed, cfg.model
        offload = [k for k, on in (("optimizer", ds.offload_optimizer), ("weights", ds.offload_params)) if on]
        where = f"ZeRO-{ds.zero_stage} over {world_size} rank(s), {precision}"
        where += f", {' and '.join(offload)} offloaded" if offload else ""
        per = "GPU" if device_type == "cuda" else "rank"
        parts = " + ".join(f"{name} {value / GiB:.2f}" for name, value in (
            ("weights", self.weights_bytes), ("gradients", self.grads_bytes), ("optimizer", self.optimizer_bytes),
            ("activations", self.activations_bytes)))
        line = (f"estimated memory per {per}: {self.gpu_bytes / GiB:.2f} GiB = {parts} at batch {cfg.data.batch_size} "
                f"({'with' if m.activation_checkpointing else 'no'} activation checkpointing) [{where}]")
        if self.cpu_bytes:
            line += f"; host memory for the offloaded state: {self.cpu_bytes / GiB:.2f} GiB"
        return line


def activation_elements(cfg: Config, batch: int, recompute_peak: bool = True) -> float:
    """Values the model's forward keeps for backward for ``batch`` clips (the objective's targets and loss
    excluded: ``loss_elements``). With activation checkpointing, ``recompute_peak`` adds the full set of the
    largest block being recomputed in backward (the forward alone does not hold it)."""
    m = cfg.model
    _, nv, _ = token_counts(cfg)
    nm = decoded_tokens(cfg)  # the masked tokens the regressor and decoders predict (all, or decoder masking's)
    ckpt = m.activation_checkpointing
    d, r = m.embed_dim, m.mlp_ratio
    pv = m.tubelet * m.patch * m.patch * 3

    peaks = []

    def stack(depth: int, full_block: float, block_input: float) -> float:
        # checkpointed: each block keeps its input; the block being recomputed holds its full set
        peaks.append(full_block)
        return block_input * depth if ckpt else full_block * depth

    total = nv * pv  # the patch embedding's input
    total += stack(m.depth, block_elements(nv, d, m.num_heads, r), nv * d) + 2 * nv  # + the final norm's statistics
    total += nv * d  # the final norm's input
    if m.regressor_depth:
        total += stack(m.regressor_depth, cross_block_elements(nm, nv + nm, d, m.num_heads, r), nm * d)
        total += nv * d if ckpt else 0  # checkpointed blocks also keep their context: the latents, shared
        total += nm * d + 2 * nm  # the regressor norm
        dec_in, seq = nm, nm
    else:  # VideoMAE: the decoder embeds the visible latents and runs over every token
        dec_in, seq = nv, nv + nm
    dd = m.decoder_dim
    has_motion = motion_values(cfg) > 0
    decoders = 1 if cfg.targets.motion == "none" or m.shared_decoder else 2
    total += dec_in * d  # the decoders' embedding input: one tensor, shared by both decoders
    one = stack(m.decoder_depth, block_elements(seq, dd, m.decoder_heads, r), seq * dd)
    one += seq * dd + 2 * nm  # the final norm's input (a slice keeps its whole sequence) and statistics
    one += nm * dd  # the head's input (the appearance head's, inside the loss)
    if m.shared_decoder:  # MME's Linear-GELU-Linear heads: each keeps the GELU's input and output
        one += (2 if has_motion else 1) * 2 * nm * dd
    rows = _appearance_rows(cfg)
    extra = rows * nm * dd if rows > 1 else 0  # code_frame 'all': the head's input is the per-frame projection's output
    peak = max(peaks) if ckpt and recompute_peak else 0
    return batch * (one * decoders + total + peak + extra)


def _appearance_rows(cfg: Config) -> int:
    """Rows of the appearance head per masked token: t codes with ``code_frame: all``, else one."""
    tg = cfg.targets
    return codes_per_token(cfg.model.tubelet, tg.code_frame) if tg.uses_codes else 1


def loss_elements(cfg: Config, batch: int, fused: bool) -> float:
    """Values the dual-decoder loss keeps for backward: the cross-entropy over codes keeps the (Nm x K) fp32
    log-softmax of the logits in the reference, and only its gradients (h and the head's weight) in the fused
    kernel; an MSE keeps one tensor (prediction minus target); the trajectory MSE also its (fp32) entry weights."""
    m, tg = cfg.model, cfg.targets
    rows = batch * decoded_tokens(cfg)
    if not tg.uses_codes:  # pixels or HOG: the MSE keeps prediction minus target
        total = rows * appearance_values(cfg)
    elif fused:
        total = rows * _appearance_rows(cfg) * m.decoder_dim + tg.num_codes * (m.decoder_dim + 1)
    else:
        total = rows * _appearance_rows(cfg) * tg.num_codes  # the log-softmax of the logits
    # the trajectory MSE keeps the masked difference and the entries' weights; the RGB-difference MSE the difference
    return total + rows * motion_values(cfg) * (2 if tg.motion == "trajectory" else 1)


def estimate_memory(cfg: Config, params: int, largest_block_params: int, world_size: int,
                    device_type: str) -> MemoryEstimate:
    """Memory per GPU of training ``cfg`` with ``params`` trainable parameters on ``world_size`` ranks."""
    precision = resolve_precision(cfg, device_type)
    ds = cfg.deepspeed
    stage, w = ds.zero_stage, world_size
    if precision == "bf16":
        weight_b, grad_b, optim_b = 2, 2, 12
    else:
        weight_b, grad_b, optim_b = 4, 4, (12 if stage >= 1 else 8)
    weights = weight_b * params / (w if stage >= 3 else 1)
    if stage >= 3:
        weights += weight_b * largest_block_params  # one block gathered whole at a time
    grads = grad_b * params / (w if stage >= 2 else 1)
    optimizer = optim_b * params / (w if stage >= 1 else 1)
    cpu = 0.0
    if ds.offload_optimizer:
        cpu += optimizer + 4 * params / w  # the fp32 gradient partition the CPU step reads
        optimizer = 0.0
    if ds.offload_params:
        cpu += weights - weight_b * largest_block_params
        weights = weight_b * largest_block_params
    act_bytes = 2 if precision == "bf16" else 4
    fused = device_type == "cuda"  # the fused kernels are the default on GPUs
    b = cfg.data.batch_size
    activations = act_bytes * activation_elements(cfg, b) + 4 * loss_elements(cfg, b, fused)
    return MemoryEstimate(params, weights, grads, optimizer, activations, cpu)


def largest_block_params(model: nn.Module) -> int:
    """Parameters of the largest transformer block (what ZeRO-3 gathers at once)."""
    sizes = [sum(p.numel() for p in block.parameters()) for name, block in model.named_modules()
             if type(block).__name__ in ("Block", "CrossBlock")]
    return max(sizes, default=0)
