"""Model FLOPs of one training step, by formula, for MFU (``bench/throughput.py``).

Convention: a matmul of (m x k) by (k x n) is ``2mkn`` FLOPs; only matmuls count (linears, the patch
embedding, attention scores and their weighted sum); norms, activations, softmax, the loss and the
optimizer are left out. The backward pass of a matmul is two matmuls of the same size (gradients of
its input and of its weight), so training costs 3x the forward, except for the patch embedding, whose
input (pixels) needs no gradient: 2x. These are *model* FLOPs: what activation checkpointing
recomputes, and the score recomputation of flash-attention backward kernels, are not useful work and
are not counted. The frozen tokenizer that makes code targets is not the model and is not counted.

``tests/test_flops.py`` checks both formulas against ``torch.utils.flop_counter.FlopCounterMode`` on
tiny models (SDPA's math path, so that attention is counted as the matmuls it is).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config
from .models.mam import appearance_values, motion_values
from .models.tokenizer import codes_per_token
from .ops.masking import num_decoded


@dataclass
class StepFlops:
    """Forward matmul FLOPs per part for a whole batch; ``no_input_grad``: parts whose input needs no gradient."""

    forward_parts: dict[str, int] = field(default_factory=dict)
    no_input_grad: tuple[str, ...] = ("patch_embed",)

    def add(self, part: str, flops: int) -> None:
        self.forward_parts[part] = self.forward_parts.get(part, 0) + flops

    @property
    def forward(self) -> int:
        return sum(self.forward_parts.values())

    @property
    def backward(self) -> int:
        """Input and weight gradients of every matmul; weight gradients only where the input needs none."""
        return sum(f if part in self.no_input_grad else 2 * f for part, f in self.forward_parts.items())

    @property
    def train(self) -> int:
        """Forward + backward: the FLOPs of one optimizer step's worth of model compute."""
        return self.forward + self.backward


def linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def attention_core(nq: int, nk: int, dim: int) -> int:
    """Scores q @ k.T and their weighted sum of v, over all heads (heads x head_dim = dim)."""
    return 2 * 2 * nq * nk * dim


def block(tokens: int, dim: int, hidden: int) -> int:
    """Pre-norm ViT block on ``tokens``: qkv, attention, output projection, MLP (dim -> hidden -> dim)."""
    return (linear(tokens, dim, 3 * dim) + attention_core(tokens, tokens, dim) + linear(tokens, dim, dim)
            + 2 * linear(tokens, dim, hidden))


def cross_block(nq: int, nk: int, dim: int, hidden: int) -> int:
    """Regressor block: queries (nq) attend to keys/values (nk), then the MLP on the queries."""
    return (linear(nq, dim, dim) + linear(nk, dim, 2 * dim) + attention_core(nq, nk, dim) + linear(nq, dim, dim)
            + 2 * linear(nq, dim, hidden))


def token_counts(cfg: Config) -> tuple[int, int, int]:
    """(N, Nv, Nm) per clip: all, visible and masked tokens under the config's masking."""
    m, d = cfg.model, cfg.data
    slices, spatial = d.num_frames // m.tubelet, (d.img_size // m.patch) ** 2
    per = spatial if cfg.masking.kind == "tube" else slices * spatial
    hidden = int(cfg.masking.ratio * per) * (slices if cfg.masking.kind == "tube" else 1)
    return slices * spatial, slices * spatial - hidden, hidden


def decoded_tokens(cfg: Config) -> int:
    """Nd per clip: the masked tokens the regressor, decoders, heads and loss cover; Nm without decoder masking,
    ``Nm - int(masking.decoder_ratio * Nm)`` with it (VideoMAE V2's decoder masking, ``ops.decoder_masking``)."""
    nm = token_counts(cfg)[2]
    return nm if cfg.masking.decoder == "none" else num_decoded(nm, cfg.masking.decoder_ratio)


def model_flops(cfg: Config, batch: int, in_chans: int = 3) -> StepFlops:
    """FLOPs of fastmam's model (``fastmam.models.Pretrainer``) for ``batch`` clips of the config's shape.

    The regressor's queries, the decoders and the heads run on the Nd decoded tokens (``decoded_tokens``: every
    masked token, or the subset decoder masking keeps). ``model.shared_decoder`` (MME): one ``decoder`` and a
    Linear-GELU-Linear head per target (their first Linear: ``appearance_hidden`` and part of ``motion_head``)."""
    m, tg = cfg.model, cfg.targets
    _, nv, _ = token_counts(cfg)
    nm = decoded_tokens(cfg)  # the masked tokens the model predicts
    d, hid = m.embed_dim, int(m.embed_dim * m.mlp_ratio)
    dd, dhid = m.decoder_dim, int(m.decoder_dim * m.mlp_ratio)
    pixels = m.tubelet * m.patch * m.patch * in_chans
    f = StepFlops()
    f.add("patch_embed", linear(nv, pixels, d))
    f.add("encoder", m.depth * block(nv, d, hid))
    if m.regressor_depth:
        f.add("regressor", m.regressor_depth * cross_block(nm, nv + nm, d, hid))
        decoder = linear(nm, d, dd) + m.decoder_depth * block(nm, dd, dhid)  # one latent per masked token
    else:
        decoder = linear(nv, d, dd) + m.decoder_depth * block(nv + nm, dd, dhid)  # VideoMAE: visible + mask tokens
    shared = m.shared_decoder
    f.add("decoder" if shared else "appearance_decoder", decoder)
    if shared:  # MME's heads: Linear(dd, dd)-GELU-Linear; the first Linear of each target's head
        f.add("appearance_hidden", linear(nm, dd, dd))
    if tg.uses_codes:
        rows = codes_per_token(m.tubelet, tg.code_frame)
        if rows > 1:  # code_frame 'all': a projection gives each masked token one row per frame of its tubelet
            f.add("appearance_frames", linear(nm, dd, rows * dd))
        f.add("appearance_head", linear(nm * rows, dd, tg.num_codes))
    else:  # pixels or HOG: one row per token
        f.add("appearance_head", linear(nm, dd, appearance_values(cfg, in_chans)))
    motion = motion_values(cfg, in_chans)
    if motion:
        if shared:
            f.add("motion_head", linear(nm, dd, dd))
        else:
            f.add("motion_decoder", decoder)
        f.add("motion_head", linear(nm, dd, motion))
    f.forward_parts = {k: batch * v for k, v in f.forward_parts.items()}
    return f


def hf_videomae_flops(config, batch: int, num_masked: int) -> StepFlops:
    """FLOPs of Hugging Face ``VideoMAEForPreTraining`` (its ``VideoMAEConfig`` as ``config``) for ``batch``
    clips with ``num_masked`` hidden tokens each.

    Its Conv3d patch embedding runs on every token before the visible ones are kept; the encoder sees the
    visible tokens; ``encoder_to_decoder`` maps them to the decoder width; the decoder runs on all tokens
    and its head on the masked ones.
    """
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    n = (config.num_frames // config.tubelet_size) * (size // config.patch_size) ** 2
    nv = n - num_masked
    d, dd = config.hidden_size, config.decoder_hidden_size
    pixels = config.tubelet_size * config.patch_size**2 * config.num_channels
    f = StepFlops()
    f.add("patch_embed", linear(n, pixels, d))
    f.add("encoder", config.num_hidden_layers * block(nv, d, config.intermediate_size))
    f.add("appearance_decoder", linear(nv, d, dd)
          + config.decoder_num_hidden_layers * block(n, dd, config.decoder_intermediate_size))
    f.add("appearance_head", linear(num_masked, dd, pixels))
    f.forward_parts = {k: batch * v for k, v in f.forward_parts.items()}
    return f
