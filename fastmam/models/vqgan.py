"""A taming-transformers VQGAN as the appearance tokenizer: frames -> codes aligned with 16x16 patches.

The encoder, ``quant_conv`` and quantizer of taming-transformers' ``VQModel`` (Esser et al., "Taming
Transformers for High-Resolution Image Synthesis", 2021), written here with the same module tree, so
that parameter names and shapes are that project's and its checkpoints load with strict key checks:

    encoder.conv_in                                   Conv2d(3, ch, 3)
    encoder.down.<l>.block.<b>.{norm1,conv1,norm2,conv2[,nin_shortcut]}   ResnetBlock, per level l
    encoder.down.<l>.attn.<b>.{norm,q,k,v,proj_out}  where the level's resolution is in attn_resolutions
    encoder.down.<l>.downsample.conv                  all levels but the last: stride-2 conv, f = 2**(levels-1)
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out (-> z_channels)
    quantize.embedding.weight                         (n_embed, embed_dim) codebook
    quant_conv                                        Conv2d(z_channels, embed_dim, 1)

Encoding follows taming: pixels to [-1, 1] (``x / 127.5 - 1``), ``z = quant_conv(encoder(x))``, and the
code of each cell is ``argmin_k ||z - e_k||^2`` written as taming writes it (``|z|^2 + |e|^2 - 2 z.e``).
The encoder runs without grad, under bf16 autocast on GPU (``targets.vqgan.precision``); the distances
are always computed in fp32 from an fp32 codebook, with TF32 matmuls off: the codeword distances of a
trained codebook differ by little relative to ``|z|^2``, and bf16 (8 mantissa bits) or TF32 (10) rounding
of those sums turns near-ties into different argmins, i.e. codes that differ from taming's.

Checkpoints: a taming ``last.ckpt`` (a Lightning checkpoint whose ``state_dict`` also holds the decoder,
``post_quant_conv`` and the loss's discriminator and LPIPS weights, which a tokenizer does not use and
which are dropped by name) or a bare state dict. Every key the tokenizer needs must be present with
its shape; any other key is an error that names it.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import AppearanceTokenizer

#: the published ImageNet f16 VQGANs (taming-transformers README, "Overview of pretrained models")
VQGAN_DOWNLOADS = {
    "vqgan_imagenet_f16_16384": "https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/",
    "vqgan_imagenet_f16_1024": "https://heibox.uni-heidelberg.de/d/8088892a516d4e3baf92/",
}
#: a tiny f8 architecture (targets.vqgan keys) for CPU smoke runs, tests and ``bench/throughput.py --quick``: four
#: levels (three halvings, f = 8, the tiny presets' patch), 32 channels (GroupNorm's minimum), attention only in the
#: middle block. No checkpoint of it is published: its weights are random.
TINY_F8 = {"n_embed": 32, "embed_dim": 8, "z_channels": 8, "ch": 32, "ch_mult": (1, 1, 1, 1), "num_res_blocks": 1,
           "attn_resolutions": (), "resolution": 64}
#: parts of a taming VQModel checkpoint that encoding does not use (dropped knowingly, by prefix)
UNUSED_PREFIXES = ("decoder.", "post_quant_conv.", "loss.")
#: rows of the (rows x n_embed) fp32 distance matrix per step: 4096 x 16384 x 4 B = 256 MiB at most
DISTANCE_ROWS = 4096


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # taming's dropout sits here; 0 and inactive without grad
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w cells (1x1 conv projections), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def heads(t):  # (B, C, H, W) -> (B, 1, H*W, C)
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        # softmax(q k^T / sqrt(C)) v, as taming's bmm formulation
        out = F.scaled_dot_product_attention(heads(self.q(y)), heads(self.k(y)), heads(self.v(y)))
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv: H x W -> H/2 x W/2 for even sides."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    """taming's ``Encoder`` as ``VQModel`` builds it (``double_z: false``): (N, 3, H, W) -> (N, z_channels, H/f, W/f).
    """

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, z_channels: int, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        res, width = resolution, ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(width, ch * mult))
                width = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(width))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(width)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(width, width)
        self.mid.attn_1 = AttnBlock(width)
        self.mid.block_2 = ResnetBlock(width, width)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Codebook(nn.Module):
    """taming's ``VectorQuantizer`` at inference: the nearest codeword of each latent."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: (M, embed_dim) -> (M,) int64 indices of ``argmin_k |z|^2 + |e_k|^2 - 2 z.e_k``, in fp32."""
        e = self.embedding.weight.float()
        e_sq = e.square().sum(dim=1)
        out = []
        with _ieee_fp32_matmul():
            for rows in z.float().split(DISTANCE_ROWS):
                d = rows.square().sum(dim=1, keepdim=True) + e_sq - 2 * (rows @ e.t())
                out.append(d.argmin(dim=1))
        return torch.cat(out) if out else z.new_zeros(0, dtype=torch.int64)


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """fp32 matmuls in full fp32 (no TF32) inside the block, whatever the run set globally."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class VQGANTokenizer(AppearanceTokenizer):
    """frames (N, H, W, 3) uint8 -> codes (N, H/f, W/f) int64 in [0, n_embed); f = 2 ** (len(ch_mult) - 1).

    Build it with ``from_config(targets.vqgan)`` (random weights: for shapes, benchmarks and tests) or
    ``load(targets.vqgan)`` (weights from ``targets.vqgan.checkpoint``). Frozen: no grad, eval mode, and
    the weights stay fp32 (bf16 only inside autocast), whatever the module around it is cast to.
    """

    def __init__(self, n_embed: int = 16384, embed_dim: int = 256, z_channels: int = 256, ch: int = 128,
                 ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (16,), resolution: int = 256, precision: str = "auto",
                 encode_chunk: int = 0):
        super().__init__()
        self.codebook_size = n_embed
        self.downsample = 2 ** (len(ch_mult) - 1)
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision '{precision}' is not one of auto, fp32, bf16")
        self.precision, self.encode_chunk = precision, encode_chunk
        self.encoder = Encoder(ch, tuple(ch_mult), num_res_blocks, tuple(attn_resolutions), resolution, z_channels)
        self.quantize = Codebook(n_embed, embed_dim)  # taming's registration order, so state dicts list alike
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, vcfg) -> VQGANTokenizer:
        """The architecture of ``targets.vqgan`` (a ``VQGANConfig``), randomly initialized."""
        return cls(vcfg.n_embed, vcfg.embed_dim, vcfg.z_channels, vcfg.ch, tuple(vcfg.ch_mult), vcfg.num_res_blocks,
                   tuple(vcfg.attn_resolutions), vcfg.resolution, vcfg.precision, vcfg.encode_chunk)

    @classmethod
    def load(cls, vcfg) -> VQGANTokenizer:
        """The architecture of ``targets.vqgan`` with the weights of ``targets.vqgan.checkpoint`` (strict)."""
        state = read_checkpoint(vcfg.checkpoint)
        with torch.device("meta"):  # no random init (and no draws from the global generator): every tensor is loaded
            tok = cls.from_config(vcfg)
        tok.to_empty(device="cpu")
        tok.load_taming_state_dict(state, source=vcfg.checkpoint)
        return tok

    def train(self, mode: bool = True):  # always eval: a frozen tokenizer
        return super().train(False)

    def _apply(self, fn, recurse=True):
        # keep fp32 weights when a parent module is cast (.half(), .bfloat16(), .to(dtype)): the codebook
        # must stay exact, and autocast gives the encoder its bf16 math
        def keep_fp32(t):
            out = fn(t)
            return out.float() if t.is_floating_point() and out.is_floating_point() else out

        return super()._apply(keep_fp32, recurse)

    # ------------------------------------------------------------------ checkpoints

    def load_taming_state_dict(self, state: dict, source: str = "the state dict") -> None:
        """Strict load of a taming ``VQModel`` state dict: every tokenizer key present with its shape, the decoder,
        ``post_quant_conv`` and ``loss.*`` dropped, any other key an error naming it."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own and not k.startswith(UNUSED_PREFIXES)]
        mismatched = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
                      if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if missing or unexpected or mismatched:
            raise CheckpointMismatch(_key_report(source, missing, unexpected, mismatched, state))
        self.load_state_dict({k: state[k] for k in own}, strict=True)

    # ------------------------------------------------------------------ encoding

    def _use_bf16(self, device: torch.device) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")

    @torch.no_grad()
    def encode_latents(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, H, W, 3) uint8 -> z = quant_conv(encoder(x)) (N, embed_dim, H/f, W/f) fp32, x in [-1, 1]."""
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise TypeError(f"frames must be (N, H, W, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")
        n, h, w, _ = frames.shape
        f = self.downsample
        if h % f or w % f:
            raise ValueError(f"frames of {h}x{w} do not tile into the VQGAN's {f}x{f}-pixel cells")
        chunk = self.encode_chunk or max(n, 1)
        out = []
        for part in frames.split(chunk):
            x = part.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # taming's preprocessing
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self._use_bf16(x.device)):
                z = self.quant_conv(self.encoder(x))
            out.append(z.float())
        return torch.cat(out) if out else frames.new_zeros((0, self.quant_conv.out_channels, h // f, w // f),
                                                           dtype=torch.float32)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, H, W, 3) uint8 -> codes (N, H/f, W/f) int64: cell (r, c) is the code of pixels
        [r*f, (r+1)*f) x [c*f, (c+1)*f), as taming's ``VQModel.encode`` returns them."""
        z = self.encode_latents(frames)
        n, e, gh, gw = z.shape
        codes = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, e))
        return codes.view(n, gh, gw)


# ---------------------------------------------------------------------------------------------- checkpoints


class MissingCheckpoint(FileNotFoundError):
    """``targets.vqgan.checkpoint`` is unset or absent; the message says where to download one."""


class CheckpointMismatch(ValueError):
    """A checkpoint is unreadable or does not fit ``targets.vqgan``; the message names the keys and the fix."""


def _missing_checkpoint(what: str) -> MissingCheckpoint:
    links = "\n".join(f"  {name}: {url} (last.ckpt)" for name, url in VQGAN_DOWNLOADS.items())
    return MissingCheckpoint(
        f"{what}. targets.appearance='vqgan' needs a taming-transformers VQGAN checkpoint. The published ImageNet "
        f"f16 models (linked from https://github.com/CompVis/taming-transformers#overview-of-pretrained-models):\n"
        f"{links}\nDownload one and set targets.vqgan.checkpoint=<path to last.ckpt> (the 1024-code model also "
        "needs targets.vqgan.n_embed=1024), or precompute codes once with `python -m fastmam.data.code_cache` "
        "and train with targets.codes=cached."
    )


def read_checkpoint(path: str | Path) -> dict:
    """A taming checkpoint (``{"state_dict": ...}``, e.g. Lightning's ``last.ckpt``) or a bare state dict ->
    the state dict (name -> tensor), on the CPU. Never runs code from the file (see ``_restricted_load``)."""
    if not str(path):
        raise _missing_checkpoint("targets.vqgan.checkpoint is not set")
    path = Path(path).expanduser()
    if not path.is_file():
        raise _missing_checkpoint(f"the VQGAN checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Lightning checkpoints also pickle callbacks, hyper-parameters and loop state as Python objects, which
        # the weights-only loader refuses; read them with every such object replaced by an inert stand-in
        obj = _restricted_load(path)
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointMismatch(f"{path} is not a readable torch checkpoint ({str(exc).splitlines()[0]})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatch(
            f"{path} holds neither a taming checkpoint (a dict with a 'state_dict' of tensors) nor a bare state dict"
        )
    return state


def _key_report(source, missing, unexpected, mismatched, state) -> str:
    def listing(keys, limit=8):
        more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    lines = [f"{source} does not match the VQGAN of targets.vqgan:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {listing(unexpected)}")
    for key, got, want in mismatched[:8]:
        lines.append(f"  {key}: shape {got} in the checkpoint, {want} in the model")
    emb = state.get("quantize.embedding.weight")
    if emb is not None and emb.dim() == 2:
        lines.append(f"The checkpoint's codebook is ({emb.shape[0]}, {emb.shape[1]}): set targets.vqgan.n_embed="
                     f"{emb.shape[0]} and targets.vqgan.embed_dim={emb.shape[1]}; the other architecture keys "
                     "(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels) come from the "
                     "checkpoint's configs/model.yaml.")
    else:
        lines.append("Is it a taming-transformers VQModel checkpoint (keys encoder.*, quant_conv.*, quantize.*)?")
    return "\n".join(lines)


class _Inert(dict):
    """What a checkpoint's non-tensor objects become in ``_restricted_load``: accepts any construction and
    state, keeps nothing, calls nothing."""

    def __new__(cls, *args, **kwargs):
        return dict.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


_SAFE_BUILTINS = frozenset({"set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str",
                            "bytes", "bytearray", "slice", "range"})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals of torch, ``OrderedDict`` and plain builtin types; any other global
    (a Lightning callback class, ``argparse.Namespace``, ``os.system``, ...) becomes an ``_Inert`` class, so that
    loading the file never imports or runs anything it names."""

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if module == "torch._utils" and name.startswith("_rebuild_"):
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("Storage") or name in ("Size", "device")
                                  or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module in ("torch.storage", "torch.nn.parameter") and name in ("UntypedStorage", "TypedStorage",
                                                                           "Parameter", "_load_from_bytes"):
            if name == "_load_from_bytes":  # a legacy storage: an inner torch.load, restricted the same way
                return lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=False,
                                            pickle_module=_RESTRICTED_PICKLE)
            return super().find_class(module, name)
        return type(name, (_Inert,), {"__module__": f"inert:{module}"})


_RESTRICTED_PICKLE = SimpleNamespace(
    __name__="fastmam_restricted_pickle", Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
)


def _restricted_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception as exc:  # anything the file could raise: report it as unreadable, never half-loaded
        raise CheckpointMismatch(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
